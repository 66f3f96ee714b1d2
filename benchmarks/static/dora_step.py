"""What QDoRA adds to a QLoRA layer's training step on the H200, predicted without a GPU (issue 26).

    python benchmarks/static/dora_step.py        (without TRITON_INTERPRET)

One `LoRALinearNF4` layer, forward + backward, bf16 activations, double-quantized W (blocksize 64),
float32 adapter of rank 16, no bias or dropout, at M = 4096 tokens (8192 x 8192 and 4096 x 4096) and the
small preset's 1024 x 2816 at M = 512. Each row is one pass over memory or one GEMM, charged:
- a GEMM at the bf16 cuBLAS rate measured on the H200 on 2026-11-29 (8192 x 8192 x 4096 in 0.72 ms:
  763 TFLOP/s; benchmarks/results/2026-11-29-h200/README.md), or its bytes at the copy bandwidth where
  that is slower (the rank-16 GEMMs are reads of [M, K]);
- `nf4.kernels.dora`'s two kernels and the dequantize by the per-pipe model (`model.py`, backtested on
  that run's measurements: `backtest.py`), compiled as the runtime specialises them (`today._launch`);
- every other elementwise pass (torch's) at `model.BANDWIDTH` (4.1 TB/s, the copy bandwidth measured in
  that run): bytes read + written;
- plus `model.LAUNCH_US` (2 µs) per kernel (`LAUNCHES`): the gap between dependent kernels of one
  stream. The float64 norm of `norm_from_parts` is ops on [N, r] values, charged as launches only.
At 8192 x 8192 a last block estimates PEFT's DoRA on bitsandbytes (`peft_dora`: its extra passes as
bytes, its base from the measured forward; an estimate with an assumption, said there).
Rows "torch passes" are the same layer with the elementwise passes in torch (what the CPU runs, and what
the GPU ran before the kernels): 20 bytes an element forward and 48 backward, against 4 and 6 fused.
Not modelled: L2 hits between passes (a pass that rereads a just-written [M, N] tile may find it in L2:
the H200's is 60 MB, these tensors are 8-134 MB), cuBLAS' tile quantisation of M + r rows, host time
(eager launches cost ~10-30 µs of CPU each: at the small preset the host, not the GPU, may bind).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model  # noqa: E402

GEMM_FLOPS = 2 * 4096 * 8192 * 8192 / 0.72e-3
"""bf16 cuBLAS FLOP/s measured on the H200 (8192 x 8192 weight, M = 4096: 0.72 ms)."""
R = 16
SHAPES = ((8192, 8192, 4096), (4096, 4096, 4096), (2816, 1024, 512))
"""(N, K, M): output features, input features, tokens."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(m: int, n: int, k: int, read: float) -> float:
    """µs of an [m, k] @ [k, n] bf16 GEMM reading `read` bytes: the slower of its FLOPs and its bytes."""
    return max(2 * m * n * k / GEMM_FLOPS, read / model.BANDWIDTH) * 1e6


def passes(nbytes: float) -> float:
    """µs of elementwise passes moving `nbytes` (read + written) at the copy bandwidth."""
    return nbytes / model.BANDWIDTH * 1e6


def modelled(cfg_name: str, values: dict, grid: int, dram: float, trips=1) -> float:
    """The per-pipe model's µs for one launch of a configuration (without its launch gap)."""
    import today

    return model.analyze(today._launch(cfg_name, cfg_name, values, grid, dram, trips)).bound[1]


def dequantize_us(n: int, k: int) -> float:
    cfg = "dequantize_nf4[bs=64,bf16,dq=1]"
    import aot

    blocks = next(c for c in aot.all_configs() if c.name == cfg).constexprs["BLOCKS"]
    e = n * k
    return modelled(cfg, {"n_elements": e, "n_bytes": e // 2}, cdiv(e, blocks * 64), e / 2 + 2 * e + e / 64)


def qlora(n: int, k: int, m: int) -> list[tuple[str, float]]:
    """A QLoRA layer's step (`LoRALinearFunction`, large M: dequantize, then cuBLAS, the rank-r term added)."""
    deq = dequantize_us(n, k)
    return [
        ("fwd: x A^T", gemm(m, R, k, 2 * m * k)),
        ("fwd: dequantize W", deq),
        ("fwd: x W^T", gemm(m, n, k, 2 * m * k + 2 * n * k)),
        ("fwd: + s (xA^T) B^T onto y", passes(4 * m * n)),
        ("bwd: dy B", gemm(m, R, n, 2 * m * n)),
        ("bwd: dA = (dy B)^T x", gemm(R, k, m, 2 * m * k)),
        ("bwd: dB = dy^T xA^T", gemm(n, R, m, 2 * m * n)),
        ("bwd: dequantize W", deq),
        ("bwd: dy W", gemm(m, k, n, 2 * m * n + 2 * n * k)),
        ("bwd: + (dy B) A onto dx", passes(4 * m * k)),
    ]


def dora_extra(n: int, k: int, m: int, fused: bool) -> list[tuple[str, float]]:
    """What `DoRALinearFunction` adds to `qlora`'s rows."""
    rows = [
        ("fwd: cat [x; A]", passes(4 * m * k)),
        ("fwd: r more rows in x W^T", gemm(R, n, k, 2 * R * k)),
        ("fwd: norm from parts ([N, r], float64)", 0.0),
    ]
    if fused:
        scale = modelled(
            "dora_scale[bfloat16]",
            {"M": m, "N": n, "has_extra": 0, "has_bias": 0},
            cdiv(m, 8) * cdiv(n, 256),
            4 * m * n,
        )
        grad = modelled(
            "dora_grad[bfloat16]", {"M": m, "N": n}, cdiv(m, 32) * cdiv(n, 256), 6 * m * n + 4 * cdiv(m, 32) * n
        )
        rows += [
            ("fwd: y = g z (dora_scale)", scale),
            ("bwd: dy' = g dy, sum dy z (dora_grad)", grad),
            ("bwd: sum of the partial dm", passes(4 * cdiv(m, 32) * n)),
        ]
    else:
        rows += [
            ("fwd: y = (z.float() * g).to(bf16) (torch)", passes(20 * m * n)),
            ("bwd: dy' = (dy.float() * g).to(bf16) (torch)", passes(20 * m * n)),
            ("bwd: (dy.float() * z.float()).sum(0) (torch)", passes(28 * m * n)),
        ]
    return rows


BNB_PEFT_FORWARD_US = 1240.0
"""bitsandbytes + PEFT LoRA layer forward at 8192 x 8192, M = 4096, bf16, r = 16, measured on the H200
(benchmarks/results/2026-11-29-h200/README.md, speed table: 1.24 ms, CUDA-graph GPU time)."""
BNB_DEQUANT_FRACTION = 0.5
"""bitsandbytes' dequantize ran at 47-55 % of the copy bandwidth in that run (same README)."""


def peft_dora(n: int, k: int, m: int) -> list[tuple[str, float]]:
    """PEFT's DoRA on bitsandbytes (peft/tuners/lora/dora.py, `DoraLinearLayer.forward`, every step in
    training: its caches hold only outside training), float32 adapter, bf16 x, as bytes at the copy
    bandwidth. The base: the measured LoRA forward times 2 (a backward costing what the forward does: one
    dequantize and one GEMM-sized product, dx, as in `qlora`; an assumption, not a measurement; only
    8192 x 8192 M = 4096 was measured)."""
    return [
        (
            "LoRA step on bitsandbytes (2 x the measured forward)",
            2 * BNB_PEFT_FORWARD_US * (n * k * m) / 8192**2 / 4096,
        ),
        ("fwd: B(A(eye(K))) in float32, then to bf16", passes(8 * k * k + 10 * n * k)),
        ("fwd: dequantize W again (bitsandbytes)", passes(2.5 * n * k) / BNB_DEQUANT_FRACTION),
        ("fwd: ||W + s B A|| (scale, add, norm)", passes(12 * n * k)),
        ("fwd: (g - 1) base + g s lora, added, cast (float32 [M, N])", passes(48 * m * n)),
        ("bwd: the same products' gradients and dm's sums", passes(70 * m * n)),
    ]


LAUNCHES = {"qlora": 14, "fused": 19, "torch": 27}
"""Kernels per layer step, counted as the aten and nf4 ops other than views that one forward + backward
dispatches (a `TorchDispatchMode` over `LoRALinearFunction` / `DoRALinearFunction` on the CPU, toy
shape): QLoRA 14, DoRA 41 with torch's passes (27 more: the norm's float64 ops, the casts, the cats);
the two kernels and dm's partial sum replace 11 of those (casts, products, the sum) by 3 (19 more). Each op is at most
one GPU kernel (some casts are no-ops), so the gaps are an upper bound."""


def main() -> None:
    import triton

    print(f"# one layer's training step, H200 constants, sm_90, triton {triton.__version__}, bf16, r = {R}")
    for n, k, m in SHAPES:
        base = qlora(n, k, m)
        base_us = sum(us for _, us in base) + LAUNCHES["qlora"] * model.LAUNCH_US
        print(f"\n## {n} x {k}, M = {m}")
        for name, us in base:
            print(f"  QLoRA  {name:48} {us:8.1f} µs")
        print(f"  QLoRA  {'launch gaps':48} {LAUNCHES['qlora'] * model.LAUNCH_US:8.1f} µs")
        print(f"  QLoRA  {'step':48} {base_us:8.1f} µs")
        for fused in (True, False):
            extra = dora_extra(n, k, m, fused)
            gaps = LAUNCHES["fused" if fused else "torch"] * model.LAUNCH_US
            label = "fused" if fused else "torch passes"
            for name, us in extra:
                print(f"  +DoRA ({label}) {name:40} {us:8.1f} µs")
            total = base_us + sum(us for _, us in extra) + gaps
            print(f"  +DoRA ({label}) {'launch gaps':40} {gaps:8.1f} µs")
            print(f"  QDoRA ({label}) step {total:8.1f} µs = {total / base_us:.2f}x QLoRA's")
            if fused:
                ours = total
        if (n, k, m) == (8192, 8192, 4096):
            rows = peft_dora(n, k, m)
            for name, us in rows:
                print(f"  PEFT DoRA (estimate) {name:56} {us:8.1f} µs")
            theirs = sum(us for _, us in rows)
            print(
                f"  PEFT DoRA on bitsandbytes (estimate) step {theirs:8.1f} µs: nf4 QDoRA {theirs / ours:.2f}x faster"
            )


if __name__ == "__main__":
    main()
