"""DoRA on an NF4 weight without a dense [out, in] matrix (PEFT's semantics, the norm detached as in the
paper's section 4.3).

    n_j^2 = ||W_j||^2 + 2 s <B_j, (W A^T)_j> + s^2 B_j (A A^T) B_j^T          n = ||W + s B A|| per row
    g     = m / n                                                               (no gradient through n)
    y     = x W^T + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T + bias             x_d = dropout(x)
          = g * (x W^T + s (x A^T) B^T) + bias                                   without dropout

- ||W_j||^2 is fixed (W frozen): `weight_norm_sq`, once per weight, in float64.
- W A^T [N, r] comes from the same NF4 matmul call as the output: A's r rows ride under x's rows (their
  low-rank input is zero), so W is read once. A A^T is r x r. The combination runs in float64 on [N, r].
- Backward: dy' = g * dy; dx, dA, dB as LoRA's with dy' (plus the dropout's extra term); dm = sum_rows(dy * z) / n,
  z = the output before `g` (saved, [M, N]: the one activation DoRA adds to LoRA's; PEFT keeps two).
- The elementwise passes (y = g * z + bias forward; dy' and dm's products backward) are one kernel each on a
  GPU in eager mode (`nf4.kernels.dora`), bit-identical to torch's passes but for the order of dm's sum;
  torch's passes elsewhere (CPU; under torch.compile, which fuses them itself).
- Near cancellation (B A ~ -W / s in a row) loses float64 digits relative to ||W_j||^2; n^2 < 0 from rounding
  is taken as 0, where `g` is inf as PEFT's dense norm would give.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nf4 import dispatch
from nf4.lora import ops
from nf4.lora.functional import _dropped, _unviewed, check_inputs, dropout_mask
from nf4.tensor import NF4Tensor

_ROWS_PER_CHUNK = 1024


def weight_norm_sq(weight: NF4Tensor) -> Tensor:
    """||dequant(W)_j||^2 per output row j, float64 [N] (dequantized in chunks of rows: no [N, K] float64)."""
    from nf4.api import dequantize

    w = dequantize(weight, torch.float32)
    return torch.cat(
        [w[i : i + _ROWS_PER_CHUNK].double().square().sum(1) for i in range(0, w.shape[0], _ROWS_PER_CHUNK)]
    )


def norm_from_parts(weight_sq: Tensor, wa: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W_j + scaling (B A)_j|| per row, float32 [N], from ||W_j||^2 [N], W A^T [N, r], A [r, K], B [N, r]
    (the identity in the module docstring; float64 inside, detached)."""
    a, b = lora_A.detach().double(), lora_B.detach().double()
    # n^2 = ||W_j||^2 + s sum_i B_ji (2 (W A^T)_ji + s (B A A^T)_ji): 11 ops (GPU kernels), not 17
    inner = torch.addmm(wa.detach().double(), b, a @ a.t(), beta=2.0, alpha=scaling)
    n2 = torch.add(weight_sq.to(device=b.device, dtype=torch.float64), (b * inner).sum(1), alpha=scaling)
    return n2.clamp_min(0.0).sqrt().float()


def dora_weight_norm(weight: NF4Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_sq: Tensor | None = None) -> Tensor:  # fmt: skip
    """||dequant(W)_j + scaling (B A)_j|| per output row, float32 [N], detached: PEFT's DoRA weight norm
    (and the magnitude's initial value). W A^T is one NF4 matmul of A's r rows; `weight_sq` from
    `weight_norm_sq` (computed here if None)."""
    weight_sq = weight_norm_sq(weight) if weight_sq is None else weight_sq
    with torch.no_grad():
        a = lora_A.detach()
        dtype = a.dtype if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        wa = ops.matmul(a.to(dtype), weight).t()
    return norm_from_parts(weight_sq, wa, lora_A, lora_B, scaling)


def _fused(z: Tensor, g: Tensor) -> bool:
    """Whether the elementwise passes over z run as one kernel (`nf4.kernels.dora`)."""
    return ops.eager(z) and dispatch.dora_kernels(z, g)


def scale_columns(z: Tensor, g: Tensor, bias: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """`z * g + extra + bias` in g's dtype, in that order, rounded once to z's dtype: z, extra [M, N]; g [N]."""
    if _fused(z, g) and (bias is None or bias.dtype in dispatch.KERNEL_DTYPES):
        return dispatch.dora_scale(z, g, bias, extra)
    y = z.to(g.dtype) * g
    if extra is not None:
        y += extra
    if bias is not None:
        y += bias
    return y.to(z.dtype)


def magnitude_grad_parts(dy: Tensor, z: Tensor, g: Tensor, dm: bool) -> tuple[Tensor, Tensor | None]:
    """(`dy * g` rounded to z's dtype, `sum_rows dy * z` in g's dtype where `dm`, else None): dy, z [M, N]."""
    if dy.dtype == z.dtype and _fused(z, g):
        return dispatch.dora_grad(dy, z, g) if dm else (dispatch.dora_scale(dy, g), None)
    dyg = (dy.to(g.dtype) * g).to(z.dtype)
    return dyg, (dy.to(g.dtype) * z.to(g.dtype)).sum(0) if dm else None


class DoRALinearFunction(torch.autograd.Function):
    """The module docstring's forward and backward; `mask` a bool keep-mask or None, `keep_scale`
    1 / (1 - p), `weight_sq` from `weight_norm_sq`; inputs unchecked."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, mask, keep_scale, weight_sq):
        x2 = x.reshape(-1, x.shape[-1])
        rows, r = x2.shape[0], lora_A.shape[0]
        a = lora_A.to(x.dtype)
        xd = _dropped(x2, mask, keep_scale)
        xa = xd @ a.t()
        zeros = xa.new_zeros
        if mask is None:  # [x; A] -> [z; A W^T]
            xs, us = [x2, a], [xa, zeros(r, r)]
        else:  # [x_d; x - x_d; A] -> [z; (x - x_d) W^T; A W^T]
            xs, us = [xd, x2 - xd, a], [xa, zeros(rows, r), zeros(r, r)]
        out = ops.matmul(torch.cat(xs), weight, False, torch.cat(us), lora_B.t(), None, None, scaling)
        norm = norm_from_parts(weight_sq, out[-r:].t(), lora_A, lora_B, scaling)
        ct = torch.promote_types(x.dtype, torch.float32)  # the epilogue's dtype
        g = magnitude.detach().to(ct) / norm
        z = out[:rows] if mask is None else out[:rows].clone()  # a view would keep the other rows alive
        y = scale_columns(z, g, bias, None if mask is None else out[rows:-r])
        ctx.save_for_backward(x, lora_A, lora_B, mask, xa, z, g, norm)
        ctx.weight = weight  # frozen pieces: not saved tensors (see LoRALinearFunction)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        ctx.magnitude_dtype = magnitude.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _unviewed(y, x)

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, mask, xa, z, g, norm = ctx.saved_tensors
        needs_x, _, needs_a, needs_b, needs_m, needs_bias, *_ = ctx.needs_input_grad
        out_features, k = ctx.weight.shape
        dy2 = dy.reshape(-1, out_features)
        x2 = x.reshape(-1, k)
        dyg, dz = magnitude_grad_parts(dy2, z, g, needs_m)  # dy' = g * dy; sum_rows dy * z
        a = lora_A.to(x.dtype)
        gu = (dyg @ lora_B.to(x.dtype)).mul_(ctx.scaling)
        dx = d_a = d_b = d_m = d_bias = None
        if needs_a:
            d_a = (gu.t() @ _dropped(x2, mask, ctx.keep_scale)).to(lora_A.dtype)
        if needs_b:
            d_b = (dyg.t() @ xa).mul_(ctx.scaling).to(lora_B.dtype)
        if needs_m:
            d_m = (dz / norm).to(ctx.magnitude_dtype)
        if needs_x:
            if mask is None:
                dx = ops.matmul(dyg, ctx.weight, True, gu, a)
            else:  # dy W + mask * keep * (((g - 1) dy) W + gu A)
                rest = (dy2.to(g.dtype) * (g - 1.0)).to(x.dtype)
                both = ops.matmul(torch.cat([dy2.to(x.dtype), rest]), ctx.weight, True,
                                  torch.cat([torch.zeros_like(gu), gu]), a)  # fmt: skip
                rows = x2.shape[0]
                dx = both[:rows] + both[rows:] * mask.reshape(x2.shape) * ctx.keep_scale
            dx = dx.reshape(x.shape)
        if ctx.bias_dtype is not None and needs_bias:
            d_bias = dy2.sum(0, dtype=torch.float32 if dy2.dtype != torch.float64 else None).to(ctx.bias_dtype)
        return dx, None, d_a, d_b, d_m, d_bias, None, None, None, None


def dora_linear(
    x: Tensor,
    weight: NF4Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Tensor | None = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    training: bool = False,
    *,
    weight_sq: Tensor | None = None,
    norm: Tensor | None = None,
    where: str = "dora_linear",
) -> Tensor:
    """DoRA: `x @ dequant(weight)^T` with the adapter's direction and magnitude, as PEFT's `use_dora=True`
    computes it (module docstring), differentiable in x, lora_A, lora_B, magnitude and bias.

    x [..., K]; weight [N, K]; lora_A [r, K]; lora_B [N, r]; magnitude [N] (PEFT's
    `lora_magnitude_vector`); bias [N]; dropout on the adapter's input when `training`. `weight_sq`:
    `weight_norm_sq(weight)`, cached by the caller (computed here, a full dequantize, if None). `norm`: a
    cached `dora_weight_norm` for inference (used only where no gradient is needed and no dropout runs:
    then one fused matmul and a per-column scale). Returns [..., N] in x's dtype.
    """
    check_inputs(x, weight, lora_A, lora_B, bias, where)
    n = weight.shape[0]
    if not isinstance(magnitude, Tensor) or tuple(magnitude.shape) != (n,) or not magnitude.dtype.is_floating_point:
        got = list(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__
        raise ValueError(f"{where}: expected a floating-point magnitude [{n}], got {got}")
    if magnitude.device != x.device:
        raise ValueError(f"{where}: magnitude is on {magnitude.device} but x is on {x.device}; move one of them")
    mask, keep_scale = dropout_mask(x, dropout, training)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, magnitude, bias)
    )
    if norm is not None and mask is None and not grad:
        z = ops.matmul(x.reshape(-1, x.shape[-1]), weight, False, None, lora_B.t(), None, None, float(scaling),
                       a=lora_A)  # fmt: skip
        ct = torch.promote_types(x.dtype, torch.float32)
        return _unviewed(scale_columns(z, magnitude.to(ct) / norm.to(device=z.device, dtype=ct), bias), x)
    weight_sq = weight_norm_sq(weight) if weight_sq is None else weight_sq
    return DoRALinearFunction.apply(x, weight, lora_A, lora_B, magnitude, bias, float(scaling), mask, keep_scale,
                                    weight_sq)  # fmt: skip


def dora_merged(weight: Tensor, delta: Tensor, magnitude: Tensor, unmerged: Tensor | None = None) -> Tensor:
    """PEFT's DoRA merge in float32: `m / ||unmerged + delta|| * (weight + delta)` per row; `weight` may hold
    earlier merges, the norm comes from the weight before any (`unmerged`, default `weight`)."""
    target = weight + delta
    norm = torch.linalg.norm(target if unmerged is None else unmerged + delta, dim=1)
    return (magnitude.detach().float() / norm)[:, None] * target


def cached_weight_sq(weight: NF4Tensor, cache: dict) -> Tensor:
    """`weight_norm_sq(weight)`, kept in `cache` until the weight's bytes change (a layer's own dict)."""
    key = (weight.packed.data_ptr(), weight.packed._version, weight.absmax.data_ptr(), weight.absmax._version)
    if cache.get("weight_sq", (None,))[0] != key:
        cache["weight_sq"] = (key, weight_norm_sq(weight))
    return cache["weight_sq"][1]


def cached_norm(
    weight: NF4Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, cache: dict, name: str = ""
) -> Tensor:
    """`dora_weight_norm` of adapter `name`, kept in `cache` until A, B, the scaling or the weight change."""
    weight_sq = cached_weight_sq(weight, cache)
    key = (float(scaling), lora_A.data_ptr(), lora_A._version, lora_B.data_ptr(), lora_B._version, id(weight_sq))
    if cache.get(("norm", name), (None,))[0] != key:
        cache[("norm", name)] = (key, dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sq))
    return cache[("norm", name)][1]


def dora_forward(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout, training, cache: dict, name: str = "",
                 where: str = "dora_linear") -> Tensor:  # fmt: skip
    """`dora_linear` for a layer holding `cache`: ||W_j||^2 computed once, and where no gradient is needed
    and no dropout runs (inference) the norm too."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B, magnitude))
    norm = None if grad or (training and dropout) else cached_norm(weight, lora_A, lora_B, scaling, cache, name)
    return dora_linear(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout, training,
                       weight_sq=cached_weight_sq(weight, cache), norm=norm, where=where)  # fmt: skip
