"""NF4 quantize and dequantize (with and without double quantization) against bitsandbytes.

Reported: time, GB/s (bytes read + written) and the fraction of the copy bandwidth measured in the same
run. On a GPU the time (and with it every rate) is GPU time from CUDA-graph replay with the L2 flushed
before every call, the eager time next to it, as harness.py describes. On a GPU: 4096x4096, 8192x8192,
4096x14336 bf16 weights. On the CPU: 4096x4096 (the size the CPU goals are stated for), our torch path
against bitsandbytes' CPU path.

    python benchmarks/bench_quantize.py [--quick] [--out results.jsonl]
"""

from __future__ import annotations

import sys

import torch
from harness import Results, Timer, bench_main, bnb_available, copy_bandwidth, format_table

import nf4

GPU_SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]
CPU_SHAPES = [(4096, 4096)]
QUICK_SHAPES = [(256, 512)]


def _bytes(shape, double_quant: bool, blocksize: int = 64) -> tuple[int, int]:
    """(bytes of the bf16 tensor, bytes of its NF4 form)."""
    n = shape[0] * shape[1]
    nblocks = -(-n // blocksize)
    stats = nblocks + 4 * -(-nblocks // 256) if double_quant else 4 * nblocks
    return 2 * n, n // 2 + stats


def run(device: torch.device, quick: bool, results: Results) -> list[dict]:
    timer = Timer(device, quick)
    copy_gbs = copy_bandwidth(timer)
    have_bnb = bnb_available(device)
    if have_bnb:
        import bitsandbytes.functional as bnbf
    shapes = QUICK_SHAPES if quick else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    rows = []
    for shape in shapes:
        w = torch.randn(shape, dtype=torch.bfloat16, device=device)
        for dq in (False, True):
            dense, packed = _bytes(shape, dq)
            q = nf4.quantize(w, 64, dq)
            cases = {
                ("quantize", "nf4"): lambda: nf4.quantize(w, 64, dq),
                ("dequantize", "nf4"): lambda: nf4.dequantize(q),
            }
            if have_bnb:
                bq, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
                cases[("quantize", "bitsandbytes")] = lambda: bnbf.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=dq
                )
                cases[("dequantize", "bitsandbytes")] = lambda: bnbf.dequantize_4bit(bq, state, quant_type="nf4")
            times = {}
            for (op, impl), fn in cases.items():
                t = timer(fn, min_seconds=0.15 if device.type == "cuda" else 0.0)
                times[(op, impl)] = t.median_ms
                gbs = (dense + packed) / (t.median_ms * 1e-3) / 1e9
                record = results.add(
                    "quantize",
                    {"op": op, "shape": list(shape), "double_quant": dq},
                    impl,
                    t,
                    gb_per_s=gbs,
                    copy_gb_per_s=copy_gbs,
                    fraction_of_copy=gbs / copy_gbs,
                )
                rows.append(record)
            for (op, impl), ms in times.items():
                base = times.get((op, "bitsandbytes"))
                for r in rows[-len(times) :]:
                    if r["op"] == op and r["impl"] == impl:
                        r["speedup_vs_bnb"] = base / ms if base else None
    return rows


COLUMNS = [
    ("op", "op", ""),
    ("shape", "shape", ""),
    ("dq", "double_quant", ""),
    ("impl", "impl", ""),
    ("median ms", "median_ms", ".3f"),
    ("p20-p80 ms", "spread", ""),
    ("eager ms", "eager_ms", ".3f"),
    ("graph", "graph", ""),
    ("GB/s", "gb_per_s", ".1f"),
    ("of copy BW", "fraction_of_copy", ".0%"),
    ("x vs bnb", "speedup_vs_bnb", ".2f"),
]


def table(rows: list[dict]) -> str:
    return format_table([{**r, "spread": f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"} for r in rows], COLUMNS)


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table))
