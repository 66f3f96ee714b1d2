"""The one place that decides whether an operation runs the Triton kernels or the torch code.

CUDA tensors run the Triton kernels. CPU tensors run the torch reference (or its faster compiled CPU
forms in `nf4.cpu`), unless `TRITON_INTERPRET=1` was set in the environment before `nf4` was imported:
then they run the same Triton kernels through Triton's CPU interpreter (how the test suite checks the
kernels without a GPU). Callers (`nf4.api`, `nf4.lora`) validate their inputs, then call one of the
functions below; `nf4.kernels` is imported here and nowhere else in `nf4`.

Every function takes the quantized weight as one `NF4Tensor` handle and reads its metadata
(`q.double_quant`, `q.blocksize`, `q.shape`) from it.
"""

from __future__ import annotations

import functools

import torch

from nf4 import reference
from nf4.codebook import dynamic_map, nearest_thresholds
from nf4.env import INTERPRET

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Activation dtypes the matmul kernel takes (float64 runs the reference, e.g. for gradcheck)."""


def use_kernels(device: torch.device) -> bool:
    """True when tensors on `device` run the Triton kernels, False for the torch code."""
    if device.type == "cuda":
        return True
    return INTERPRET and device.type == "cpu"


@functools.cache
def tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Read-only constant tables, built once per device."""
    nested = dynamic_map()
    return {
        "nested_code": nested.to(device),
        "thresholds": nearest_thresholds(nested).to(device),
    }


def quantize_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n + 1) // 2, 1], absmax float32 [nblocks]) of float `x`; a block holding a NaN or
    inf gets a NaN or inf absmax (the caller checks)."""
    if use_kernels(x.device):
        from nf4.kernels import quantize_nf4

        return quantize_nf4(x, blocksize)
    return reference.quantize_ref(x, blocksize)


def double_quantize(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [nb], nested absmax float32 [ceil(nb / 256)]) of `absmax - offset`."""
    thresholds = tables(absmax.device)["thresholds"]
    if use_kernels(absmax.device):
        from nf4.kernels import quantize_absmax

        return quantize_absmax(absmax, offset, thresholds)
    return reference.double_quantize_ref(absmax, offset, thresholds)


def dequantize(q, dtype: torch.dtype) -> torch.Tensor:
    """`q` (an NF4Tensor) as a `dtype` tensor of its shape."""
    q = q.decodable()
    if use_kernels(q.device):
        from nf4.kernels import dequantize_nf4

        return dequantize_nf4(q, dtype).view(q.shape)
    absmax = reference.decoded_absmax(q)
    if q.device.type == "cpu":
        from nf4.cpu import dequantize_cpu

        flat = dequantize_cpu(q.packed, absmax, q.numel(), q.blocksize, dtype)
        if flat is not None:
            return flat.view(q.shape)
    return reference.dequantize_ref(q.packed, absmax, q.blocksize, q.shape, dtype, q.code)


def matmul(x2, q, trans=False, u=None, v=None, bias=None, mask=None, lora_scale: float = 1.0, a=None) -> torch.Tensor:
    """`x2 @ W^T` (`x2 @ W` with `trans`) + `(u @ v) * lora_scale [* mask]` + `bias`, W = dequant(q) [N, K];
    see `nf4.kernels.matmul.nf4_matmul` for the shapes. `a` [r, IN] instead of u means u = x2 @ a^T
    (computed inside the decode kernel where that runs, else first, with torch in x2's dtype)."""
    q = q.decodable()
    if use_kernels(x2.device) and x2.dtype in KERNEL_DTYPES:
        from nf4.kernels.matmul import nf4_matmul

        return nf4_matmul(x2, q, trans=trans, u=u, v=v, bias=bias, mask=mask, lora_scale=lora_scale, a=a)
    if a is not None:
        u = x2 @ a.to(x2.dtype).t()
    if x2.device.type == "cpu":
        from nf4.cpu import matmul_cpu

        y = matmul_cpu(x2, q, trans, u, v, bias, mask, lora_scale)
        if y is not None:
            return y
    w = dequantize(q, torch.float32)
    return reference.matmul_ref(x2, w, trans, u, v, bias, mask, lora_scale)
