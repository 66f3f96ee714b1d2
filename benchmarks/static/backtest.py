"""The per-pipe model (`model.py`) against the H200's measurements of commit 2d6bb1ae850a.

    python benchmarks/static/backtest.py

Reads the SASS fixtures of `fixtures/2d6bb1ae850a.json.gz` (triton 3.6, sm_90, recorded by `record.py`),
predicts each launch and prints every term beside the measured GPU time (../results/2026-11-29-h200/README.md).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "2d6bb1ae850a.json.gz"

MEASURED_US = {
    "dequantize_bf16_dq0_8192x8192": 58.0,
    "dequantize_bf16_dq0_4096x14336": 52.0,
    "dequantize_bf16_dq1_8192x8192": 59.7,
    "dequantize_bf16_dq1_4096x14336": 54.0,
    "quantize_bf16_8192x8192": 232.0,
    "matmul_m1_r16_split3_8192x8192": 452.0,
}
"""GPU time of the large shapes on the H200, 2026-11-29, µs
(benchmarks/results/2026-11-29-h200/README.md, backtest numbers)."""


def dram_bytes(label: str, args: dict) -> float:
    """What each launch must move to or from DRAM (the L2 was flushed before each call)."""
    if label.startswith(("dequantize", "quantize")):
        n = args["n_elements"]
        absmax = n / 64 * (1 if "dq1" in label else 4)
        return n / 2 + 2 * n + absmax
    n, k, split = args["OUT"], args["IN"], -(-args["IN"] // args["k_per_split"])
    return n * k / 2 + n * k / 64 + k * 2 + split * n * 4  # W, absmax codes, x, float32 partial sums


def launches() -> list[tuple[model.Launch, float]]:
    with gzip.open(FIXTURE, "rt") as f:
        records = json.load(f)["records"]
    out = []
    for r in records:
        grid = 1
        for g in r["grid"]:
            grid *= g
        trips = -(-r["args"].get("k_per_split", 1) // 64) if "k_per_split" in r["args"] else 1
        launch = model.Launch(
            name=r["label"], sass_text=r["sass"], params={int(k): v for k, v in r["params"].items()},
            values=r["args"], grid=grid, num_warps=r["num_warps"], registers=r["registers"],
            shared_bytes=r["shared_bytes"], dram_bytes=dram_bytes(r["label"], r["args"]), trips=trips, arch=90,
        )  # fmt: skip
        out.append((launch, MEASURED_US[r["label"]]))
    return out


def rows() -> list[tuple[str, model.Terms, float]]:
    return [(launch.name, model.analyze(launch), measured) for launch, measured in launches()]


if __name__ == "__main__":
    table = rows()
    print(model.format_rows(table))
    for label, t, measured in table:
        print(f"{label}: predicted {t.predicted_us:.1f} µs, measured {measured}: {t.predicted_us / measured - 1:+.0%}")
