"""The fused NF4 matmul + LoRA against the stack users have, side by side in one run.

For y = x @ W^T + scaling * (x @ A^T) @ B^T (bf16 activations, NF4 weight with double quantization,
blocksize 64, adapter rank r), at M = 1, 16, 128, 4096, 16384 rows on a GPU:

  nf4 fused            LoRALinearNF4's forward (the fused Triton kernel; the launcher picks the tile,
                       or "dequantize then cuBLAS" where that measured faster)
  nf4 dequant+matmul   our dequantize kernel, then torch.matmul, then the LoRA term (unfused)
  torch bf16           torch.nn.functional.linear on the unquantized bf16 weight, no adapter (cuBLAS)
  bnb + PEFT           PEFT's LoRA on bitsandbytes' Linear4bit (what QLoRA users run today)

Reported: time per call, TFLOP/s of the base matmul (2*M*N*K), speed-up against torch bf16 and against
bnb + PEFT, and the weight bytes streamed per second as a fraction of the copy bandwidth (the limit
in the memory-bound decode regime). On a GPU the time is GPU time from CUDA-graph replay with the L2
flushed before every call (`median ms`; every rate and ratio comes from it, for every implementation
alike), next to the eager time a user without graphs sees (`eager ms`, CPU launch cost included); an
implementation that cannot be captured is timed eagerly and marked `graph` False (harness.py). The
fused path's top kernels at r = 16 go to the kernel breakdown. On the CPU: one 4096x4096 layer,
M = 1, 16, 128, our CPU path.

    python benchmarks/bench_matmul.py [--quick] [--out results.jsonl]
"""

from __future__ import annotations

import sys

import torch
from common import ours, peft_bnb
from harness import Results, Timer, bench_main, copy_bandwidth, format_table
from torch import nn

from nf4.kernels.matmul import DEQUANT

GPU_SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096)]  # (out, in): the last is an MLP up-projection
GPU_M = [1, 16, 128, 4096, 16384]
CPU_SHAPES, CPU_M = [(4096, 4096)], [1, 16, 128]
QUICK_SHAPES, QUICK_M = [(256, 512)], [1, 16]
RANKS = (16, 64)


def _dequant_matmul(layer, x):
    """Our unfused path: the dequantize kernel, torch.matmul, the LoRA term added after."""
    w = layer.nf4_weight
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        from nf4.kernels.matmul import nf4_matmul

        xa = (x2.float() @ layer.lora_A.t().float()) * layer.scaling
        return nf4_matmul(x2, w, u=xa, v=layer.lora_B.t(), bias=layer.bias, config=DEQUANT)
    import nf4
    from nf4 import reference

    xa = (x2.float() @ layer.lora_A.t().float()) * layer.scaling
    return reference.matmul_ref(x2, nf4.dequantize(w, torch.float32), False, xa, layer.lora_B.t(), layer.bias)


def run(device: torch.device, quick: bool, results: Results) -> list[dict]:
    timer = Timer(device, quick)
    copy_gbs = copy_bandwidth(timer)
    gpu = device.type == "cuda"
    shapes, ms = (QUICK_SHAPES, QUICK_M) if quick else (GPU_SHAPES, GPU_M) if gpu else (CPU_SHAPES, CPU_M)
    ranks = RANKS[:1] if quick else RANKS
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        w_bf16 = linear.weight.detach().to(device)
        for r in ranks:
            layer = ours(linear, r, device)
            theirs = peft_bnb(linear, r, torch.bfloat16, device)
            weight_bytes = layer.nf4_weight.nbytes
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
                impls = {
                    "nf4 fused": lambda: layer(x),
                    "nf4 dequant+matmul": lambda: _dequant_matmul(layer, x),
                    "torch bf16": lambda: torch.nn.functional.linear(x, w_bf16),
                }
                if theirs is not None:
                    impls["bnb + PEFT"] = lambda: theirs(x)
                case = {"shape": [n, k], "m": m, "r": r}
                times = {}
                with torch.no_grad():
                    for impl, fn in impls.items():
                        t = timer(fn, min_seconds=0.15 if gpu else 0.0, repeats=25 if gpu else 5)
                        times[impl] = t.median_ms
                        rows.append(results.add("matmul", case, impl, t))
                        if impl == "nf4 fused" and r == ranks[0]:
                            title = f"matmul {n}x{k}, M = {m}, r = {r}, {impl}: graph {t.median_ms:.4f} ms"
                            results.kernel_breakdown(f"{title}, eager {t.eager_ms:.4f} ms", fn)
                for row in rows[-len(impls) :]:
                    t = row["median_ms"] * 1e-3
                    row["tflops"] = 2 * m * n * k / t / 1e12
                    row["x_vs_torch_bf16"] = times["torch bf16"] / row["median_ms"]
                    row["x_vs_bnb_peft"] = times["bnb + PEFT"] / row["median_ms"] if "bnb + PEFT" in times else None
                    streamed = 2 * n * k if row["impl"] == "torch bf16" else weight_bytes
                    row["weight_gb_per_s"] = streamed / t / 1e9
                    row["fraction_of_copy"] = row["weight_gb_per_s"] / copy_gbs
    return rows


COLUMNS = [
    ("shape", "shape", ""),
    ("M", "m", ""),
    ("r", "r", ""),
    ("impl", "impl", ""),
    ("median ms", "median_ms", ".4f"),
    ("eager ms", "eager_ms", ".4f"),
    ("graph", "graph", ""),
    ("TFLOP/s", "tflops", ".2f"),
    ("x vs bf16", "x_vs_torch_bf16", ".2f"),
    ("x vs bnb+PEFT", "x_vs_bnb_peft", ".2f"),
    ("W GB/s", "weight_gb_per_s", ".0f"),
    ("of copy BW", "fraction_of_copy", ".0%"),
]


def table(rows: list[dict]) -> str:
    return format_table(rows, COLUMNS)


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table))
