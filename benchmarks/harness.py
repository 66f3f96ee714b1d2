"""The shared benchmark harness: timing, the environment record, results as JSON lines and a table.

Timing. On a GPU: CUDA events around each call, after warm-up, with the L2 cache flushed before every
call (a 256 MB buffer is overwritten, so a 4096x4096 NF4 weight, 9 MB, is never served from the 50 MB
L2). On the CPU: `time.perf_counter` around each call, after warm-up. Each measurement keeps the
median and the 20th/80th percentiles of the repeats.

Benchmarks never assert: they print a table and write one JSON object per measurement, each carrying
the environment (device, versions, git commit, date).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def _quantiles(samples: list[float]) -> Timing:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(s), pick(0.2), pick(0.8), len(s))


class Timer:
    """Times callables on one device; `quick` cuts warm-up and repeats (smoke runs)."""

    def __init__(self, device: torch.device, quick: bool = False):
        self.device = device
        self.quick = quick
        self.gpu = device.type == "cuda"
        self._flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if self.gpu else None

    def __call__(self, fn, warmup: int = 3, repeats: int = 15, min_seconds: float = 0.0) -> Timing:
        if self.quick:
            warmup, repeats = 1, 2
        for _ in range(warmup):
            fn()
        samples = []
        start_all = time.perf_counter()
        while len(samples) < repeats or (time.perf_counter() - start_all < min_seconds and len(samples) < 200):
            if self.gpu:
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return _quantiles(samples)


def copy_bandwidth(timer: Timer, nbytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes if timer.gpu else nbytes // 8
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=timer.device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    """Where and with what a measurement was taken."""
    import triton

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bnb_version,
        "python": platform.python_version(),
        "commit": os.environ.get("NF4_COMMIT") or _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Results:
    """Collects measurements; writes JSON lines and formats a table."""

    env: dict
    records: list[dict] = field(default_factory=list)

    def add(self, bench: str, case: dict, impl: str, timing: Timing | None, **metrics) -> dict:
        record = {
            "bench": bench,
            **case,
            "impl": impl,
            **(asdict(timing) if timing else {}),
            **metrics,
            "env": self.env,
        }
        self.records.append(record)
        return record

    def write_jsonl(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Fixed-width table: `columns` = (header, key, format spec); missing values print as '-', shapes
    (lists) as 4096x4096."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):
            return "x".join(map(str, value))
        return format(value, spec) if spec else str(value)

    body = [[cell(r, k, s) for _, k, s in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, (h, _, _) in enumerate(columns)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line([h for h, _, _ in columns]), line(["-" * w for w in widths])] + [line(b) for b in body])


def banner(env: dict) -> str:
    kind = "GPU run" if env["device_type"] == "cuda" else "CPU run (no GPU: CPU paths, smaller shapes)"
    return (
        f"== {kind} on {env['device']} | torch {env['torch']}, triton {env['triton']}, "
        f"bitsandbytes {env['bitsandbytes']} | commit {env['commit']} | {env['date']}"
    )


def bnb_available(device: torch.device) -> bool:
    """bitsandbytes imports and runs a 4-bit quantize on `device`."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, device=device), blocksize=64, quant_type="nf4")
        return True
    except Exception:  # noqa: BLE001 - any failure: report the baseline as unavailable
        return False


def bench_main(doc: str, run, table, argv=None) -> None:
    """The command line every benchmark script shares: `[--quick] [--out results.jsonl]`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke test)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(environment(device))
    print(banner(results.env))
    print(table(run(device, args.quick, results)))
    if args.out:
        results.write_jsonl(args.out)
