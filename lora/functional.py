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


def multi_lora_linear(
    x: Tensor,
    weight: NF4Tensor,
    a_bank: Tensor,
    v_bank: Tensor,
    scales: Tensor,
    index: Tensor,
    bias: Tensor | None = None,
    *,
    where: str = "multi_lora_linear",
) -> Tensor:
    """Each row its own adapter, in one fused call: `x @ dequant(weight)^T + bias` plus, for a row whose
    slot i = index >= 0, `scales[i] * (x_row @ a_bank[i]^T) @ v_bank[i]`.

    x [..., K]; weight [N, K]; a_bank [S, R, K], v_bank [S, R, N] (B^T per slot, ranks below R
    zero-padded), scales [S]: one `nf4.lora.AdapterBank`'s tensors. index: integer, shape a prefix of
    x.shape[:-1] (per sequence [B] for x [B, T, K], or per token), -1 for the base alone. Returns [..., N]
    in x's dtype. No dropout (an inference path, as PEFT's `adapter_names`). Where a gradient is needed
    (x or bias requiring it) it runs a differentiable per-row gather instead: memory M x R x K.
    An index value outside [-1, S) raises RuntimeError: at once on the CPU, at the next synchronisation on
    a GPU (an asynchronous device assert: no host read)."""
    check_inputs(x, weight, bias=bias, where=where)
    n, k = weight.shape
    if not all(isinstance(t, Tensor) for t in (a_bank, v_bank, scales, index)):
        raise TypeError(f"{where}: a_bank, v_bank, scales and index must be tensors")
    s = a_bank.shape[0] if a_bank.dim() == 3 else -1
    r = a_bank.shape[1] if a_bank.dim() == 3 else -1
    if a_bank.dim() != 3 or a_bank.shape[2] != k or tuple(v_bank.shape) != (s, r, n) or tuple(scales.shape) != (s,):
        raise ValueError(
            f"{where}: expected a_bank [S, R, {k}], v_bank [S, R, {n}] and scales [S], got {list(a_bank.shape)}, "
            f"{list(v_bank.shape)} and {list(scales.shape)}"
        )
    for name, t in (("a_bank", a_bank), ("v_bank", v_bank), ("scales", scales)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{where}: index must be an integer tensor of slots, got {index.dtype}")
    lead = x.shape[:-1]
    if index.dim() > len(lead) or tuple(lead[: index.dim()]) != tuple(index.shape):
        raise ValueError(
            f"{where}: index must have a leading shape of x's rows {list(lead)} (per sequence or per token), "
            f"got {list(index.shape)}"
        )
    for name, t in (("a_bank", a_bank), ("v_bank", v_bank), ("scales", scales), ("index", index)):
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}; move one of them")
    rows = index.reshape(*index.shape, *[1] * (len(lead) - index.dim())).expand(lead).reshape(-1)
    if rows.numel():  # raises at once on the CPU, at the next synchronisation on a GPU (no host read)
        torch._assert_async(((rows >= -1) & (rows < s)).all(), f"{where}: index values must lie in [-1, {s}) "
                            "(-1: no adapter)")  # fmt: skip
    x2 = x.reshape(-1, k)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a_bank, v_bank, scales, bias)):
        base = LoRALinearFunction.apply(x2, weight, None, None, bias, 1.0, None, 1.0)
        slot = rows.long().clamp(min=0)
        u = torch.einsum("mk,mrk->mr", x2, a_bank[slot].to(x.dtype)) * scales[slot].to(x.dtype)[:, None]
        lora = torch.einsum("mr,mrn->mn", u, v_bank[slot].to(x.dtype))
        y = base + torch.where(rows[:, None] >= 0, lora, 0.0).to(base.dtype)
        return y.reshape(*lead, n)
    return _unviewed(ops.matmul_adapters(x2, weight, a_bank, v_bank, scales, rows, bias), x)
