"""Every benchmark in one run: the printed tables, JSON lines, and a plot of the fused kernel's speed-up.

    python benchmarks/run_all.py [--quick] [--out-dir DIR]

Without --out-dir the results go to benchmarks/results/<date>-<device>-<commit>/: results.jsonl (one
object per measurement, with the environment), table.txt (what was printed) and speedup.png (needs
matplotlib; skipped with a note where it is missing). Runs on a GPU when one is present, else the CPU
paths at smaller shapes, and says which in the first line.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import bench_matmul
import bench_quantize
import bench_train
import torch
from harness import ROOT, Results, banner, environment

BENCHES = [
    ("quantize / dequantize", bench_quantize),
    ("fused matmul + LoRA", bench_matmul),
    ("LoRA training step", bench_train),
]


def plot(rows: list[dict], path: Path) -> str:
    """Speed-up of the fused kernel (and of bnb + PEFT) over torch bf16 against M, one line per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "speedup.png: matplotlib is not installed here; plot results.jsonl elsewhere"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shapes = sorted({tuple(r["shape"]) for r in rows if r["bench"] == "matmul"})
    for shape in shapes:
        for impl, style in (("nf4 fused", "-o"), ("bnb + PEFT", "--x")):
            mine = [r for r in rows if r["bench"] == "matmul" and tuple(r["shape"]) == shape and r["impl"] == impl]
            pts = sorted((r["m"], r["x_vs_torch_bf16"]) for r in mine if r["r"] == 16)
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
    all_rows = []
    for title, bench in BENCHES:
        start = time.perf_counter()
        rows = bench.run(device, args.quick, results)
        all_rows += rows
        text = f"\n## {title} ({time.perf_counter() - start:.0f} s)\n{bench.table(rows)}"
        if bench is bench_quantize and rows:
            text += f"\ncopy bandwidth measured in this run (read + write): {rows[0]['copy_gb_per_s']:.1f} GB/s"
        print(text, flush=True)
        lines.append(text)
    lines.append("\n" + plot(all_rows, args.out_dir / "speedup.png"))
    print(lines[-1])
    (args.out_dir / "table.txt").write_text("\n".join(lines) + "\n")
    results.write_jsonl(args.out_dir / "results.jsonl")
    print(f"\nresults in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
