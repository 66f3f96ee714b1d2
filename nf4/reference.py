"""The fp32 torch reference for the NF4 format: the oracle of every kernel test, and the CPU path.

    packed  uint8   [(n + 1) // 2, 1]   element 2k in the high nibble, 2k+1 in the low
    absmax  float32 [ceil(n / blocksize)]   (the last block may be partial)

Quantize, per block b:   absmax[b] = max |x|;  xs = x * (1 / absmax[b]);  code = #{midpoints < xs}
Dequantize:              out = float32(NF4[code] * absmax[b]), rounded once to the output dtype.
Double quantization:     offset = mean(absmax), exactly (`absmax_offset`);  y = absmax - offset, in blocks of 256:
                         absmax2 = max |y|;  q = nearest(DYNAMIC, y * (1 / absmax2))
                         absmax ~= float32(float32(DYNAMIC[q] * absmax2) + offset)

A block with absmax outside [2**-64, 2**64] is scaled by an exact power of two before the reciprocal:
codes as with an unbounded exponent, not `x * inf` (tests/test_reference.py).
"""

from __future__ import annotations

import math

import torch

from nf4.codebook import NF4_CODE, nf4_midpoints
from nf4.format import NESTED_BLOCKSIZE

_SMALL, _LARGE = 2.0**-64, 2.0**64


def unit_scale(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """`blocks * (1 / absmax)` per row (IEEE reciprocal, extremes pre-scaled); all-zero rows give 0."""
    pre = torch.where(
        absmax < _SMALL,
        torch.full_like(absmax, _LARGE),
        torch.where(absmax > _LARGE, torch.full_like(absmax, _SMALL), torch.ones_like(absmax)),
    )
    inv = torch.where(absmax > 0, torch.reciprocal(absmax * pre), torch.zeros_like(absmax))
    return (blocks * pre[:, None]) * inv[:, None]


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [ceil(n / blocksize), blocksize], zero-padded."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [n] -> packed [(n + 1) // 2, 1]; odd n pads a low nibble of 7."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4 | pairs[:, 1]).view(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed [(n + 1) // 2, 1] -> int64 codes [n]."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[:n].long()


QUANT_CHUNK = 1 << 18
"""Elements per `quantize_ref` step (a multiple of every blocksize). NOTE: bounds the temporaries (~20
bytes per element) that dominate a model load's peak (benchmarks/results/2026-11-30-cpu-load)."""


def quantize_ref(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, absmax) of `x` in row-major blocks; a NaN or inf makes its block's absmax so (callers check)."""
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    midpoints = nf4_midpoints().to(flat.device)
    for start in range(0, n, QUANT_CHUNK):  # chunks start on a block and a byte boundary
        part = flat[start : start + QUANT_CHUNK].to(torch.float32)
        blocks = _blocks(part, blocksize)
        block_max = blocks.abs().amax(dim=1)
        scaled = unit_scale(blocks, block_max)
        codes = torch.searchsorted(midpoints, scaled.reshape(-1)).to(torch.uint8)[: part.numel()]
        absmax[start // blocksize : start // blocksize + block_max.numel()] = block_max
        packed[start // 2 : start // 2 + (part.numel() + 1) // 2] = pack_nibbles(codes)
    return packed, absmax


def dequantize_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    code: torch.Tensor | None = None,
) -> torch.Tensor:
    """`NF4[code] * absmax[block]` in fp32, rounded once to `dtype`; `absmax` fp32 (decoded)."""
    n = math.prod(shape)
    table = (NF4_CODE if code is None else code).to(device=packed.device, dtype=torch.float32)
    values = table[unpack_nibbles(packed, n)]
    out = (_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[:n]
    return out.to(dtype).reshape(shape)


def absmax_offset(absmax: torch.Tensor) -> torch.Tensor:
    """mean(absmax), fp32 scalar, the same on every device and block order. NOTE: a float32 mean depends
    on the reduction order: CUDA and CPU codes differed (benchmarks/results/2026-11-29-h200/README.md,
    finding 2). Here absmax is scaled below 2**k (k >= 30), rounded to int64 and summed exactly."""
    n = absmax.numel()
    top = float(absmax.max())
    if top == 0.0:
        return absmax.new_zeros(())
    k = 62 - n.bit_length()  # n * 2**k < 2**62: the int64 sum cannot overflow
    e = math.frexp(top)[1]  # top < 2**e
    units = torch.round(absmax.double() * math.ldexp(1.0, k - e)).long()
    return (units.sum().double() * math.ldexp(1.0, e - k) / n).float()


def double_quantize_ref(
    absmax: torch.Tensor, offset: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [nb], nested absmax [ceil(nb / 256)]) of `absmax - offset`; `thresholds` from
    `codebook.nearest_thresholds`: exact nearest entry, ties to the lower."""
    y = absmax - offset
    blocks = _blocks(y, NESTED_BLOCKSIZE)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = unit_scale(blocks, absmax2).reshape(-1)[: y.numel()]
    codes = torch.searchsorted(thresholds.to(y.device), scaled).to(torch.uint8)
    return codes, absmax2


def dequantize_absmax_ref(
    codes: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    nested_code: torch.Tensor,
    nested_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`float32(float32(map[q] * absmax2[b // 256]) + offset)`, each result rounded to a 16-bit
    `nested_dtype` instead, as bitsandbytes computes for such a checkpoint."""
    scale = absmax2.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    if nested_dtype == torch.float32:
        return nested_code[codes.long()] * scale + offset
    product = (nested_code[codes.long()] * scale).to(nested_dtype).float()
    return (product + offset).to(nested_dtype).float()


def decoded_absmax(q) -> torch.Tensor:
    """`q`'s fp32 absmax, decoded if double-quantized."""
    if not q.double_quant:
        return q.absmax
    return dequantize_absmax_ref(q.absmax, q.nested_absmax, q.nested_offset, q.nested_code, q.meta.nested_dtype)


def matmul_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    trans: bool = False,
    u: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """`x @ w^T (x @ w if trans) + (u @ v) * lora_scale [* mask] + bias` in fp32 (fp64 for fp64 x),
    rounded once to x's dtype; `w` dequantized."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = w.to(ct)
    y = x.to(ct) @ (w if trans else w.t())
    return matmul_epilogue(y, u, v, bias, mask, lora_scale).to(x.dtype)


def matmul_epilogue(y, u=None, v=None, bias=None, mask=None, lora_scale: float = 1.0) -> torch.Tensor:
    """`y + (u @ v) * lora_scale [* mask] + bias` in y's dtype."""
    ct = y.dtype
    if u is not None and u.shape[-1] > 0:
        lora = (u.to(ct) @ v.to(ct)) * lora_scale
        y = y + (lora * mask.to(ct) if mask is not None else lora)
    if bias is not None:
        y = y + bias.to(ct)
    return y


def adapter_rows_ref(
    x2: torch.Tensor, a_bank: torch.Tensor, v_bank: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """float32 [M, N]: row m's `scales[i] * (x2[m] @ a_bank[i]^T) @ v_bank[i]`, i = index[m]; 0 where
    index[m] < 0 (a base-only row). a_bank [S, R, K], v_bank [S, R, N] (B^T per slot), scales [S].
    A gather per row: the oracle of the adapter-bank paths (small shapes)."""
    slot = index.long().clamp(min=0)
    u = torch.einsum("mk,mrk->mr", x2.float(), a_bank.float()[slot])
    y = torch.einsum("mr,mrn->mn", u, v_bank.float()[slot]) * scales.float()[slot][:, None]
    return torch.where(index[:, None] >= 0, y, 0.0)
