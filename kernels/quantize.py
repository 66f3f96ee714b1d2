"""Blockwise NF4 quantization in one pass, and the second-level quantization of the absmax.

    absmax[b] = max |x[block b]|                                 float32 [ceil(n / blocksize)]
    xs        = x * div_rn(1, absmax[b])                         IEEE reciprocal, then multiply
    code      = #{i : mid[i] < xs}, mid = float32 NF4 midpoints   (a tie goes to the lower code)
    packed[k] = code[2k] << 4 | code[2k+1]                        uint8 [(n + 1) // 2]

x (fp32/fp16/bf16, row-major) is read once. NaN in a block gives a NaN absmax; extreme blocks are pre-scaled
by a power of two (`nf4.reference.unit_scale`): codes equal the reference's bit for bit. `quantize_absmax`:
(absmax - offset) per 256 blocks, scaled by its max |.|, to the nearest map entry by binary search.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nf4.kernels.common import IEEE_DIV_STACK, INTERPRET, TL_DTYPES, LaunchConfig, cdiv, ptr_type, to_f32

_TARGET_ELEMENTS = 4096  # elements per program: 32 per thread with 4 warps (16-byte loads of 16-bit x)
_NESTED = 256


def quantize_config(blocksize: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Whole blocks per program and warps for one blocksize and input dtype. NOTE: float32 at blocksize
    1024 / 2048 takes 8 warps: 4 took stack frames on sm_90 (tests/test_compile.py)."""
    blocks = max(1, _TARGET_ELEMENTS // blocksize)
    fits = blocks * blocksize <= _TARGET_ELEMENTS and not (dtype == torch.float32 and blocksize in (1024, 2048))
    warps = 4 if fits else 8
    return {"BLOCKS": blocks, "num_warps": warps}


@triton.jit
def _unit_scale(x, absmax):
    """x * (1 / absmax), extreme absmax pre-scaled by a power of two (`nf4.reference.unit_scale`); 0 if absmax is 0."""
    pre = tl.where(absmax < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
    pre = tl.where(absmax > 1.8446744073709552e19, 5.421010862427522e-20, pre)
    inv = tl.where(absmax > 0.0, tl.math.div_rn(1.0, tl.where(absmax > 0.0, absmax * pre, 1.0)), 0.0)
    return (x * pre) * inv


BUCKET_MAGIC = tl.constexpr(8388624.0)
"""2**23 + 16: in fp32, `16 * xs + BUCKET_MAGIC` leaves round(16 * xs + 16) in the low mantissa bits."""
BUCKETS = tl.constexpr(64)
"""Entries of the bucket table (r is 0 .. 32 for |xs| <= 1; the mask keeps any r in range)."""


def bucket_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [BUCKETS]: entry r = (base[r] << 32) | float32 bits of mid[r] for the xs with
    round-half-even(16 * xs + 16) == r; base[r] = midpoints below the bucket, mid[r] the one inside or +inf.
    Buckets are narrower than the midpoints' gaps, so #{mid < xs} = base[r] + (xs > mid[r]) exactly
    (tests/test_kernels.py)."""
    from nf4.codebook import nf4_midpoints

    mids = nf4_midpoints().double()
    bits = torch.full((BUCKETS.value,), 0x7F800000, dtype=torch.int64)  # +inf: no midpoint in the bucket
    base = torch.zeros(BUCKETS.value, dtype=torch.int64)
    for r in range(33):
        lo, hi = (r - 16.5) / 16, (r - 15.5) / 16
        inside = ((mids >= lo) & (mids <= hi)).nonzero().flatten()
        assert inside.numel() <= 1, "a bucket holds at most one midpoint"
        base[r] = int((mids < lo).sum())
        if inside.numel():
            mid = mids[inside[0]].to(torch.float32)
            bits[r] = int(mid.view(torch.int32)) & 0xFFFFFFFF
    return ((base << 32) | bits).to(device)


@triton.jit
def _nf4_codes(xs, table_ptr):
    """#{NF4 midpoints < xs} (int32): one FFMA to the bucket, one 8-byte `bucket_table` gather, compare, add.
    NOTE: ALU-bound, ~81 % of copy bandwidth (benchmarks/results/2026-12-07-static-model-255c09d9a818/)."""
    v = tl.fma(xs, 16.0, BUCKET_MAGIC)
    entry = tl.load(table_ptr + (v.to(tl.int32, bitcast=True) & (BUCKETS - 1)))
    mid = (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    # xs > mid as the sign bit of mid - xs (its sign is exact; equal values give +0: a tie goes to the lower
    # code; mid = +inf gives +inf), moved down by a multiply-high: FADD and IMAD.HI issue on the FMA pipe,
    # where a compare and a select would take two ALU-pipe slots
    above = tl.umulhi((mid - xs).to(tl.uint32, bitcast=True), 2).to(tl.int32)
    return (entry >> 32).to(tl.int32) + above


@triton.jit
def _quantize_nf4_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    table_ptr,
    n_elements,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """absmax[b] = max |x[block b]| and packed[k] = code[2k] << 4 | code[2k + 1] for the program's blocks."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offs = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = to_f32(tl.load(x_ptr + offs, mask=offs < n_elements, other=0.0), SOFT_BF16)

    absmax = tl.max(tl.abs(x), axis=1)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    absmax = tl.where(has_nan, float("nan"), absmax)

    even, odd = tl.split(tl.reshape(_unit_scale(x, absmax[:, None]), (BLOCKS, HALF, 2)))
    byte = (_nf4_codes(even, table_ptr) << 4) | _nf4_codes(odd, table_ptr)

    # NOTE: contiguity capped at 4 bytes, the codes of a thread's 8 loaded elements: 16-byte stores made
    # Triton regroup x through shared memory
    # (tests/test_compile.py::test_quantize_kernel_loads_16_bytes_and_stays_issue_bound)
    pair = tl.max_contiguous(block[:, None] * HALF + tl.arange(0, HALF)[None, :], (1, 4))
    tl.store(packed_ptr + pair, byte.to(tl.uint8), mask=pair < n_bytes)  # byte indices
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
    """codes[i] = nearest map entry of (absmax[i] - offset) / absmax2[i // NESTED]; absmax2 = max |.| per
    NESTED blocks."""
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
        for dtype in TL_DTYPES:
            meta = quantize_config(blocksize, dtype)
            out.append(
                LaunchConfig(
                    name=f"quantize_nf4[bs={blocksize},{ptr_type(dtype)[1:]}]",
                    kernel=_quantize_nf4_kernel,
                    signature={
                        "x_ptr": ptr_type(dtype),
                        "packed_ptr": "*u8",
                        "absmax_ptr": "*fp32",
                        "table_ptr": "*i64",
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


@functools.cache
def _bucket_table(device: torch.device) -> torch.Tensor:
    return bucket_table(device)


def quantize_nf4(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `x` (any shape, row-major): (packed uint8 [(n + 1) // 2, 1], absmax float32
    [ceil(n / blocksize)])."""
    assert x.dtype in TL_DTYPES and x.numel() > 0, "validated by nf4.quantize"
    x = x.contiguous().view(-1)
    n = x.numel()
    nblocks = cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=x.device)
    meta = quantize_config(blocksize, x.dtype)
    grid = (cdiv(nblocks, meta["BLOCKS"]),)
    _quantize_nf4_kernel[grid](
        x,
        packed,
        absmax,
        _bucket_table(x.device),
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
