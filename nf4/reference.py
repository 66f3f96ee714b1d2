"""The fp32 torch reference for the NF4 format: quantize, dequantize, double-quantize.

It follows the format spec literally and is the oracle every kernel is tested against; it is also the
path CPU tensors take (unless the Triton interpreter is on). Layout, for n elements in blocks of
`blocksize` (the last block may be partial):

    packed  uint8   [(n + 1) // 2, 1]   element 2k in the high nibble, 2k+1 in the low nibble
    absmax  float32 [ceil(n / blocksize)]

Quantize, per block b:   absmax[b] = max |x|;  xs = x * (1 / absmax[b]);  code = #{midpoints < xs}
Dequantize:              out = float32(NF4[code] * absmax[b]), rounded once to the output dtype.
Double quantization:     offset = mean(absmax), exactly (`absmax_offset`);  y = absmax - offset, in blocks of 256:
                         absmax2 = max |y|;  q = nearest(DYNAMIC, y * (1 / absmax2))
                         absmax ~= float32(float32(DYNAMIC[q] * absmax2) + offset)

Extreme magnitudes: a block whose absmax is below 2**-64 (or above 2**64) is scaled by 2**64 (or
2**-64) before the reciprocal. Scaling by a power of two is exact, so every block whose reciprocal is a
normal float32 gets bit-identical codes, and blocks of subnormal or huge values get the codes an
unbounded exponent range would give instead of the garbage `x * inf` (see `unit_scale`).
"""

from __future__ import annotations

import math

import torch

from nf4.codebook import NF4_CODE, nf4_midpoints
from nf4.format import NESTED_BLOCKSIZE

_SMALL, _LARGE = 2.0**-64, 2.0**64


def unit_scale(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """`blocks * (1 / absmax)` per row, float32 [nb, bs]; all-zero rows map to 0.

    `blocks` float32 [nb, bs], `absmax` float32 [nb]. The reciprocal is IEEE (correctly rounded), and
    rows with absmax outside [2**-64, 2**64] are pre-scaled by an exact power of two (module docstring).
    """
    pre = torch.where(
        absmax < _SMALL,
        torch.full_like(absmax, _LARGE),
        torch.where(absmax > _LARGE, torch.full_like(absmax, _SMALL), torch.ones_like(absmax)),
    )
    inv = torch.where(absmax > 0, torch.reciprocal(absmax * pre), torch.zeros_like(absmax))
    return (blocks * pre[:, None]) * inv[:, None]


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [n] -> [ceil(n / blocksize), blocksize], zero-padded (zeros change no absmax)."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n] (values 0..15) -> packed uint8 [(n + 1) // 2, 1]; odd n pads a low nibble of 7."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4 | pairs[:, 1]).view(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 [(n + 1) // 2, 1] -> int64 codes [n]."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[:n].long()


QUANT_CHUNK = 1 << 18
"""Elements `quantize_ref` handles per step (a multiple of every blocksize): its float32 and int64
temporaries (~20 bytes per element) stay a few MB whatever the tensor's size. NOTE: measured with
`benchmarks/bench_load.py` (317M-parameter Llama, bf16, CPU): quantizing a 1024 x 4096 weight in one piece
took ~68 MiB of transient memory, a third of the whole load's peak."""


def quantize_ref(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `x` (any shape, fp32/fp16/bf16) in row-major blocks of `blocksize`.

    Returns (packed uint8 [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)]). A NaN or inf in a
    block makes that block's absmax NaN or inf (callers check); `x` is not modified.
    """
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
    """`out = NF4[code] * absmax[block]` in float32, rounded once to `dtype`, shaped `shape`.

    `absmax` is the float32 [nblocks] absmax (decode a double-quantized one first with
    `dequantize_absmax_ref`). `code` is the 16-entry table (defaults to `NF4_CODE`).
    """
    n = math.prod(shape)
    table = (NF4_CODE if code is None else code).to(device=packed.device, dtype=torch.float32)
    values = table[unpack_nibbles(packed, n)]
    out = (_blocks(values, blocksize) * absmax[:, None]).reshape(-1)[:n]
    return out.to(dtype).reshape(shape)


def absmax_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quantization offset: the mean of the float32 [nb] `absmax`, as a float32 scalar
    tensor on its device, a function of the set of values alone.

    The format (bitsandbytes) stores `offset = absmax.mean()` and loaders read it back, so any offset
    is valid; **ours** is the exact mean rounded to float32, the same on every device and for every
    order of the blocks. NOTE: a float32 mean depends on the device's reduction order: on an H200 the
    CUDA path stored 2.594714641571045 where the CPU gave 2.594714403152466 for one bf16 4096x4096
    weight, and 1024 nested absmax and 11 codes then differed
    (benchmarks/results/2026-11-29-h200/README.md, finding 2). Here every
    absmax is scaled by one power of two (exact) so that the largest is below 2**k, rounded to an
    int64 (error at most 2**-k of the largest, k >= 30), and the int64 values are summed: integer sums
    are exact, so no order or device changes a bit. The sum is then converted to float64 (correctly
    rounded), scaled back (exact), divided by nb (IEEE) and rounded to float32.
    """
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
    """Quantize `absmax - offset` (float32 [nb]) to 8-bit codes in blocks of 256.

    `thresholds` float32 [255] are `codebook.nearest_thresholds(map)` for the sorted 256-entry map, so
    a code is the exact nearest map entry (ties to the lower). Returns (codes uint8 [nb],
    nested absmax float32 [ceil(nb / 256)]).
    """
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
    """Decode double-quantized absmax: `float32(float32(map[q] * absmax2[b // 256]) + offset)`, with each
    of the two results rounded to `nested_dtype` instead where that is bfloat16 or float16 (what
    bitsandbytes computes for such a checkpoint: the product in float32, the sum in float32 from the
    rounded product, each rounded once, to nearest even)."""
    scale = absmax2.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    if nested_dtype == torch.float32:
        return nested_code[codes.long()] * scale + offset
    product = (nested_code[codes.long()] * scale).to(nested_dtype).float()
    return (product + offset).to(nested_dtype).float()


def decoded_absmax(q) -> torch.Tensor:
    """The float32 [nblocks] absmax of `q` (an NF4Tensor), decoding double quantization where present."""
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
    """The fused NF4 matmul's reference: one rounding to x's dtype at the end.

        y = x @ w^T (or x @ w with `trans`) + (u @ v) * lora_scale [* mask] + bias

    `x` [M, IN], `w` the dequantized weight [N, K], `u` [M, r], `v` [r, OUT], `bias` [OUT], `mask`
    [M, OUT] bool. Computed in float32 (float64 when x is float64), whatever the operands' dtypes.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = w.to(ct)
    y = x.to(ct) @ (w if trans else w.t())
    return matmul_epilogue(y, u, v, bias, mask, lora_scale).to(x.dtype)


def matmul_epilogue(y, u=None, v=None, bias=None, mask=None, lora_scale: float = 1.0) -> torch.Tensor:
    """`y + (u @ v) * lora_scale [* mask] + bias` in y's dtype (the fused matmul's epilogue)."""
    ct = y.dtype
    if u is not None and u.shape[-1] > 0:
        lora = (u.to(ct) @ v.to(ct)) * lora_scale
        y = y + (lora * mask.to(ct) if mask is not None else lora)
    if bias is not None:
        y = y + bias.to(ct)
    return y
