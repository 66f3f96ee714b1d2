"""NF4 dequantization with the double-quantized absmax decoded in the same kernel; and W + scale * B @ A.

    absmax[b] = float32(float32(nested_code[q[b]] * nested_absmax[b // 256]) + offset)   (double quant)
    out[2k]   = round(NF4[packed[k] >> 4] * absmax[b]),  out[2k+1] = round(NF4[packed[k] & 15] * absmax[b])

A program decodes BLOCKS whole blocks: 16-byte loads, NF4 values from registers
(`nf4.kernels.lut.value_lookup`), one absmax per block. Fp fusion is off: the absmax decode rounds twice,
as the reference does. Offsets are int64.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from nf4.kernels.common import (
    INTERPRET,
    TL_DTYPES,
    LaunchConfig,
    cdiv,
    nested_pointers,
    nf4_pairs,
    ptr_type,
    round_to,
    to_f32,
    weight_signature,
)
from nf4.kernels.lut import VALUE_ASM, lut_words, value_lookup


@functools.cache
def value_lut(device: torch.device) -> torch.Tensor:
    """int32 register words of `nf4.kernels.lut.value_lookup` on `device`, built once."""
    words = torch.tensor(lut_words(torch.float32), dtype=torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(device)


_ELEMENTS = 4096  # per program: 32 per thread with 4 warps, so each thread loads 16 packed bytes at once


def dequantize_config(blocksize: int) -> dict[str, int]:
    """Meta-parameters for one blocksize: whole blocks per program and warps."""
    return {"BLOCKS": max(1, _ELEMENTS // blocksize), "num_warps": 4 if blocksize <= _ELEMENTS else 8}


@triton.jit
def decode_absmax(
    absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, block, mask, DOUBLE_QUANT: tl.constexpr
):
    """float32 absmax of the blocks `block` (int64), decoding the double-quantized form if needed."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + q) * scale + tl.load(nested_offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _scaled_values(byte, pairs_ptr, lut_ptr, absmax, ROWS: tl.constexpr, COLS: tl.constexpr, ASM: tl.constexpr):
    """[ROWS, COLS] float32 weights from packed bytes [ROWS, COLS / 2], row i times absmax[i]; values from
    registers (`value_lookup`), or the pair table under the interpreter."""
    GROUPS: tl.constexpr = COLS // 32  # 16-byte groups per row (dimension 1: along lanes)
    b = tl.reshape(byte.to(tl.int32), (ROWS, GROUPS, 4, 2, 2))  # [..., word, byte // 2, byte % 2]
    even_bytes, odd_bytes = tl.split(b)
    b0, b2 = tl.split(even_bytes)
    b1, b3 = tl.split(odd_bytes)
    word = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)  # [ROWS, GROUPS, 4]
    e0, o0, e1, o1, e2, o2, e3, o3 = value_lookup(word, pairs_ptr, lut_ptr, ASM)
    # joins append their axis last: (parity, byte // 2, byte % 2) -> memory order (byte // 2, byte % 2, parity)
    v = tl.join(tl.join(tl.join(e0, o0), tl.join(e2, o2)), tl.join(tl.join(e1, o1), tl.join(e3, o3)))
    v = tl.permute(v, (0, 1, 2, 4, 5, 3))
    return tl.reshape(v, (ROWS, COLS)) * absmax[:, None]


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    lut_ptr,
    out_ptr,
    n_elements,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    ASM: tl.constexpr,
):
    """out[b * BLOCKSIZE + j] = round(NF4[code] * absmax[b]) for the program's BLOCKS blocks b."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    absmax = decode_absmax(
        absmax_ptr,
        nested_absmax_ptr,
        nested_offset_ptr,
        nested_code_ptr,
        block,
        block * BLOCKSIZE < n_elements,
        DOUBLE_QUANT,
    )

    # NOTE: masked on byte indices, not `2 * pair < n_elements`: Triton then proves the mask constant over
    # 16 bytes and loads them at once (tests/test_compile.py::test_dequantize_kernels_fit_the_issue_and_l1_budgets)
    pair = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + pair, mask=pair < n_bytes, other=0x77)
    out = _scaled_values(byte, pairs_ptr, lut_ptr, absmax, BLOCKS, BLOCKSIZE, ASM)

    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out = round_to(out, out_ptr.dtype.element_ty, SOFT_BF16)
    tl.store(out_ptr + offs, out, mask=offs < n_elements)


def dequantize_configs() -> list[LaunchConfig]:
    """Every configuration `dequantize_nf4` can launch (for AOT checks)."""
    from nf4.format import BLOCKSIZES

    out = []
    for blocksize in BLOCKSIZES:
        meta = dequantize_config(blocksize)
        for dtype in TL_DTYPES:
            for double_quant in (False, True):
                out.append(
                    LaunchConfig(
                        name=f"dequantize_nf4[bs={blocksize},{ptr_type(dtype)[1:]},dq={int(double_quant)}]",
                        kernel=_dequantize_nf4_kernel,
                        signature={
                            **weight_signature(double_quant),
                            "pairs_ptr": "*i64",
                            "lut_ptr": "*i32",
                            "out_ptr": ptr_type(dtype),
                            "n_elements": "i64",
                            "n_bytes": "i64",
                        },
                        constexprs={
                            "BLOCKSIZE": blocksize,
                            "BLOCKS": meta["BLOCKS"],
                            "DOUBLE_QUANT": double_quant,
                            "SOFT_BF16": False,
                            "ASM": VALUE_ASM,
                        },
                        options={"num_warps": meta["num_warps"], "enable_fp_fusion": False},
                    )
                )
    return out


def dequantize_nf4(weight, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize the `NF4Tensor` `weight` (n elements) to a flat `dtype` tensor [n] on its device."""
    n = weight.numel()
    assert dtype in TL_DTYPES and n > 0, "validated by nf4.dequantize"
    out = torch.empty((n,), dtype=dtype, device=weight.device)
    nblocks = cdiv(n, weight.blocksize)
    meta = dequantize_config(weight.blocksize)
    nested = nested_pointers(weight)
    grid = (cdiv(nblocks, meta["BLOCKS"]),)
    _dequantize_nf4_kernel[grid](
        weight.packed,
        weight.absmax,
        *nested,
        nf4_pairs(weight.device),
        value_lut(weight.device),
        out,
        n,
        (n + 1) // 2,
        BLOCKSIZE=weight.blocksize,
        BLOCKS=meta["BLOCKS"],
        DOUBLE_QUANT=weight.double_quant,
        SOFT_BF16=INTERPRET,
        ASM="" if INTERPRET else VALUE_ASM,
        num_warps=meta["num_warps"],
        enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------------------------------
# W + scale * B @ A: the inference strategy for large M (one cuBLAS GEMM on the merged weight)

MERGE_BN = 128  # rows of W per program: with 64 columns and 8 warps, 32 elements per thread
MERGE_OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}
"""NOTE: 64 rows take a stack frame on sm_80 with 4 warps (tests/test_compile.py), 8-byte loads with 8."""


def merge_bk(blocksize: int) -> int:
    """Columns per program: 64, or 32 for blocksize 32 (a row's chunk in one block)."""
    return min(64, blocksize)


def merge_applies(weight) -> bool:
    """Whether `dequantize_lora` takes this weight: rows of whole chunks (K % merge_bk == 0)."""
    return weight.shape[1] % merge_bk(weight.blocksize) == 0


@triton.jit
def _dequantize_lora_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    lut_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    KB,
    r,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    log2_bs,
    scale,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    ASM: tl.constexpr,
):
    """out[n, k] = round(NF4[code(n, k)] * absmax[block(n, k)] + scale * sum_j B[n, j] * A[j, k]) for a
    [BN, BK] tile; the low-rank product in tf32 (its error on a small term is far below the rounding)."""
    HALF: tl.constexpr = BK // 2
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1).to(tl.int64) * BK
    in_n = rows < N
    first = rows * K + k0  # flat index of each row's first code in the tile (even: K % BK == 0)
    # byte offsets as rows * KB + k0 / 2 (KB = K / 2 divisible by 16 on the fast path): 16-byte loads
    byte = tl.load(
        packed_ptr + (rows * KB + k0 // 2)[:, None] + tl.arange(0, HALF)[None, :], mask=in_n[:, None], other=0x77
    )
    absmax = decode_absmax(
        absmax_ptr, nested_absmax_ptr, nested_offset_ptr, nested_code_ptr, first >> log2_bs, in_n, DOUBLE_QUANT
    )
    w = _scaled_values(byte, pairs_ptr, lut_ptr, absmax, BN, BK, ASM)

    cols = k0 + tl.arange(0, BK)
    offs_j = tl.arange(0, 16)
    delta = tl.zeros((BN, BK), dtype=tl.float32)
    for j0 in range(0, r, 16):
        in_j = offs_j < r - j0
        b = tl.load(
            b_ptr + rows[:, None] * stride_bn + (j0 + offs_j)[None, :] * stride_br,
            mask=in_n[:, None] & in_j[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + (j0 + offs_j).to(tl.int64)[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=in_j[:, None],
            other=0.0,
        )
        delta = tl.dot(to_f32(b, SOFT_BF16), to_f32(a, SOFT_BF16), delta, input_precision="tf32")
    out = round_to(w + delta * scale, out_ptr.dtype.element_ty, SOFT_BF16)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], out, mask=in_n[:, None])


def dequantize_lora_configs() -> list[LaunchConfig]:
    """Every configuration `dequantize_lora` can launch."""
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        for adapter, double_quant, bk in itertools.product((dtype, torch.float32), (False, True), (64, 32)):
            out.append(
                LaunchConfig(
                    name=f"dequantize_lora[{ptr_type(dtype)[1:]},adapter={ptr_type(adapter)[1:]},"
                    f"dq={int(double_quant)},BK={bk}]",
                    kernel=_dequantize_lora_kernel,
                    signature={
                        **weight_signature(double_quant),
                        "pairs_ptr": "*i64",
                        "lut_ptr": "*i32",
                        "a_ptr": ptr_type(adapter),
                        "b_ptr": ptr_type(adapter),
                        "out_ptr": ptr_type(dtype),
                        "N": "i32",
                        "K": "i64",
                        "KB": "i64",
                        "r": "i32",
                        "stride_ar": "i64",
                        "stride_ak": "i64",
                        "stride_bn": "i64",
                        "stride_br": "i64",
                        "log2_bs": "i32",
                        "scale": "fp32",
                    },
                    constexprs={
                        "BN": MERGE_BN,
                        "BK": bk,
                        "DOUBLE_QUANT": double_quant,
                        "SOFT_BF16": False,
                        "ASM": VALUE_ASM,
                    },
                    options=MERGE_OPTIONS,
                    aligned_only=True,
                )
            )
    return out


def dequantize_lora(weight, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """dequant(weight) + scale * b @ a as `dtype` [N, K], rounded once per element (as PEFT's
    `merge_and_unload` of a 16-bit checkpoint). Needs `merge_applies`; a [r, K], b [N, r] in one float dtype."""
    n, k = weight.shape
    assert merge_applies(weight) and dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    nested = nested_pointers(weight)
    bk = merge_bk(weight.blocksize)
    _dequantize_lora_kernel[(cdiv(n, MERGE_BN), k // bk)](
        weight.packed,
        weight.absmax,
        *nested,
        nf4_pairs(weight.device),
        value_lut(weight.device),
        a,
        b,
        out,
        n,
        k,
        k // 2,
        a.shape[0],
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        weight.blocksize.bit_length() - 1,
        float(scale),
        BN=MERGE_BN,
        BK=bk,
        DOUBLE_QUANT=weight.double_quant,
        SOFT_BF16=INTERPRET,
        ASM="" if INTERPRET else VALUE_ASM,
        **MERGE_OPTIONS,
    )
    return out
