"""Eager CPU cost per layer call: the Python and dispatcher work around the kernels, without a GPU.

    python benchmarks/bench_launch.py [--quick] [--out results.jsonl]

With `TRITON_INTERPRET=1` (set here, before `nf4` is imported) CPU tensors take the same launcher code
as CUDA tensors; the Triton launches themselves are replaced by no-ops, so what is timed is everything a
GPU call costs the CPU except Triton's own launch of each kernel. A tiny layer (64 -> 64, r = 16, M = 1)
keeps torch's own small ops (the LoRA products) cheap, as they are on a GPU, where they are launches.
The reference point is `nn.Linear` on the same tensors. Issue "Correct on a real GPU" sets the bar at
60 µs per layer call on a GPU (bitsandbytes + PEFT: ~250 µs eager, gpu-findings.md).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from harness import Results, Timer, bench_main, format_table  # noqa: E402
from torch import nn  # noqa: E402

IN, OUT, R = 64, 64, 16


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def run(device: torch.device, quick: bool, results: Results) -> list[dict]:
    import nf4.kernels.matmul as matmul
    from nf4.lora import LinearNF4, LoRALinearNF4

    saved = matmul._nf4_matmul_kernel, matmul._splitk_reduce_kernel
    matmul._nf4_matmul_kernel = matmul._splitk_reduce_kernel = _NoLaunch()
    try:
        timer = Timer(torch.device("cpu"), quick)
        torch.manual_seed(0)
        linear = nn.Linear(IN, OUT)
        frozen = LinearNF4.from_linear(linear)
        layer = LoRALinearNF4.from_linear(linear, r=R)
        x = torch.randn(1, IN)
        xg = x.clone().requires_grad_(True)

        def step(module):
            y = module(xg)
            y.sum().backward()

        cases = {
            "nn.Linear forward": lambda: linear(x),
            "LinearNF4 forward": lambda: frozen(x),
            "LoRALinearNF4 forward": lambda: layer(x),
            "nn.Linear forward+backward": lambda: step(linear),
            "LoRALinearNF4 forward+backward": lambda: step(layer),
        }
        records = []
        for name, fn in cases.items():
            t = timer(fn, warmup=20, repeats=200, min_seconds=0.5)
            records.append(
                results.add("launch", {"call": name, "M": 1, "shape": [OUT, IN], "r": R}, name, t, us=t.median_ms * 1e3)
            )
        return records
    finally:
        matmul._nf4_matmul_kernel, matmul._splitk_reduce_kernel = saved


def table(records: list[dict]) -> str:
    head = "Eager CPU cost per call (64x64, M = 1, float32, r = 16; Triton launches stubbed, interpreter launcher path)"
    return head + "\n" + format_table(records, [("call", "impl", ""), ("µs per call", "us", ".1f")])


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table))
