"""Public `quantize` / `dequantize`: validation at the boundary, then `nf4.dispatch` (kernels and
reference give the same bytes and values, bit for bit).
"""

from __future__ import annotations

import math

import torch

from nf4 import dispatch, reference
from nf4.format import FLOAT_DTYPES, check_blocksize
from nf4.tensor import NF4Tensor

_FLOATS = tuple(FLOAT_DTYPES.values())
# Above this absmax a double-quantized absmax could decode past float32's range: check it.
_DQ_OVERFLOW_CHECK = 2.0**120


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _FLOATS:
        remedy = " (convert with .float() first)" if dtype.is_floating_point else ""
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}{remedy}")


def _non_finite_error(tensor: torch.Tensor) -> ValueError:
    bad = ~torch.isfinite(tensor.detach())
    nan = int(torch.isnan(tensor.detach()).sum())
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return ValueError(
        f"cannot quantize a tensor with non-finite values: {nan} NaN and {int(bad.sum()) - nan} inf, "
        f"the first at index {first}; NF4 has no code for them. Fix or mask them before quantizing."
    )


def quantize(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float tensor to NF4 in blocks of `blocksize` consecutive (row-major) elements.

    Args:
        tensor: float32, float16 or bfloat16, any shape, finite, non-empty; not modified, no autograd.
        blocksize: one of `BLOCKSIZES` (32 ... 4096; checkpoints use 64).
        double_quant: 8-bit absmax too (QLoRA): 4.127 instead of 4.5 bits per parameter at blocksize 64.
    Returns:
        An `NF4Tensor` on the tensor's device, the bytes of bitsandbytes' `quantize_4bit(...,
        quant_type="nf4", compress_statistics=double_quant)`.
    Raises:
        TypeError for another dtype; ValueError for a bad blocksize, an empty tensor, NaN / inf, or an
        absmax that double quantization would overflow.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(tensor).__name__}")
    _check_dtype(tensor.dtype, "quantize: the tensor's dtype")
    blocksize = check_blocksize(blocksize)
    if tensor.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {list(tensor.shape)})")
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    x = tensor.detach()
    packed, absmax = dispatch.quantize_blocks(x, blocksize)
    top = float(absmax.max())  # NaN if any block held a NaN, inf if any held an inf
    if not math.isfinite(top):
        raise _non_finite_error(x)

    common = dict(shape=x.shape, dtype=x.dtype, blocksize=blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, **common)

    offset = reference.absmax_offset(absmax)
    codes, absmax2 = dispatch.double_quantize(absmax, offset)
    q = NF4Tensor(
        packed,
        codes,
        **common,
        nested_absmax=absmax2,
        nested_offset=offset,
        nested_code=dispatch.tables(x.device)["nested_code"].clone(),
    )
    if top > _DQ_OVERFLOW_CHECK and not bool(torch.isfinite(decode_absmax(q)).all()):
        raise ValueError(
            f"double quantization overflows float32 for a tensor this large (max |x| = {top:.3e}); "
            "quantize it with double_quant=False"
        )
    return q


def decode_absmax(q: NF4Tensor) -> torch.Tensor:
    """The float32 [nblocks] absmax of `q`, decoded if double-quantized."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"decode_absmax expects an NF4Tensor (from nf4.quantize), got {type(q).__name__}")
    return reference.decoded_absmax(q)


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`q` as a tensor of its original shape in `dtype` (default: the original dtype): `NF4[code] * absmax`
    in float32, rounded once. TypeError for a non-NF4Tensor or another dtype."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize expects an NF4Tensor (from nf4.quantize), got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    _check_dtype(dtype, "dequantize: dtype")
    return dispatch.dequantize(q, dtype)
