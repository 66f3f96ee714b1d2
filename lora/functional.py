"""The NF4 linear layer with a LoRA adapter as one differentiable function.

    y  = x @ dequant(W)^T + scaling * (x_d @ A^T) @ B^T + bias          x_d = x * mask / (1 - p)
    dx = dy @ dequant(W) + (g @ A) * mask / (1 - p),   g = scaling * dy @ B
    dA = g^T @ x_d,   dB = scaling * dy^T @ (x_d @ A^T) (saved from forward),   dbias = sum_rows dy

W [N, K] is frozen, never dequantized whole. Low-rank products run in x's dtype. No device read-back
(tests/test_sync.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nf4.lora import ops
from nf4.tensor import NF4Tensor


class LoRALinearFunction(torch.autograd.Function):
    """The header's math; `mask` a bool keep-mask or None, `keep_scale` 1 / (1 - p); inputs unchecked."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, mask, keep_scale):
        x2 = x.reshape(-1, x.shape[-1])
        if lora_A is None:
            xa = None
            y = ops.matmul(x2, weight, bias=bias)
        else:
            xa = _dropped(x2, mask, keep_scale) @ lora_A.to(x.dtype).t()
            y = ops.matmul(x2, weight, False, xa, lora_B.t(), bias, None, scaling)  # B cast where needed
        ctx.save_for_backward(x, lora_A, lora_B, mask, xa)
        ctx.weight = weight  # frozen pieces: not saved tensors, so saved-tensor hooks never copy the weight
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _unviewed(y, x)

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, mask, xa = ctx.saved_tensors
        needs_x, _, needs_a, needs_b, needs_bias, *_ = ctx.needs_input_grad
        out_features, k = ctx.weight.shape
        dy2 = dy.reshape(-1, out_features).to(x.dtype)
        x2 = x.reshape(-1, k)
        dx = d_a = d_b = d_bias = g = a = None
        if lora_A is not None:
            a = lora_A.to(x.dtype)
            g = (dy2 @ lora_B.to(x.dtype)).mul_(ctx.scaling)
            if needs_a:
                d_a = (g.t() @ _dropped(x2, mask, ctx.keep_scale)).to(lora_A.dtype)
            if needs_b:
                d_b = (dy2.t() @ xa).mul_(ctx.scaling).to(lora_B.dtype)
        if needs_x:
            mask2 = None if mask is None else mask.reshape(x2.shape)
            dx = ops.matmul(dy2, ctx.weight, True, g, a, None, mask2, ctx.keep_scale).reshape(x.shape)
        if ctx.bias_dtype is not None and needs_bias:
            d_bias = dy2.sum(0, dtype=torch.float32 if dy2.dtype != torch.float64 else None).to(ctx.bias_dtype)
        return dx, None, d_a, d_b, d_bias, None, None, None


def _unviewed(y2: Tensor, x: Tensor) -> Tensor:
    """[..., N], not a view: in-place ops on a Function's view fail (tests/test_functional.py)."""
    return y2.reshape(*x.shape[:-1], y2.shape[-1]).detach()


def _dropped(x2: Tensor, mask: Tensor | None, keep_scale: float) -> Tensor:
    return x2 if mask is None else x2 * mask.reshape(x2.shape) * keep_scale


def check_inputs(x, weight, lora_A=None, lora_B=None, bias=None, where: str = "lora_linear") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a tensor, got {type(x).__name__}")
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"{where}: weight must be an NF4Tensor (from nf4.quantize), got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"{where}: weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    n, k = weight.shape
    if not x.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{where}: expected input [..., {k}], got {list(x.shape)} (the weight is [{n}, {k}])")
    if x.device != weight.device:
        raise ValueError(f"{where}: x is on {x.device} but the weight is on {weight.device}; move one of them")
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{where}: pass lora_A and lora_B together (or neither)")
    if lora_A is not None:
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or lora_A.shape[1] != k or tuple(lora_B.shape) != (n, r):
            raise ValueError(
                f"{where}: expected lora_A [r, {k}] and lora_B [{n}, r], got {list(lora_A.shape)} and "
                f"{list(lora_B.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: expected bias [{n}], got {list(bias.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}; move one of them")


def lora_linear(
    x: Tensor,
    weight: NF4Tensor,
    lora_A: Tensor | None = None,
    lora_B: Tensor | None = None,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    *,
    where: str = "lora_linear",
) -> Tensor:
    """`x @ dequant(weight)^T + scaling * (dropout(x) @ lora_A^T) @ lora_B^T + bias`, differentiable.

    x [..., K] (fp32/fp16/bf16; fp64 on the reference path), weight [N, K], lora_A [r, K] and lora_B [N, r]
    (both or neither), bias [N]; dropout when `training`; `where` names errors. Returns [..., N] in x's
    dtype. TypeError / ValueError on bad shapes, dtypes or devices.
    """
    check_inputs(x, weight, lora_A, lora_B, bias, where)
    mask, keep_scale = dropout_mask(x, dropout, training and lora_A is not None)
    if mask is None and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    ):  # inference: x @ A^T left to the matmul (inside the decode kernel at M <= 16, no cast of A)
        y = ops.matmul(x.reshape(-1, x.shape[-1]), weight, False, None, None if lora_B is None else lora_B.t(),
                       bias, None, float(scaling), a=lora_A)  # fmt: skip
        return _unviewed(y, x)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, float(scaling), mask, keep_scale)


def dropout_mask(x: Tensor, p: float, active: bool) -> tuple[Tensor | None, float]:
    """(keep-mask, 1 / (1 - p)), or (None, 1.0)."""
    if not active or p == 0.0:
        return None, 1.0
    return torch.rand(x.shape, device=x.device) >= p, 1.0 / (1.0 - p)
