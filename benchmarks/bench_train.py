"""A LoRA training step (forward + backward) on one NF4 layer: ours against PEFT on bitsandbytes.

`LoRALinearNF4` (fused forward, hand-written backward: dx through the fused transposed kernel, dA, dB)
against PEFT's LoRA on bitsandbytes' Linear4bit (bnb's matmul_4bit and autograd), r = 16, bf16
activations, the adapter in float32 in both. A step is forward + backward: the gradients of x, lora_A
and lora_B are set to None at its start, so backward allocates them afresh; there is no optimizer step,
for any implementation. Reported: time per step and, on a GPU, peak memory allocated during the step
beyond what was allocated before it. On a GPU the step is timed as harness.py times a call: GPU time
from replaying a CUDA graph of whole steps (forward and backward captured, with the L2 flushed before
each step; `median ms`, which `x vs bnb+PEFT` compares), next to the eager time (`eager ms`); our
step's top kernels go to the kernel breakdown. GPU: M = 4096 and 16384 rows through a 4096x4096 and a
4096->14336 layer. CPU: M = 256 and 1024 through one 1024x1024 layer (peak memory is not tracked on
the CPU).

    python benchmarks/bench_train.py [--quick] [--out results.jsonl]
"""

from __future__ import annotations

import sys

import torch
from common import ours, peft_bnb
from harness import Results, Timer, bench_main, format_table
from torch import nn

GPU_CASES = [((4096, 4096), 4096), ((4096, 4096), 16384), ((14336, 4096), 4096), ((14336, 4096), 16384)]
CPU_CASES = [((1024, 1024), 256), ((1024, 1024), 1024)]
QUICK_CASES = [((256, 512), 64)]


def _step(model, x, dy):
    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.backward(dy)

    return step


def _peak_mb(device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(device: torch.device, quick: bool, results: Results) -> list[dict]:
    timer = Timer(device, quick)
    cases = QUICK_CASES if quick else GPU_CASES if device.type == "cuda" else CPU_CASES
    rows = []
    for (n, k), m in cases:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device, requires_grad=True)
        dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
        impls = {"nf4 LoRALinearNF4": ours(linear, 16, device)}
        theirs = peft_bnb(linear, 16, torch.bfloat16, device)
        if theirs is not None:
            impls["bnb + PEFT"] = theirs
        times = {}
        for impl, model in impls.items():
            step = _step(model, x, dy)
            t = timer(step, repeats=10 if device.type == "cuda" else 3)
            times[impl] = t.median_ms
            rows.append(
                results.add("train_step", {"shape": [n, k], "m": m, "r": 16}, impl, t, peak_mb=_peak_mb(device, step))
            )
            if impl == "nf4 LoRALinearNF4":
                title = f"train step {n}x{k}, M = {m}, r = 16, {impl}: graph {t.median_ms:.3f} ms"
                results.kernel_breakdown(f"{title}, eager {t.eager_ms:.3f} ms", step)
        for row in rows[-len(impls) :]:
            base = times.get("bnb + PEFT")
            row["x_vs_bnb_peft"] = base / row["median_ms"] if base else None
    return rows


COLUMNS = [
    ("shape", "shape", ""),
    ("M", "m", ""),
    ("impl", "impl", ""),
    ("median ms", "median_ms", ".3f"),
    ("eager ms", "eager_ms", ".3f"),
    ("graph", "graph", ""),
    ("x vs bnb+PEFT", "x_vs_bnb_peft", ".2f"),
    ("peak MB", "peak_mb", ".0f"),
]


def table(rows: list[dict]) -> str:
    return format_table(rows, COLUMNS)


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table))
