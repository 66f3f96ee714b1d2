"""NF4 dequantization, with the double-quantized absmax decoded in the same kernel.

For n elements in blocks of `blocksize`:

    absmax[b] = float32(float32(nested_code[q[b]] * nested_absmax[b // 256]) + offset)   (double quant)
              = absmax[b]                                                              (plain)
    out[2k]   = round(NF4[packed[k] >> 4]  * absmax[b])      one float32 product, one rounding to
    out[2k+1] = round(NF4[packed[k] & 15]  * absmax[b])      the output dtype (fp32/fp16/bf16)

Each program decodes BLOCKS whole blocks: it reads each packed byte once (16 bytes per load), looks
both nibbles up at once in the 256-entry pair table of the NF4 code (`nf4_pairs`), scales them by the
block's absmax (decoded once per block), interleaves the even and odd values and writes one contiguous
[BLOCKS, blocksize] tile. The absmax decode must not be contracted
into an FMA (that would round once instead of twice), so the kernel is built with fp fusion off.
Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import INTERPRET, TL_DTYPES, LaunchConfig, cdiv, nf4_pairs, ptr_type, round_to

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
def _dequantize_nf4_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_offset_ptr,
    nested_code_ptr,
    pairs_ptr,
    out_ptr,
    n_elements,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
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

    # NOTE: the mask is on byte indices (`pair < n_bytes`), not on `2 * pair < n_elements`: a contiguous
    # index against a bound divisible by 16 lets Triton prove the mask constant over 16 bytes and load
    # them at once (the element mask gave 8 predicated LDG.E.U8 per thread; sm_90 SASS, triton 3.9).
    pair = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + pair, mask=pair < n_bytes, other=0x77).to(tl.int32)
    entry = tl.load(pairs_ptr + byte)  # both nibbles' NF4 values in one 8-byte lookup
    hi = (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
    lo = (entry >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
    out = tl.reshape(tl.join(hi, lo), (BLOCKS, BLOCKSIZE))

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
                            "packed_ptr": "*u8",
                            "absmax_ptr": "*u8" if double_quant else "*fp32",
                            "nested_absmax_ptr": "*fp32",
                            "nested_offset_ptr": "*fp32",
                            "nested_code_ptr": "*fp32",
                            "pairs_ptr": "*i64",
                            "out_ptr": ptr_type(dtype),
                            "n_elements": "i64",
                            "n_bytes": "i64",
                        },
                        constexprs={
                            "BLOCKSIZE": blocksize,
                            "BLOCKS": meta["BLOCKS"],
                            "DOUBLE_QUANT": double_quant,
                            "SOFT_BF16": False,
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
    if weight.double_quant:  # the 0-d offset is passed as is: the kernel only needs its address
        nested = (weight.nested_absmax, weight.nested_offset, weight.nested_code)
    else:
        nested = (weight.absmax, weight.absmax, weight.absmax)  # never read when DOUBLE_QUANT is off
    grid = (cdiv(nblocks, meta["BLOCKS"]),)
    _dequantize_nf4_kernel[grid](
        weight.packed,
        weight.absmax,
        *nested,
        nf4_pairs(weight.device),
        out,
        n,
        (n + 1) // 2,
        BLOCKSIZE=weight.blocksize,
        BLOCKS=meta["BLOCKS"],
        DOUBLE_QUANT=weight.double_quant,
        SOFT_BF16=INTERPRET,
        num_warps=meta["num_warps"],
        enable_fp_fusion=False,
    )
    return out
