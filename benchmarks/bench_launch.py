"""Eager CPU cost per layer call: the Python and dispatcher work around the kernels, without a GPU.

    python benchmarks/bench_launch.py [--quick] [--out results.jsonl]

With `TRITON_INTERPRET=1` (set here, before `nf4` is imported) CPU tensors take the same launcher code
as CUDA tensors; the Triton launches themselves are replaced by no-ops, so what is timed is everything a
GPU call costs the CPU except Triton's own launch of each kernel (counted per call: Triton's JIT dispatch
costs ~9-12 µs a launch on GPU hosts, vllm-project/vllm#34838 and meta-pytorch/tritonbench#1002). A tiny
layer (64 -> 64, r = 16, M = 1) keeps torch's own small ops (the LoRA products) cheap, as they are on a
GPU, where they are launches. bfloat16 at M = 1 takes the decode path (`nf4.kernels.gemv`), float32 the
fused matmul kernel. The reference point is `nn.Linear` on the same tensors. Issue "Correct on a real
GPU" sets the bar at 60 µs per layer call on a GPU (bitsandbytes + PEFT: ~250 µs eager,
benchmarks/results/2026-11-29-h200/README.md).
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
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing but count itself."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _NoLaunch.launches += 1


STUBBED = {
    "nf4.kernels.matmul": ("_nf4_matmul_kernel", "_splitk_reduce_kernel"),
    "nf4.kernels.gemv": ("_nf4_gemv_kernel", "_nf4_gemv_epilogue_kernel"),
}


def run(device: torch.device, quick: bool, results: Results) -> list[dict]:
    import importlib

    from nf4.lora import LinearNF4, LoRALinearNF4

    modules = {name: importlib.import_module(name) for name in STUBBED}
    saved = {(name, k): getattr(modules[name], k) for name, kernels in STUBBED.items() for k in kernels}
    for name, kernel in saved:
        setattr(modules[name], kernel, _NoLaunch())
    try:
        timer = Timer(torch.device("cpu"), quick)
        records = []
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            linear = nn.Linear(IN, OUT, dtype=dtype)
            frozen = LinearNF4.from_linear(linear)
            layer = LoRALinearNF4.from_linear(linear, r=R)  # float32 adapter (the default)
            x = torch.randn(1, IN, dtype=dtype)
            xg = x.clone().requires_grad_(True)

            def step(module):
                y = module(xg)
                y.sum().backward()

            cases = {
                "nn.Linear forward": lambda: linear(x),
                "LinearNF4 forward": lambda: frozen(x),
                "LoRALinearNF4 forward": lambda: layer(x),
                "LoRALinearNF4 forward, no_grad": torch.no_grad()(lambda: layer(x)),
                "nn.Linear forward+backward": lambda: step(linear),
                "LoRALinearNF4 forward+backward": lambda: step(layer),
            }
            for name, fn in cases.items():
                _NoLaunch.launches = 0
                fn()
                launches = _NoLaunch.launches
                t = timer(fn, warmup=20, repeats=200, min_seconds=0.5)
                case = {"call": name, "dtype": str(dtype).removeprefix("torch."), "M": 1, "shape": [OUT, IN], "r": R}
                records.append(results.add("launch", case, name, t, us=t.median_ms * 1e3, triton_launches=launches))
        return records
    finally:
        for (name, kernel), fn in saved.items():
            setattr(modules[name], kernel, fn)


def table(records: list[dict]) -> str:
    head = (
        "Eager CPU cost per call (64x64, M = 1, r = 16, float32 adapter; Triton launches stubbed, "
        "interpreter launcher path; bfloat16 at M = 1 is the decode path, nf4.kernels.gemv)"
    )
    columns = [("call", "impl", ""), ("dtype", "dtype", ""), ("µs per call", "us", ".1f")]
    return head + "\n" + format_table(records, columns + [("Triton launches", "triton_launches", "")])


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table))
