"""Blockwise NF4 quantization in one pass, and the second-level quantization of the absmax.

Quantize (`quantize_nf4`), for n elements of x (fp32/fp16/bf16, flattened row-major), per block b of
`blocksize` elements:

    absmax[b] = max |x|                                              float32 [ceil(n / blocksize)]
    xs        = x * div_rn(1, absmax[b])                             IEEE reciprocal, then multiply
    code      = #{i : mid[i] < xs}, mid = float32 NF4 midpoints       (a tie goes to the lower code)
    packed[k] = code[2k] << 4 | code[2k+1]                            uint8 [(n + 1) // 2]

Each program loads BLOCKS whole blocks as a [BLOCKS, blocksize] tile, splits it into even and odd
elements, and writes the absmax and the packed bytes: x is read once. A block with a NaN gets a NaN
absmax (the caller raises); blocks of tiny or huge magnitude are pre-scaled by an exact power of two
(see `nf4.reference.unit_scale`), so codes match the reference bit for bit.

Double quantization (`quantize_absmax`): absmax - offset in blocks of 256, each scaled by its own
max |.| and rounded to the exact nearest entry of the 256-entry map by a branch-free binary search over
the 255 thresholds `nf4.codebook.nearest_thresholds(map)`.

Offsets are int64: tensors past 2**31 elements index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import IEEE_DIV_STACK, INTERPRET, TL_DTYPES, LaunchConfig, cdiv, ptr_type, to_f32

_TARGET_ELEMENTS = 4096  # elements per program: 32 per thread with 4 warps (16-byte loads of 16-bit x)
_NESTED = 256


def quantize_config(blocksize: int) -> dict[str, int]:
    """Meta-parameters for one blocksize: whole blocks per program and warps."""
    blocks = max(1, _TARGET_ELEMENTS // blocksize)
    return {"BLOCKS": blocks, "num_warps": 4 if blocks * blocksize <= _TARGET_ELEMENTS else 8}


@triton.jit
def _unit_scale(x, absmax):
    """x * (1 / absmax) (absmax broadcasts against x), exact power-of-two pre-scaling for extreme
    absmax (`nf4.reference.unit_scale`); where absmax is 0 the result is 0."""
    pre = tl.where(absmax < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
    pre = tl.where(absmax > 1.8446744073709552e19, 5.421010862427522e-20, pre)
    inv = tl.where(absmax > 0.0, tl.math.div_rn(1.0, tl.where(absmax > 0.0, absmax * pre, 1.0)), 0.0)
    return (x * pre) * inv


@triton.jit
def _nf4_codes(xs):
    """Number of the 15 NF4 midpoints strictly below each element of xs (int32), by binary search.

    The midpoints m0 < ... < m14 are float32 literals (`nf4.codebook.nf4_midpoints()`, bit for bit: the
    test compares this source with them). The code is `8*b3 + 4*b2 + 2*b1 + b0` with b3 = xs > m7,
    b2 = xs > m[8*b3 + 3], b1 = xs > m[8*b3 + 4*b2 + 1], b0 = xs > m[8*b3 + 4*b2 + 2*b1]: the count
    of midpoints below xs, since they are sorted (ties go to the lower code, as `>` is strict).
    NOTE: 4 comparisons and 11 selects of immediates per element instead of 15 compare-and-adds. sm_90
    SASS of quantize_nf4[bs=64,bf16] (`kernels/sass.quantize_report`): 75.5 instructions per element
    before (compare-and-adds, element masks, 16 elements per thread), 47.0 now (this search, byte-index
    masks, 32 elements per thread); the H200 issues ~20.9 per element in the time its 2.56 bytes move,
    so the kernel stays issue-bound: predicted ~45% of the copy bandwidth (measured 8% before, H200).
    """
    b3 = xs > 0.03979014977812767
    t2 = tl.where(b3, 0.3893125355243683, -0.33967941999435425)
    b2 = xs > t2
    t1 = tl.where(
        b3,
        tl.where(b2, 0.6427869200706482, 0.2035212516784668),
        tl.where(b2, -0.13791173696517944, -0.6106328964233398),
    )
    b1 = xs > t1
    t0 = tl.where(
        b3,
        tl.where(
            b2,
            tl.where(b1, 0.8614784479141235, 0.5016634464263916),
            tl.where(b1, 0.2920137643814087, 0.120255246758461),
        ),
        tl.where(
            b2,
            tl.where(b1, -0.045525018125772476, -0.23460739850997925),
            tl.where(b1, -0.4599952697753906, -0.8480963706970215),
        ),
    )
    b0 = xs > t0
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _quantize_nf4_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    n_elements,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = to_f32(tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0), SOFT_BF16)

    absmax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)

    even, odd = tl.split(tl.reshape(_unit_scale(x, absmax[:, None]), (BLOCKS, HALF, 2)))
    byte = (_nf4_codes(even) << 4) | _nf4_codes(odd)

    pair = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + pair, byte.to(tl.uint8), mask=pair < n_bytes)  # byte indices: 16-byte stores
    tl.store(absmax_ptr + block, absmax, mask=block * BLOCKSIZE < n_elements)


@triton.jit
def _quantize_absmax_kernel(
    absmax_ptr,
    offset_ptr,
    thresholds_ptr,
    codes_ptr,
    absmax2_ptr,
    n_blocks,
    NESTED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * NESTED + tl.arange(0, NESTED)
    mask = offs < n_blocks
    y = tl.load(absmax_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr)
    y = tl.where(mask, y, 0.0)
    absmax2 = tl.max(tl.abs(y), axis=0)
    v = _unit_scale(y, absmax2)

    # count of the 255 sorted thresholds below v, by binary search: t[idx + step - 1] < v -> idx += step
    idx = tl.zeros((NESTED,), dtype=tl.int32)
    for i in tl.static_range(8):
        step = (NESTED // 2) >> i
        t = tl.load(thresholds_ptr + idx + (step - 1))
        idx += tl.where(v > t, step, 0)
    tl.store(codes_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax2_ptr + pid, absmax2)


def quantize_configs() -> list[LaunchConfig]:
    """Every configuration `quantize_nf4` and `quantize_absmax` can launch (for AOT checks)."""
    from nf4.format import BLOCKSIZES

    out = []
    for blocksize in BLOCKSIZES:
        meta = quantize_config(blocksize)
        for dtype in TL_DTYPES:
            out.append(
                LaunchConfig(
                    name=f"quantize_nf4[bs={blocksize},{ptr_type(dtype)[1:]}]",
                    kernel=_quantize_nf4_kernel,
                    signature={
                        "x_ptr": ptr_type(dtype),
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "n_elements": "i64",
                        "n_bytes": "i64",
                    },
                    constexprs={"BLOCKSIZE": blocksize, "BLOCKS": meta["BLOCKS"], "SOFT_BF16": False},
                    options={"num_warps": meta["num_warps"], "enable_fp_fusion": False},
                    stack_ok=IEEE_DIV_STACK,
                )
            )
    out.append(
        LaunchConfig(
            name="quantize_absmax",
            kernel=_quantize_absmax_kernel,
            signature={
                "absmax_ptr": "*fp32",
                "offset_ptr": "*fp32",
                "thresholds_ptr": "*fp32",
                "codes_ptr": "*u8",
                "absmax2_ptr": "*fp32",
                "n_blocks": "i64",
            },
            constexprs={"NESTED": _NESTED},
            options={"num_warps": 4, "enable_fp_fusion": False},
            stack_ok=IEEE_DIV_STACK,
        )
    )
    return out


def quantize_nf4(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `x` (fp32/fp16/bf16, any shape; read in row-major order).

    Returns (packed uint8
    [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)]); a block holding NaN gets absmax NaN.
    """
    assert x.dtype in TL_DTYPES and x.numel() > 0, "validated by nf4.quantize"
    x = x.contiguous().view(-1)
    n = x.numel()
    nblocks = cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=x.device)
    meta = quantize_config(blocksize)
    grid = (cdiv(nblocks, meta["BLOCKS"]),)
    _quantize_nf4_kernel[grid](
        x,
        packed,
        absmax,
        n,
        (n + 1) // 2,
        BLOCKSIZE=blocksize,
        BLOCKS=meta["BLOCKS"],
        SOFT_BF16=INTERPRET,
        num_warps=meta["num_warps"],
        enable_fp_fusion=False,
    )
    return packed, absmax


def quantize_absmax(
    absmax: torch.Tensor, offset: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Double-quantize float32 [nb] `absmax` around the float32 scalar `offset`.

    `thresholds` float32 [255] from `nf4.codebook.nearest_thresholds(map)`. Returns (codes uint8 [nb],
    nested absmax float32 [ceil(nb / 256)]).
    """
    nb = absmax.numel()
    codes = torch.empty((nb,), dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty((cdiv(nb, _NESTED),), dtype=torch.float32, device=absmax.device)
    _quantize_absmax_kernel[(absmax2.numel(),)](
        absmax,
        offset,
        thresholds,
        codes,
        absmax2,
        nb,
        NESTED=_NESTED,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return codes, absmax2
