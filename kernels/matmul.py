"""Fused NF4 dequantize-matmul with the low-rank (LoRA) term and bias in the epilogue.

    forward  (trans=False): y[M, N] = x[M, K] @ W^T + (U[M, r] @ V[r, N]) * s + bias[N]
    backward (trans=True):  y[M, K] = x[M, N] @ W   + (U[M, r] @ V[r, K]) * s [* mask]

W [N, K] is an `NF4Tensor`; the tiles need an even K (rows start on a byte). A program owns a [BM, BN]
output tile and walks the reduction in BK steps, decoding W in registers (`dequant_pairs`, rounded to x's
dtype as `nf4.dequantize` rounds). A byte's nibbles are a row's even and odd elements: the forward pass
dots x's even and odd columns separately, the input-gradient pass keeps two accumulators. The LoRA term
joins the fp32 accumulator before the one rounding.

Strategies: `GEMV` for fp16/bf16 forward at M <= 16; 16-row tiles with split-K for the rest of M <= 16;
64- and 128-row tiles in grouped order above; `DEQUANT`. On a GPU `choose` times the candidates once per
(bucket, shape, dtype). Offsets are int64; epilogue flags are runtime scalars.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nf4.kernels.common import (
    INTERPRET,
    TL_DTYPES,
    LaunchConfig,
    cdiv,
    multiprocessors,
    nested_pointers,
    nf4_pairs,
    ptr_type,
    round_to,
    to_f32,
)
from nf4.kernels.dequantize import decode_absmax

RK = tl.constexpr(16)  # rank chunk of the LoRA epilogue: r is walked in steps of 16 (any r works)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile shape and launch parameters of one candidate."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8

    @property
    def name(self) -> str:
        return f"{self.BM}x{self.BN}x{self.BK}w{self.num_warps}s{self.num_stages}"


SPAN = 64
"""Longest run of codes a tile row decodes: with blocks >= 32, at most 3 absmax blocks."""

# Candidates per (M bucket, trans); the first is the default where nothing is timed (interpreter, CPU).
# NOTE: the decoded W tile sits in registers beside the accumulator: 128x128 tiles spill, and many others
# take stack frames under one of triton 3.6 / 3.9. Check a new tile with tests/test_compile.py.
BUCKETS: dict[tuple[str, bool], tuple[MatmulConfig, ...]] = {
    ("small", False): (MatmulConfig(16, 64, 64, 4, 3), MatmulConfig(16, 32, 64, 4, 3)),
    ("medium", False): (MatmulConfig(64, 64, 32, 4, 3), MatmulConfig(64, 64, 32, 8, 3)),
    ("large", False): (MatmulConfig(128, 64, 64, 8, 3), MatmulConfig(128, 64, 64, 8, 4)),
    ("small", True): (MatmulConfig(16, 64, 64, 4, 3), MatmulConfig(16, 64, 32, 4, 3)),
    ("medium", True): (MatmulConfig(64, 64, 64, 4, 3),),
    ("large", True): (MatmulConfig(128, 64, 64, 8, 3), MatmulConfig(128, 64, 64, 8, 4)),
}
# fp32 activations: exact fp32 dot products (FMA, no tensor cores), one smaller tile per bucket.
FP32_BUCKETS: dict[str, MatmulConfig] = {
    "small": MatmulConfig(16, 32, 32, 4, 2),
    "medium": MatmulConfig(16, 32, 32, 4, 2),
    "large": MatmulConfig(64, 32, 32, 8, 2),
}


def bucket(m: int) -> str:
    """M bucket: 'small' (<= 16 rows), 'medium' (<= 128) or 'large'."""
    return "small" if m <= 16 else "medium" if m <= 128 else "large"


def candidates(m: int, trans: bool, dtype: torch.dtype) -> tuple[MatmulConfig, ...]:
    """Tile configurations the launcher may pick for this problem."""
    if dtype == torch.float32:
        return (FP32_BUCKETS[bucket(m)],)
    return BUCKETS[(bucket(m), trans)]


@triton.jit
def _absmax_at(
    absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, n_blocks, DOUBLE_QUANT: tl.constexpr
):
    return decode_absmax(
        absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, block < n_blocks, DOUBLE_QUANT
    )


@triton.jit
def dequant_pairs(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    row_start,
    p,
    mask,
    log2_bs,
    n_blocks,
    DOUBLE_QUANT: tl.constexpr,
):
    """float32 weights (high, low nibble) of byte (row_start + 2p) / 2, row_start (int64, even) a tile row's
    first flat index, p (int32) byte offsets; a row's blocks b0 .. b0 + 2 decoded once."""
    byte = tl.load(packed_ptr + (row_start >> 1) + p, mask=mask, other=0x77).to(tl.int32)
    b0 = row_start >> log2_bs
    rel = ((row_start & ((1 << log2_bs) - 1)).to(tl.int32) + 2 * p) >> log2_bs
    a0 = _absmax_at(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, b0, n_blocks, DOUBLE_QUANT)
    a1 = _absmax_at(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, b0 + 1, n_blocks, DOUBLE_QUANT)
    a2 = _absmax_at(absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, b0 + 2, n_blocks, DOUBLE_QUANT)
    absmax = tl.where(rel == 0, a0, tl.where(rel == 1, a1, a2))
    pair = tl.load(pairs_ptr + byte)
    high = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    low = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return high * absmax, low * absmax


@triton.jit
def _dot(acc, a, b, DOT_F32: tl.constexpr, SOFT_BF16: tl.constexpr):
    """acc + a @ b: in fp32 (exact products, the interpreter / fp32 activations) or on tensor cores."""
    if DOT_F32:
        return tl.dot(to_f32(a, SOFT_BF16), to_f32(b, SOFT_BF16), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    OUT,
    u_ptr,
    v_ptr,
    bias_ptr,
    mask_ptr,
    r,
    stride_vr,
    stride_vn,
    lora_scale,
    has_lora,
    has_bias,
    has_mask,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """acc + (U @ V) * lora_scale [* mask] + bias in fp32 (U [M, r] contiguous, V [r, OUT] strided)."""
    in_m = offs_m < M
    in_n = offs_n < OUT
    if has_lora:
        lora = tl.zeros(acc.shape, dtype=tl.float32)
        for r0 in range(0, r, RK):
            rr = r0 + tl.arange(0, RK)
            u = tl.load(u_ptr + offs_m[:, None] * r + rr[None, :], mask=in_m[:, None] & (rr < r)[None, :], other=0.0)
            v_offs = rr[:, None].to(tl.int64) * stride_vr + offs_n[None, :] * stride_vn
            v = tl.load(v_ptr + v_offs, mask=(rr < r)[:, None] & in_n[None, :], other=0.0)
            lora = _dot(lora, u, v, DOT_F32, SOFT_BF16)
        lora = lora * lora_scale
        if has_mask:
            keep = tl.load(mask_ptr + offs_m[:, None] * OUT + offs_n[None, :], mask=in_m[:, None] & in_n[None, :])
            lora = tl.where(keep != 0, lora, 0.0)
        acc += lora
    if has_bias:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    return acc


@triton.jit(do_not_specialize=["has_lora", "has_bias", "has_mask", "lora_scale"])
def _nf4_matmul_kernel(
    # pointers
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    mask_ptr,
    out_ptr,
    # sizes
    M,
    IN,
    OUT,
    K_W,
    log2_bs,
    n_blocks,
    r,
    k_per_split,
    # epilogue
    stride_vr,
    stride_vn,
    lora_scale,
    has_lora,
    has_bias,
    has_mask,
    # meta-parameters
    TRANS_W: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """out[tile] = x @ dequant(W)^T (W with TRANS_W) over slice pid_k + `_epilogue`, rounded once; PARTIAL:
    fp32 sums to out[pid_k]."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(OUT, BN)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    in_m = offs_m < M
    in_n = offs_n < OUT
    k_start = pid_k.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, IN)

    act = x_ptr.dtype.element_ty
    HALF_N: tl.constexpr = BN // 2
    HALF_K: tl.constexpr = BK // 2
    if TRANS_W:  # output columns come in (even, odd) pairs of one byte: two accumulators
        acc_even = tl.zeros((BM, HALF_N), dtype=tl.float32)
        acc_odd = tl.zeros((BM, HALF_N), dtype=tl.float32)
        p = tl.arange(0, HALF_N)[None, :]
        in_pair = (pid_n.to(tl.int64) * BN + 2 * p) < OUT
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        p = tl.arange(0, HALF_K)[None, :]
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + offs_m[:, None] * IN + offs_k[None, :], mask=in_m[:, None] & (offs_k < k_end)[None, :], other=0.0
        )
        if TRANS_W:  # tile rows: W[n = reduction index, k = this tile's output columns]
            row_start = offs_k[:, None] * K_W + pid_n.to(tl.int64) * BN
            w_even, w_odd = dequant_pairs(
                packed_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                nested_offset_ptr,
                nested_code_ptr,
                pairs_ptr,
                row_start,
                p,
                (offs_k < k_end)[:, None] & in_pair,
                log2_bs,
                n_blocks,
                DOUBLE_QUANT,
            )
            acc_even = _dot(acc_even, x, round_to(w_even, act, SOFT_BF16), DOT_F32, SOFT_BF16)
            acc_odd = _dot(acc_odd, x, round_to(w_odd, act, SOFT_BF16), DOT_F32, SOFT_BF16)
        else:  # W[n = output index, k = reduction index], decoded as [BN, BK/2] rows; x splits into even/odd k
            row_start = offs_n[:, None] * K_W + k0
            w_even, w_odd = dequant_pairs(
                packed_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                nested_offset_ptr,
                nested_code_ptr,
                pairs_ptr,
                row_start,
                p,
                in_n[:, None] & (k0 + 2 * p < k_end),
                log2_bs,
                n_blocks,
                DOUBLE_QUANT,
            )
            x_even, x_odd = tl.split(tl.reshape(x, (BM, HALF_K, 2)))
            acc = _dot(acc, x_even, tl.trans(round_to(w_even, act, SOFT_BF16)), DOT_F32, SOFT_BF16)
            acc = _dot(acc, x_odd, tl.trans(round_to(w_odd, act, SOFT_BF16)), DOT_F32, SOFT_BF16)
    if TRANS_W:
        acc = tl.reshape(tl.join(acc_even, acc_odd), (BM, BN))

    if PARTIAL:
        offs = (pid_k.to(tl.int64) * M + offs_m[:, None]) * OUT + offs_n[None, :]
        tl.store(out_ptr + offs, acc, mask=in_m[:, None] & in_n[None, :])
    else:
        acc = _epilogue(
            acc,
            offs_m,
            offs_n,
            M,
            OUT,
            u_ptr,
            v_ptr,
            bias_ptr,
            mask_ptr,
            r,
            stride_vr,
            stride_vn,
            lora_scale,
            has_lora,
            has_bias,
            has_mask,
            DOT_F32,
            SOFT_BF16,
        )
        out = round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16)
        tl.store(out_ptr + offs_m[:, None] * OUT + offs_n[None, :], out, mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["has_lora", "has_bias", "has_mask", "lora_scale"])
def _splitk_reduce_kernel(
    partial_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    mask_ptr,
    out_ptr,
    M,
    OUT,
    r,
    split,
    stride_vr,
    stride_vn,
    lora_scale,
    has_lora,
    has_bias,
    has_mask,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DOT_F32: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """out[tile] = sum_s partial[s, tile], then `_epilogue`, rounded once."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    tile = offs_m[:, None] * OUT + offs_n[None, :]
    inside = (offs_m < M)[:, None] & (offs_n < OUT)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for s in range(0, split):  # partial sums [split, M, OUT]; offs_m is int64, so the offset is too
        acc += tl.load(partial_ptr + (offs_m[:, None] + s * M) * OUT + offs_n[None, :], mask=inside, other=0.0)
    acc = _epilogue(
        acc,
        offs_m,
        offs_n,
        M,
        OUT,
        u_ptr,
        v_ptr,
        bias_ptr,
        mask_ptr,
        r,
        stride_vr,
        stride_vn,
        lora_scale,
        has_lora,
        has_bias,
        has_mask,
        DOT_F32,
        SOFT_BF16,
    )
    tl.store(out_ptr + tile, round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=inside)


REDUCE_TILE = (16, 32)  # (16, 64) takes a stack frame for fp32 (tests/test_compile.py)


def _signature(dtype: torch.dtype, double_quant: bool) -> dict[str, str]:
    act = ptr_type(dtype)
    return {
        "x_ptr": act,
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8" if double_quant else "*fp32",
        "nested_absmax_ptr": "*fp32",
        "nested_offset_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "pairs_ptr": "*i64",
        "u_ptr": act,
        "v_ptr": act,
        "bias_ptr": "*fp32",
        "mask_ptr": "*u8",
        "out_ptr": act,  # or *fp32 partials: see matmul_configs
        "M": "i32",
        "IN": "i32",
        "OUT": "i32",
        "K_W": "i64",
        "log2_bs": "i32",
        "n_blocks": "i64",
        "r": "i32",
        "k_per_split": "i64",
        "stride_vr": "i64",
        "stride_vn": "i64",
        "lora_scale": "fp32",
        "has_lora": "i32",
        "has_bias": "i32",
        "has_mask": "i32",
    }


def matmul_configs() -> list[LaunchConfig]:
    """Every configuration the launcher can run (for the ahead-of-time report)."""
    out = []
    for dtype in TL_DTYPES:
        dname = ptr_type(dtype)[1:]
        for (bucket_name, trans), _ in BUCKETS.items():
            m = {"small": 1, "medium": 64, "large": 4096}[bucket_name]
            for cfg in candidates(m, trans, dtype):
                for double_quant in (False, True):
                    for partial in (False, True) if bucket_name == "small" else (False,):
                        sig = _signature(dtype, double_quant)
                        if partial:
                            sig["out_ptr"] = "*fp32"
                        out.append(
                            LaunchConfig(
                                name=f"nf4_matmul[{bucket_name},{cfg.name},{dname},trans={int(trans)},"
                                f"dq={int(double_quant)},partial={int(partial)}]",
                                kernel=_nf4_matmul_kernel,
                                signature=sig,
                                constexprs=dict(
                                    TRANS_W=trans,
                                    DOUBLE_QUANT=double_quant,
                                    PARTIAL=partial,
                                    BM=cfg.BM,
                                    BN=cfg.BN,
                                    BK=cfg.BK,
                                    GROUP_M=cfg.GROUP_M,
                                    DOT_F32=dtype == torch.float32,
                                    SOFT_BF16=False,
                                ),
                                options={
                                    "num_warps": cfg.num_warps,
                                    "num_stages": cfg.num_stages,
                                    "enable_fp_fusion": False,
                                },
                                large_m=bucket_name == "large" and dtype != torch.float32,
                            )
                        )
        act = ptr_type(dtype)
        out.append(
            LaunchConfig(
                name=f"splitk_reduce[{dname}]",
                kernel=_splitk_reduce_kernel,
                signature={
                    "partial_ptr": "*fp32",
                    "u_ptr": act,
                    "v_ptr": act,
                    "bias_ptr": "*fp32",
                    "mask_ptr": "*u8",
                    "out_ptr": act,
                    "M": "i32",
                    "OUT": "i32",
                    "r": "i32",
                    "split": "i32",
                    "stride_vr": "i64",
                    "stride_vn": "i64",
                    "lora_scale": "fp32",
                    "has_lora": "i32",
                    "has_bias": "i32",
                    "has_mask": "i32",
                },
                constexprs=dict(BM=REDUCE_TILE[0], BN=REDUCE_TILE[1], DOT_F32=dtype == torch.float32, SOFT_BF16=False),
                options={"num_warps": 4, "enable_fp_fusion": False},
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# launcher


def _split_for(m: int, in_dim: int, out_dim: int, cfg: MatmulConfig, device: torch.device) -> int:
    """Split-K factor for the small bucket: ~2 programs per SM, each at least 4 BK steps."""
    if device.type != "cuda":
        return 1
    tiles = cdiv(m, cfg.BM) * cdiv(out_dim, cfg.BN)
    return max(1, min(cdiv(2 * multiprocessors(device), tiles), in_dim // (4 * cfg.BK)))


DEQUANT = "dequantize+matmul"
"""Dequantize W (`nf4.kernels.dequantize_nf4`), then torch.matmul."""

GEMV = "gemv"
"""The decode kernel for M <= 16 (`nf4.kernels.gemv.nf4_gemv`)."""


def gemv_applies(x: torch.Tensor, weight, trans: bool, mask) -> bool:
    """Whether `nf4_gemv` takes the call: forward, no mask, M <= 16, fp16/bf16, 16-byte aligned tensors
    (`LaunchConfig.aligned_only`)."""
    from nf4.kernels.gemv import MAX_M

    tensors = [x, weight.packed, weight.absmax]
    if weight.double_quant:
        tensors += [weight.nested_absmax, weight.nested_offset, weight.nested_code]
    return (
        not trans
        and mask is None
        and x.shape[0] <= MAX_M
        and x.dtype in (torch.float16, torch.bfloat16)
        and all(t.data_ptr() % 16 == 0 for t in tensors)
    )


_CHOSEN: dict[tuple, MatmulConfig | str] = {}


def choose(key: tuple, options: dict[str, object], run) -> object:
    """The fastest of `options` for `key` (timed once on the GPU, cached); the first without CUDA."""
    if key not in _CHOSEN:
        names = list(options)
        if len(names) == 1 or key[-1].type != "cuda":
            _CHOSEN[key] = options[names[0]]
        else:
            times = {name: triton.testing.do_bench(lambda o=options[name]: run(o), warmup=5, rep=20) for name in names}
            _CHOSEN[key] = options[min(times, key=times.get)]
    return _CHOSEN[key]


def nf4_matmul(
    x: torch.Tensor,
    weight,
    *,
    trans: bool = False,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    config: MatmulConfig | str | None = None,
    split: int | None = None,
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W^T` (or `x @ W` with `trans`) + `(u @ v) * lora_scale [* mask]` + `bias`, fused.

    x [M, IN] fp32/fp16/bf16; weight [N, K]; u [M, r] and v [r, OUT] (or A [r, IN] as `a`), bias [OUT], mask
    [M, OUT] bool, or None; config, split force a candidate and split-K (tests). Returns [M, OUT], x's dtype;
    no host read after a shape's first call."""
    n, k = weight.shape
    m, in_dim = x.shape
    assert in_dim == (n if trans else k) and x.dtype in TL_DTYPES, "validated by nf4.lora"
    x = x.contiguous()
    gemv = gemv_applies(x, weight, trans, mask)
    if k % 2 and config not in (GEMV, DEQUANT):  # the tiles need rows that start on a byte
        config = GEMV if gemv else DEQUANT
    if config is None:
        # `gemv` is part of the key: a choice of GEMV made for aligned tensors must not serve unaligned ones
        key = (bucket(m), in_dim, n, k, x.dtype, trans, weight.double_quant, weight.blocksize, gemv, x.device)
        config = _CHOSEN.get(key)
        if config is None:
            options = {GEMV: GEMV} if gemv else {}
            options.update({c.name: c for c in candidates(m, trans, x.dtype)})
            if bucket(m) != "small" and x.dtype != torch.float32:
                options[DEQUANT] = DEQUANT
            config = choose(key, options, lambda c: _run(x, weight, trans, u, v, bias, mask, lora_scale, c, split, a))
    return _run(x, weight, trans, u, v, bias, mask, lora_scale, config, split, a)


def _run(x, weight, trans, u, v, bias, mask, lora_scale, config, split, a=None):
    if config == GEMV:
        from nf4.kernels import gemv

        return gemv.launch(x, weight, u, v, bias, lora_scale, split, a)
    if config == DEQUANT:
        return dequantize_then_matmul(x, weight, trans, u, v, bias, mask, lora_scale, a)
    if a is not None:
        u = x @ a.to(x.dtype).t()
    return _fused(x, weight, trans, u, v, bias, mask, lora_scale, config, split)


def dequantize_then_matmul(x, weight, trans, u, v, bias, mask, lora_scale, a=None) -> torch.Tensor:
    """The unfused strategy: W dequantized, one GEMM onto the low-rank term and bias; given A (16-bit
    forward, no dropout) the adapter is merged into W instead (`dequantize_lora`)."""
    from nf4.kernels.dequantize import dequantize_lora, dequantize_nf4, merge_applies

    if a is not None:
        if not trans and mask is None and x.dtype != torch.float32 and merge_applies(weight):
            b = v.t() if v.dtype == a.dtype else v.t().to(a.dtype)
            w = dequantize_lora(weight, a, b, lora_scale, x.dtype)
            return x @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())
        u = x @ a.to(x.dtype).t()
    w = dequantize_nf4(weight, x.dtype).view(weight.shape)
    return matmul_onto_lora_and_bias(x, w if trans else w.t(), u, v, bias, mask, lora_scale)


@functools.cache
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """Per-device constants: the NF4 pair table, a stand-in for absent optional pointers."""
    return {"pairs": nf4_pairs(device), "none_f32": torch.empty(0, device=device)}


def _fused(x, weight, trans, u, v, bias, mask, lora_scale, cfg, split):
    n, k = weight.shape
    m, in_dim = x.shape
    out_dim = k if trans else n
    out = torch.empty((m, out_dim), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    blocksize = weight.blocksize
    assert (cfg.BN if trans else cfg.BK) <= SPAN and blocksize >= 32, "a tile row spans at most 3 blocks"
    constants = _constants(x.device)
    absmax = weight.absmax
    nested = nested_pointers(weight)
    has_lora = u is not None and u.shape[1] > 0
    if has_lora:
        u = u.to(x.dtype).contiguous()
        v = v.to(x.dtype)
        r, stride_vr, stride_vn = u.shape[1], v.stride(0), v.stride(1)
    else:
        u = v = x  # never read
        r, stride_vr, stride_vn = 0, 0, 0
    bias_f32 = bias.to(torch.float32) if bias is not None else constants["none_f32"]
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else weight.packed

    if split is None:
        split = _split_for(m, in_dim, out_dim, cfg, x.device) if bucket(m) == "small" else 1
    k_per_split = cdiv(cdiv(in_dim, split), cfg.BK) * cfg.BK
    split = cdiv(in_dim, k_per_split)
    target = out if split == 1 else torch.empty((split, m, out_dim), dtype=torch.float32, device=x.device)
    epilogue = dict(
        stride_vr=stride_vr,
        stride_vn=stride_vn,
        lora_scale=float(lora_scale),
        has_lora=int(has_lora),
        has_bias=int(bias is not None),
        has_mask=int(mask is not None and has_lora),
    )
    dot_f32 = INTERPRET or x.dtype == torch.float32
    grid = (cdiv(m, cfg.BM) * cdiv(out_dim, cfg.BN), split)
    _nf4_matmul_kernel[grid](
        x,
        weight.packed,
        absmax,
        *nested,
        constants["pairs"],
        u,
        v,
        bias_f32,
        mask_u8,
        target,
        m,
        in_dim,
        out_dim,
        k,
        blocksize.bit_length() - 1,
        cdiv(n * k, blocksize),
        r,
        k_per_split,
        **epilogue,
        TRANS_W=trans,
        DOUBLE_QUANT=weight.double_quant,
        PARTIAL=split > 1,
        BM=cfg.BM,
        BN=cfg.BN,
        BK=cfg.BK,
        GROUP_M=cfg.GROUP_M,
        DOT_F32=dot_f32,
        SOFT_BF16=INTERPRET,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=False,
    )
    if split > 1:
        bm, bn = REDUCE_TILE
        _splitk_reduce_kernel[(cdiv(m, bm), cdiv(out_dim, bn))](
            target,
            u,
            v,
            bias_f32,
            mask_u8,
            out,
            m,
            out_dim,
            r,
            split,
            **epilogue,
            BM=bm,
            BN=bn,
            DOT_F32=dot_f32,
            SOFT_BF16=INTERPRET,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return out


def matmul_onto_lora_and_bias(x, wt, u=None, v=None, bias=None, mask=None, lora_scale: float = 1.0) -> torch.Tensor:
    """`x @ wt + (u @ v) * lora_scale [* mask] + bias` in x's dtype: the low-rank term and bias formed
    first, then `addmm_` adds x @ wt into them (cuBLAS's C operand: no extra [M, OUT] read and write)."""
    has_lora = u is not None and u.shape[-1] > 0
    if not has_lora and bias is None:
        return x @ wt
    dt = x.dtype
    if not has_lora:
        return torch.addmm(bias.to(dt), x, wt)
    u, v = u.to(dt), v.to(dt)
    if mask is None and bias is not None:
        y = torch.addmm(bias.to(dt), u, v, alpha=lora_scale)
    else:
        y = torch.empty((x.shape[0], wt.shape[1]), dtype=dt, device=x.device)
        torch.addmm(y, u, v, beta=0, alpha=lora_scale, out=y)
        if mask is not None:
            y.mul_(mask)
        if bias is not None:
            y.add_(bias.to(dt))
    return y.addmm_(x, wt)
