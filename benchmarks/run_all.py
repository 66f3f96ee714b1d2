"""Every benchmark in one run: the printed tables, JSON lines, and a plot of the fused kernel's speed-up.

    python benchmarks/run_all.py [--quick] [--out-dir DIR]

On the CPU it ends with bench_model.py's tiny preset (a whole model's QLoRA step, nf4 against
bitsandbytes + PEFT and 16-bit LoRA). Without --out-dir the results go to
benchmarks/results/<date>-<device>-<commit>/: results.jsonl (one
object per measurement, with the environment), table.txt (what was printed), profile.txt (on a GPU:
torch.profiler's top kernels of one call of each fused path; on the CPU a line saying it was skipped)
and speedup.png (needs matplotlib; skipped with a note where it is missing). Runs on a GPU when one is
present, else the CPU paths at smaller shapes, and says which in the first line. Interrupted (Ctrl-C,
or `timeout -s INT`), it still writes every measurement taken so far, and says it was cut short.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import bench_matmul
import bench_quantize
import bench_train
import torch
from harness import ROOT, Results, banner, environment

BENCHES = [  # (title, module, the `bench` field of its records)
    ("quantize / dequantize", bench_quantize, "quantize"),
    ("fused matmul + LoRA", bench_matmul, "matmul"),
    ("LoRA training step", bench_train, "train_step"),
]


def plot(rows: list[dict], path: Path) -> str:
    """Speed-up of the fused kernel (and of bnb + PEFT) over torch bf16 against M, one line per shape, from
    `median_ms` (GPU time from CUDA graphs on a GPU)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "speedup.png: matplotlib is not installed here; plot results.jsonl elsewhere"
    shapes = sorted({tuple(r["shape"]) for r in rows if r["bench"] == "matmul"})
    if not shapes:
        return "speedup.png: no matmul measurement to plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in shapes:
        for impl, style in (("nf4 fused", "-o"), ("bnb + PEFT", "--x")):
            mine = [r for r in rows if r["bench"] == "matmul" and tuple(r["shape"]) == shape and r["impl"] == impl]
            pts = sorted((r["m"], r["x_vs_torch_bf16"]) for r in mine if r["r"] == 16 and r.get("x_vs_torch_bf16"))
            if pts:
                label = f"{impl} {'x'.join(map(str, shape))}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up over torch bf16 F.linear (higher is better)")
    ax.set_title(f"NF4 matmul + LoRA r=16, {rows[0]['env']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return "speedup.png: written"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test)")
    parser.add_argument("--out-dir", type=Path, help="where to write (default: a new folder in benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(environment(device))
    env = results.env
    if args.out_dir is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"].split(",")[0]).strip("-").lower()
        args.out_dir = ROOT / "benchmarks" / "results" / f"{env['date'][:10]}-{slug}-{env['commit']}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = [banner(env)]
    print(lines[0], flush=True)
    done = 0
    try:
        for title, bench, name in BENCHES:
            start = time.perf_counter()
            bench.run(device, args.quick, results)
            lines.append(f"\n## {title} ({time.perf_counter() - start:.0f} s)\n{_table(results, bench, name)}")
            print(lines[-1], flush=True)
            done += 1
    except KeyboardInterrupt:
        for title, bench, name in BENCHES[done:]:
            lines.append(f"\n## {title} (INTERRUPTED: what was measured)\n{_table(results, bench, name)}")
            print(lines[-1], flush=True)
        lines.append("\nINTERRUPTED: the run was cut short")
        print(lines[-1], flush=True)
    if device.type == "cpu" and done == len(BENCHES):  # on a GPU, gpu_check.sh runs the 8b preset instead
        lines.append(f"\n## a whole model's QLoRA step (bench_model.py, preset tiny)\n{_model_step(args.quick)}")
        print(lines[-1], flush=True)
    lines.append("\n" + plot(results.records, args.out_dir / "speedup.png"))
    print(lines[-1])
    (args.out_dir / "table.txt").write_text("\n".join(lines) + "\n")
    results.write_jsonl(args.out_dir / "results.jsonl", mode="w")
    if _MODEL_RECORDS:
        with (args.out_dir / "results.jsonl").open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in _MODEL_RECORDS))
    (args.out_dir / "profile.txt").write_text(results.breakdown_text() + "\n")
    print(f"\n{results.breakdown_text()}\n\nresults in {args.out_dir}")
    return 0 if done == len(BENCHES) else 1


_MODEL_RECORDS: list[dict] = []


def _model_step(quick: bool) -> str:
    """bench_model.py's tiny preset (nf4 / bitsandbytes + PEFT / 16-bit LoRA), its table; its records kept
    for results.jsonl."""
    import contextlib
    import io
    import tempfile

    import bench_model

    with tempfile.TemporaryDirectory() as tmp:
        out, printed = Path(tmp) / "model.jsonl", io.StringIO()
        steps = (
            ["--warmup", "1", "--steps", "1", "--checkpointing", "on"] if quick else ["--warmup", "3", "--steps", "10"]
        )
        with contextlib.redirect_stdout(printed):
            bench_model.main(["--preset", "tiny", "--device", "cpu", *steps, "--out", str(out)])
        if out.exists():
            _MODEL_RECORDS.extend(json.loads(line) for line in out.read_text().splitlines())
    return "\n".join(line for line in printed.getvalue().splitlines() if not line.startswith("{"))


def _table(results: Results, bench, name: str) -> str:
    """The bench's table over its records so far (a run cut short leaves some ratios unset)."""
    rows = [r for r in results.records if r["bench"] == name]
    text = bench.table(rows) if rows else "(nothing measured)"
    if bench is bench_quantize and rows:
        text += f"\ncopy bandwidth measured in this run (read + write): {rows[0]['copy_gb_per_s']:.1f} GB/s"
    return text


if __name__ == "__main__":
    sys.exit(main())
