"""Code tables (float32): NormalFloat (NF4 and its k-bit family), bitsandbytes' FP4, and the signed 8-bit
dynamic map that double-quantizes the absmax.

`NF4_CODE` ships as literals; `normal_float_code(4)` re-derives it as bitsandbytes does, bit for bit
(tests/test_codebook.py):

    p_pos = linspace32(offset, 0.5, 2**(k-1) + 1)[:-1]      2**(k-1) positive quantiles
    p_neg = linspace32(offset, 0.5, 2**(k-1))[:-1]          2**(k-1) - 1 negative quantiles
    values = sort(float32(norm.ppf(p_pos)) ++ [0] ++ float32(-norm.ppf(p_neg)))
    code = values / max(values)                              (float32 division)

`linspace32` is torch's float32 linspace; `np.linspace` or a float64 division is an ulp off in places.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# QLoRA's offset for k = 4: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), rounded to 7 digits.
NF4_OFFSET = 0.9677083

_NF4_LITERALS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

NF4_CODE = torch.tensor(_NF4_LITERALS, dtype=torch.float32)
"""The 16 NF4 values; a value's 4-bit code is its index. Read-only by convention."""

# Magnitudes of bitsandbytes' FP4 codes 0..7 (sign bit 8 makes codes 8..15 negative).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

FP4_CODE = torch.tensor([m / 12.0 for m in _FP4_MAGNITUDES] + [-m / 12.0 for m in _FP4_MAGNITUDES], dtype=torch.float32)
"""bitsandbytes' FP4 values by code (for comparisons only)."""


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """torch's CPU float32 linspace: the first half `start + i*step`, the second `end - (steps-1-i)*step`.
    NOTE: torch fuses each into one FMA (one rounding), reproduced by a float64 sum rounded once; matches
    torch on the derivations' points (tests/test_codebook.py), elsewhere torch's SIMD path decides."""
    if steps < 2:
        raise ValueError(f"linspace32 needs at least 2 steps, got {steps}")
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    halfway = steps // 2
    head = np.float64(start32) + i[:halfway] * step
    tail = np.float64(end32) - (steps - 1 - i[halfway:]) * step
    return np.concatenate([head, tail]).astype(np.float32)


def normal_float_offset(bits: int) -> float:
    """QLoRA's outermost quantile, 1 - (1/(2(2^k - 1)) + 1/(2 * 2^k)) / 2 (k = 4: `NF4_OFFSET` unrounded)."""
    levels = 2**bits
    return 1.0 - 0.5 * (1.0 / (2 * (levels - 1)) + 1.0 / (2 * levels))


@functools.cache
def _normal_float_code(bits: int, offset: float) -> tuple[float, ...]:
    from scipy.stats import norm

    half = 2 ** (bits - 1)
    positive = norm.ppf(linspace32(offset, 0.5, half + 1)[:-1].astype(np.float64))
    negative = -norm.ppf(linspace32(offset, 0.5, half)[:-1].astype(np.float64))
    values = np.concatenate([positive, [0.0], negative]).astype(np.float32)
    values.sort()
    return tuple(float(v) for v in (values / values.max()).astype(np.float32))


def normal_float_code(bits: int = 4, offset: float | None = None) -> torch.Tensor:
    """k-bit NormalFloat table [2**bits], sorted, exact zero, max 1.0; `bits` in 2..8. `offset` defaults
    to `NF4_OFFSET` for 4 bits, else `normal_float_offset(bits)`. ValueError out of range."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if offset is None:
        offset = NF4_OFFSET if bits == 4 else normal_float_offset(bits)
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset}")
    return torch.tensor(_normal_float_code(bits, float(offset)), dtype=torch.float32)


@functools.cache
def _dynamic_map() -> tuple[float, ...]:
    # NOTE: torch.linspace, not linspace32, as bitsandbytes builds it: at 65 points torch's rounding
    # depends on the SIMD width, and the same call keeps the map bit-identical to bitsandbytes' on any
    # machine (tests/test_codebook.py). The map travels with every tensor: loaders never rebuild it.
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (i - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values.sort()
    return tuple(values)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map [256], sorted: for i = 0..6 the midpoints of
    linspace(0.1, 1, 2**i + 1) times +-10**(i-6), plus 0.0 (index 127) and 1.0 (index 255)."""
    return torch.tensor(_dynamic_map(), dtype=torch.float32)


def nearest_thresholds(code: torch.Tensor) -> torch.Tensor:
    """[len(code) - 1] thresholds: the nearest entry of sorted `code` to v (ties low) is the count below v.
    NOTE: exact midpoints rounded down; a float32 `(a + b) / 2` can misround (tests/test_codebook.py)."""
    c = code.detach().cpu().to(torch.float64).numpy()
    mid = (c[:-1] + c[1:]) / 2.0
    down = mid.astype(np.float32)
    above = down.astype(np.float64) > mid
    down[above] = np.nextafter(down[above], np.float32(-np.inf))
    return torch.from_numpy(down)


def nf4_midpoints() -> torch.Tensor:
    """The 15 float32 midpoints of the NF4 table, as bitsandbytes computes them (ties go low)."""
    return (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
