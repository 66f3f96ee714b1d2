"""The one place that decides whether an operation runs the Triton kernels or the torch code.

CUDA tensors run the kernels; CPU tensors the torch reference or `nf4.cpu`, or with `TRITON_INTERPRET=1`
the kernels in Triton's interpreter (how tests check kernels without a GPU). Callers validate inputs;
`nf4.kernels` is imported here and nowhere else in `nf4`. The weight comes as one NF4Tensor.
"""

from __future__ import annotations

import functools

import torch

from nf4 import reference
from nf4.codebook import dynamic_map, nearest_thresholds
from nf4.env import INTERPRET

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Activation dtypes the matmul kernel takes (float64 runs the reference, for gradcheck)."""


def use_kernels(device: torch.device) -> bool:
    """True when tensors on `device` run the Triton kernels."""
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
    """(packed, absmax) of `x`; a NaN or inf makes its block's absmax so (the caller checks)."""
    if use_kernels(x.device):
        from nf4.kernels import quantize_nf4

        return quantize_nf4(x, blocksize)
    return reference.quantize_ref(x, blocksize)


def double_quantize(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, nested absmax) of `absmax - offset`."""
    thresholds = tables(absmax.device)["thresholds"]
    if use_kernels(absmax.device):
        from nf4.kernels import quantize_absmax

        return quantize_absmax(absmax, offset, thresholds)
    return reference.double_quantize_ref(absmax, offset, thresholds)


def dequantize(q, dtype: torch.dtype) -> torch.Tensor:
    """`q` as a `dtype` tensor of its shape."""
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
    """`x2 @ W^T (x2 @ W if trans) + (u @ v) * lora_scale [* mask] + bias`, W = dequant(q) [N, K] (shapes:
    `nf4_matmul`). `a` [r, IN] instead of u: u = x2 @ a^T, in the decode kernel where it runs."""
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


def matmul_adapters(x2, q, a_bank, v_bank, scales, index, bias=None) -> torch.Tensor:
    """Each row its own adapter: `y[m] = x2[m] @ W^T + bias + scales[i] * (x2[m] @ a_bank[i]^T) @ v_bank[i]`,
    i = index[m] (none where index[m] < 0). a_bank [S, R, K], v_bank [S, R, N] (B^T per slot), scales [S],
    index [M] in [-1, S) (unchecked here). On a GPU one fused call, no host read (`nf4.kernels.adapters`)."""
    q = q.decodable()
    if use_kernels(x2.device) and x2.dtype in KERNEL_DTYPES:
        from nf4.kernels.adapters import nf4_matmul_adapters

        def kernel_dtype(t):  # the kernels read x's dtype or float32 as they are; others once as float32
            return t if t is None or t.dtype in (x2.dtype, torch.float32) else t.float()

        a_bank, v_bank, bias = (kernel_dtype(t) for t in (a_bank, v_bank, bias))
        return nf4_matmul_adapters(x2, q, a_bank.contiguous(), v_bank.contiguous(), scales.float(), index, bias)
    from nf4.cpu import add_adapter_rows_

    return add_adapter_rows_(matmul(x2, q, bias=bias), x2, a_bank, v_bank, scales, index)


def dora_kernels(z: torch.Tensor, g: torch.Tensor) -> bool:
    """True where DoRA's elementwise passes over `z` [M, N] (scale `g` [N]) run fused
    (`nf4.kernels.dora`): the kernel device and dtypes, float32 g."""
    return use_kernels(z.device) and z.dtype in KERNEL_DTYPES and g.dtype == torch.float32 and z.dim() == 2


def dora_scale(z, g, bias=None, extra=None) -> torch.Tensor:
    """`nf4.kernels.dora.dora_scale` (`dora_kernels` must hold): round(z * g + extra + bias), one pass."""
    from nf4.kernels.dora import dora_scale as fused

    return fused(
        z.contiguous(), g, None if bias is None else bias.float(), None if extra is None else extra.contiguous()
    )


def dora_grad(dy, z, g) -> tuple[torch.Tensor, torch.Tensor]:
    """`nf4.kernels.dora.dora_grad` (`dora_kernels` must hold): (round(dy * g), float32 sum_m dy * z)."""
    from nf4.kernels.dora import dora_grad as fused

    return fused(dy.contiguous(), z.contiguous(), g)
