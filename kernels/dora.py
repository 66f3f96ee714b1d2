"""DoRA's per-column scale, fused: the elementwise passes `nf4.lora.dora` adds to a LoRA layer.

    forward:  y[m, n]   = round(z[m, n] * g[n] + extra[m, n] + bias[n])      (`dora_scale`)
    backward: dyg[m, n] = round(dy[m, n] * g[n])                             (`dora_grad`)
              dm[n]     = sum_m dy[m, n] * z[m, n]   (fp32 partial sums per 32 rows, summed by torch)

z, extra, dy and the outputs are in the activation dtype, g and bias float32; products and sums in
float32, rounded once. In torch each line is three to five passes over [M, N] (widen, multiply, add,
narrow): 20 bytes per element forward and 28 + 20 backward in bf16, against 4 and 6 here
(benchmarks/static/dora_step.py predicts the step with both). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import INTERPRET, LaunchConfig, cdiv, ptr_type, round_to, to_f32

BM, BN = 8, 256
"""Tile of `_dora_scale_kernel`: 8 rows of 256 columns, 16 contiguous bytes per thread in bf16 (4 warps)."""
GRAD_BM = 32
"""Rows of a `_dora_grad_kernel` program (32 x 256): the partial sums are [ceil(M / 32), N], 1/8 of an
element's bytes more. No loop: a program's loads all issue before its first wait (a 128-row program
walking 8-row steps kept 256 bytes a warp in flight: Little's law bound at 3x its DRAM time under
benchmarks/static/model.py)."""
NUM_WARPS = 4


@triton.jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's [BM, BN] tile of an [M, N] row-major tensor: its columns, which of them are inside,
    the elements' int64 offsets and which of them are inside."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    inside_n = offs_n < N
    return offs_n, inside_n, offs_m[:, None] * N + offs_n[None, :], (offs_m < M)[:, None] & inside_n[None, :]


@triton.jit(do_not_specialize=["has_extra", "has_bias"])
def _dora_scale_kernel(
    z_ptr,
    g_ptr,
    extra_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    has_extra,
    has_bias,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """y = round(z * g[n] + extra + bias[n]), in that order (torch's), float32 in between."""
    offs_n, inside_n, tile, inside = _tile(M, N, BM, BN)
    g = tl.load(g_ptr + offs_n, mask=inside_n, other=0.0)
    acc = to_f32(tl.load(z_ptr + tile, mask=inside, other=0.0), SOFT_BF16) * g[None, :]
    if has_extra:
        acc += to_f32(tl.load(extra_ptr + tile, mask=inside, other=0.0), SOFT_BF16)
    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=inside_n, other=0.0)[None, :]
    tl.store(y_ptr + tile, round_to(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=inside)


@triton.jit
def _dora_grad_kernel(
    dy_ptr,
    z_ptr,
    g_ptr,
    dyg_ptr,
    partial_ptr,
    M,
    N,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """dyg = round(dy * g[n]); partial[program row, n] = sum over the program's BM rows of dy * z."""
    offs_n, inside_n, tile, inside = _tile(M, N, BM, BN)
    dy = to_f32(tl.load(dy_ptr + tile, mask=inside, other=0.0), SOFT_BF16)
    z = to_f32(tl.load(z_ptr + tile, mask=inside, other=0.0), SOFT_BF16)
    g = tl.load(g_ptr + offs_n, mask=inside_n, other=0.0)
    tl.store(dyg_ptr + tile, round_to(dy * g[None, :], dyg_ptr.dtype.element_ty, SOFT_BF16), mask=inside)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * N + offs_n, tl.sum(dy * z, axis=0), mask=inside_n)


def _check(where: str, g: torch.Tensor, *tiles: torch.Tensor) -> None:
    """The launchers' contract: [M, N] contiguous tiles of one kernel dtype, float32 g [N], one device."""
    z = tiles[0]
    if z.dim() != 2 or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: expected a 2-D float32/float16/bfloat16 tensor, got {z.dtype} {list(z.shape)}")
    for t in tiles:
        if t.shape != z.shape or t.dtype != z.dtype or not t.is_contiguous() or t.device != z.device:
            raise ValueError(
                f"{where}: every [M, N] operand must be contiguous {z.dtype} {list(z.shape)} on {z.device}"
            )
    if g.shape != (z.shape[1],) or g.dtype != torch.float32 or g.device != z.device:
        raise ValueError(
            f"{where}: expected a float32 g of shape [{z.shape[1]}] on {z.device}, got {g.dtype} {list(g.shape)}"
        )


def dora_scale(z: torch.Tensor, g: torch.Tensor, bias=None, extra=None) -> torch.Tensor:
    """`round(z * g + extra + bias)` in z's dtype: z, extra [M, N]; g, bias float32 [N]."""
    _check("dora_scale", g, z, *([] if extra is None else [extra]))
    if bias is not None and (bias.shape != g.shape or bias.dtype != torch.float32 or bias.device != z.device):
        raise ValueError(
            f"dora_scale: expected a float32 bias of shape {list(g.shape)}, got {bias.dtype} {list(bias.shape)}"
        )
    m, n = z.shape
    y = torch.empty_like(z)
    if y.numel():
        _dora_scale_kernel[(cdiv(m, BM), cdiv(n, BN))](
            z, g, z if extra is None else extra, g if bias is None else bias, y, m, n,
            int(extra is not None), int(bias is not None),
            BM=BM, BN=BN, SOFT_BF16=INTERPRET, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return y


def dora_grad(dy: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`round(dy * g)` in dy's dtype, float32 `sum_m dy * z` [N]): dy, z [M, N]; g float32 [N]."""
    _check("dora_grad", g, dy, z)
    m, n = dy.shape
    dyg = torch.empty_like(dy)
    partial = torch.empty((cdiv(m, GRAD_BM), n), dtype=torch.float32, device=dy.device)
    if dy.numel():
        _dora_grad_kernel[(cdiv(m, GRAD_BM), cdiv(n, BN))](
            dy, z, g, dyg, partial, m, n,
            BM=GRAD_BM, BN=BN, SOFT_BF16=INTERPRET, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return dyg, partial.sum(0)


def dora_configs() -> list[LaunchConfig]:
    """Both kernels for every activation dtype, as `dora_scale` and `dora_grad` launch them."""
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        act, dname = ptr_type(dtype), str(dtype).removeprefix("torch.")
        options = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
        ints = {"M": "i32", "N": "i32"}
        out.append(
            LaunchConfig(
                name=f"dora_scale[{dname}]",
                kernel=_dora_scale_kernel,
                signature={"z_ptr": act, "g_ptr": "*fp32", "extra_ptr": act, "bias_ptr": "*fp32", "y_ptr": act}
                | ints
                | {"has_extra": "i32", "has_bias": "i32"},
                constexprs=dict(BM=BM, BN=BN, SOFT_BF16=False),
                options=options,
            )
        )
        out.append(
            LaunchConfig(
                name=f"dora_grad[{dname}]",
                kernel=_dora_grad_kernel,
                signature={"dy_ptr": act, "z_ptr": act, "g_ptr": "*fp32", "dyg_ptr": act, "partial_ptr": "*fp32"}
                | ints,
                constexprs=dict(BM=GRAD_BM, BN=BN, SOFT_BF16=False),
                options=options,
            )
        )
    return out
