"""The NF4 linear layer with a LoRA adapter as one differentiable op, registered with torch.library.

    y = x @ dequant(W)^T + scaling * (x_d @ A^T) @ B^T + bias          x_d = x * mask / (1 - p)

with x [..., K], W an NF4Tensor [N, K] (frozen), A [r, K], B [N, r], bias [N], mask the dropout mask
(none when not training or p = 0). Backward, with g = scaling * dy @ B  [M, r]:

    dx    = dy @ dequant(W) + (g @ A) * mask / (1 - p)      one fused kernel, W decoded tile by tile
    dA    = g^T @ x_d                                        [r, K]
    dB    = scaling * dy^T @ (x_d @ A^T)                     [N, r]   (x_d @ A^T saved from forward)
    dbias = sum over rows of dy

W gets no gradient, and no dequantized copy of W is kept between forward and backward. Both passes
run the fused Triton kernel (`nf4.kernels.nf4_matmul`) where `nf4.dispatch.use_kernels` says so, and
the fp32 torch reference otherwise (`nf4.reference.matmul_ref`, float64 too, for gradcheck). The ops
are `torch.library` custom ops with fake implementations, so `torch.compile(fullgraph=True)` traces
modules using them without graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nf4 import reference
from nf4.dispatch import use_kernels
from nf4.tensor import NF4Tensor

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(packed, absmax, code, nested_absmax, nested_offset, nested_code, n, k, blocksize) -> NF4Tensor:
    q = NF4Tensor.__new__(NF4Tensor)  # pieces come from a validated NF4Tensor: skip re-validation
    q.packed, q.absmax, q.code = packed, absmax, code
    q.nested_absmax, q.nested_offset, q.nested_code = nested_absmax, nested_offset, nested_code
    q.shape, q.dtype, q.blocksize = torch.Size((n, k)), torch.float32, blocksize
    return q


def _matmul(x2, q: NF4Tensor, trans, u, v, bias, mask, keep_scale) -> Tensor:
    """The one dispatch point of the matmul: fused kernel or torch reference."""
    if use_kernels(x2.device) and x2.dtype in _KERNEL_DTYPES:
        from nf4.kernels.matmul import nf4_matmul

        pieces = (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_offset, q.nested_code)
        return nf4_matmul(x2, pieces, tuple(q.shape), q.blocksize, trans, u, v, bias, mask, keep_scale)
    if x2.device.type == "cpu":
        from nf4.cpu import matmul_cpu

        y = matmul_cpu(x2, q, trans, u, v, bias, mask, keep_scale)
        if y is not None:
            return y
    from nf4.api import dequantize

    return reference.matmul_ref(x2, dequantize(q, torch.float32), trans, u, v, bias, mask, keep_scale)


@torch.library.custom_op("nf4::matmul", mutates_args=())
def nf4_matmul_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    nested_code: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    trans: bool,
    u: Tensor | None,
    v: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    keep_scale: float,
) -> Tensor:
    """x [M, IN] @ W^T (W with `trans`) + (u @ v) [* mask * keep_scale] + bias; see `nf4_matmul`."""
    q = _weight(packed, absmax, code, nested_absmax, nested_offset, nested_code, n, k, blocksize)
    return _matmul(x, q, trans, u, v, bias, mask, keep_scale)


@nf4_matmul_op.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_offset,
    nested_code,
    n,
    k,
    blocksize,
    trans,
    u,
    v,
    bias,
    mask,
    keep_scale,
):
    return x.new_empty((x.shape[0], k if trans else n))


@torch.library.custom_op("nf4::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    nested_code: Tensor | None,
    out_features: int,
    blocksize: int,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    bias: Tensor | None,
    scaling: float,
    mask: Tensor | None,
    keep_scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward of the LoRA linear: returns (y [..., N], xa = x_d @ A^T [M, r] in float32 (float64 for
    float64 x), saved for backward)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    q = _weight(packed, absmax, code, nested_absmax, nested_offset, nested_code, out_features, k, blocksize)
    ct = _compute_dtype(x)
    if lora_A is None:
        xa = x2.new_empty((x2.shape[0], 0), dtype=ct)
        y = _matmul(x2, q, False, None, None, bias, None, 1.0)
    else:
        xa = _dropped(x2, mask, keep_scale, ct) @ lora_A.t().to(ct)
        y = _matmul(x2, q, False, xa * scaling, lora_B.t(), bias, None, 1.0)
    return y.reshape(*x.shape[:-1], out_features), xa


@lora_linear_op.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_offset,
    nested_code,
    out_features,
    blocksize,
    lora_A,
    lora_B,
    bias,
    scaling,
    mask,
    keep_scale,
):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    r = 0 if lora_A is None else lora_A.shape[0]
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((m, r), dtype=_compute_dtype(x))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 activations (gradcheck), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dropped(x2: Tensor, mask: Tensor | None, keep_scale: float, dtype: torch.dtype) -> Tensor:
    """x_d = x * mask * keep_scale in `dtype` (x itself without a mask)."""
    x2 = x2.to(dtype)
    return x2 if mask is None else x2 * mask.reshape(x2.shape) * keep_scale


_SAVED_ARGS = ("packed", "absmax", "code", "nested_absmax", "nested_offset", "nested_code")


def _setup_context(ctx, inputs, output):
    (
        x,
        packed,
        absmax,
        code,
        nested_absmax,
        nested_offset,
        nested_code,
        out_features,
        blocksize,
        lora_A,
        lora_B,
        bias,
        scaling,
        mask,
        keep_scale,
    ) = inputs
    ctx.save_for_backward(
        x, packed, absmax, code, nested_absmax, nested_offset, nested_code, lora_A, lora_B, mask, output[1]
    )
    ctx.meta = (out_features, blocksize, scaling, keep_scale, bias is not None, None if bias is None else bias.dtype)


def _backward(ctx, dy, dxa):
    x, packed, absmax, code, nested_absmax, nested_offset, nested_code, lora_A, lora_B, mask, xa = ctx.saved_tensors
    out_features, blocksize, scaling, keep_scale, has_bias, bias_dtype = ctx.meta
    k = x.shape[-1]
    dy2 = dy.reshape(-1, out_features)
    x2 = x.reshape(-1, k)
    needs = ctx.needs_input_grad
    dx = d_a = d_b = d_bias = None
    g = None
    if lora_A is not None:
        ct = _compute_dtype(dy)
        g = scaling * (dy2.to(ct) @ lora_B.to(ct))
        if dxa is not None:
            g = g + dxa.to(ct)
        if needs[9]:
            d_a = (g.t() @ _dropped(x2, mask, keep_scale, ct)).to(lora_A.dtype)
        if needs[10]:
            d_b = (scaling * (dy2.to(ct).t() @ xa.to(ct))).to(lora_B.dtype)
    if needs[0]:
        mask2 = None if mask is None else mask.reshape(x2.shape)
        dx = torch.ops.nf4.matmul(
            dy2.to(x.dtype),
            packed,
            absmax,
            code,
            nested_absmax,
            nested_offset,
            nested_code,
            out_features,
            k,
            blocksize,
            True,
            g,
            lora_A,
            None,
            mask2,
            keep_scale,
        )
        dx = dx.reshape(x.shape)
    if has_bias and needs[11]:
        d_bias = dy2.to(_compute_dtype(dy)).sum(0).to(bias_dtype)
    return dx, None, None, None, None, None, None, None, None, d_a, d_b, d_bias, None, None, None


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(
    x: Tensor,
    weight: NF4Tensor,
    lora_A: Tensor | None = None,
    lora_B: Tensor | None = None,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """`x @ dequant(weight)^T + scaling * (dropout(x) @ lora_A^T) @ lora_B^T + bias`, differentiable.

    Args:
        x: [..., K] activations (float32, float16, bfloat16; float64 on the reference path).
        weight: the frozen NF4 weight [N, K]. lora_A: [r, K], lora_B: [N, r] (both or neither).
        bias: [N] or None. dropout: probability p applied to x in the LoRA branch when `training`.
    Returns:
        [..., N] in x's dtype.
    """
    mask, keep_scale = dropout_mask(x, dropout, training and lora_A is not None)
    y, _ = torch.ops.nf4.lora_linear(
        x,
        weight.packed,
        weight.absmax,
        weight.code,
        weight.nested_absmax,
        weight.nested_offset,
        weight.nested_code,
        weight.shape[0],
        weight.blocksize,
        lora_A,
        lora_B,
        bias,
        float(scaling),
        mask,
        keep_scale,
    )
    return y


def dropout_mask(x: Tensor, p: float, active: bool) -> tuple[Tensor | None, float]:
    """(bool keep-mask shaped like x, 1 / (1 - p)), or (None, 1.0) when dropout is off."""
    if not active or p == 0.0:
        return None, 1.0
    return torch.rand(x.shape, device=x.device) >= p, 1.0 / (1.0 - p)
