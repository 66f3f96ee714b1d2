"""The NF4 linear layer with a LoRA adapter as one differentiable op, registered with torch.library.

    y = x @ dequant(W)^T + scaling * (x_d @ A^T) @ B^T + bias          x_d = x * mask / (1 - p)

with x [..., K], W an NF4Tensor [N, K] (frozen), A [r, K], B [N, r], bias [N], mask the dropout mask
(none when not training or p = 0). Backward, with g = scaling * dy @ B  [M, r]:

    dx    = dy @ dequant(W) + (g @ A) * mask / (1 - p)      one fused kernel, W decoded tile by tile
    dA    = g^T @ x_d                                        [r, K]
    dB    = scaling * dy^T @ (x_d @ A^T)                     [N, r]   (x_d @ A^T saved from forward)
    dbias = sum over rows of dy

W gets no gradient, and no dequantized copy of W is kept between forward and backward. The low-rank
products (x_d @ A^T, g, dA, dB) run in the activation dtype, as torch's GEMMs do for bf16 (float32
accumulation, one rounding), with the adapter cast to it: no float32 copy of x or dy is made, and
dA, dB are returned in the adapter's dtype. (PEFT with float32 adapters casts x to float32 instead.) Both passes
run through `nf4.dispatch.matmul`: the fused Triton kernel (`nf4.kernels.matmul.nf4_matmul`) on CUDA, and
the fp32 torch reference otherwise (`nf4.reference.matmul_ref`, float64 too, for gradcheck). The ops
are `torch.library` custom ops with fake implementations, so `torch.compile(fullgraph=True)` traces
modules using them without graph breaks. The weight reaches them as one `NF4Tensor`, passed as keyword
arguments (`weight_kwargs`: its pieces by name, then shape, dtype, blocksize, double_quant) and rebuilt
on the other side without copies or checks; nothing on the forward or backward path reads a value
back from the device, so a converted model can be captured in a CUDA graph. A call that needs no
gradient and no dropout passes `need_xa=False` to `nf4::lora_linear`, which then leaves x @ A^T to
the matmul (inside the decode kernel at M <= 16: no separate GEMV, no cast of A). Plain eager calls
(nothing compiling, tracing or intercepting: `eager`) run the ops' bodies directly, skipping the
dispatcher's wrapping of custom ops (~25-40 µs a call); the results are bit-identical either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nf4 import dispatch
from nf4.format import PIECES, NF4Meta
from nf4.tensor import NF4Tensor


def weight_kwargs(q: NF4Tensor) -> dict:
    """The NF4Tensor `q` as keyword arguments of the `nf4::` ops: its pieces by name, then its metadata
    (a bfloat16 / float16 nested absmax decode, which the ops' arguments cannot say, done here first)."""
    pieces, meta = q.decodable().flatten()
    return dict(
        pieces, shape=list(meta.shape), dtype=meta.dtype, blocksize=meta.blocksize, double_quant=meta.double_quant
    )


def _weight(
    packed, absmax, code, nested_absmax, nested_offset, nested_code, shape, dtype, blocksize, double_quant
) -> NF4Tensor:
    """The NF4Tensor an op received as `weight_kwargs` (trusted: it was checked when it was built)."""
    pieces = dict(zip(PIECES, (packed, absmax, code, nested_absmax, nested_offset, nested_code), strict=True))
    return NF4Tensor.unflatten(pieces, NF4Meta(torch.Size(shape), dtype, blocksize, double_quant))


@torch.library.custom_op("nf4::matmul", mutates_args=())
def nf4_matmul_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    nested_code: Tensor | None,
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    double_quant: bool,
    trans: bool,
    u: Tensor | None,
    v: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    lora_scale: float,
) -> Tensor:
    """x [M, IN] @ W^T (W with `trans`) + (u @ v) * lora_scale [* mask] + bias; `nf4.dispatch.matmul`."""
    q = _weight(packed, absmax, code, nested_absmax, nested_offset, nested_code, shape, dtype, blocksize, double_quant)
    return dispatch.matmul(x, q, trans, u, v, bias, mask, lora_scale)


@nf4_matmul_op.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_offset,
    nested_code,
    shape,
    dtype,
    blocksize,
    double_quant,
    trans,
    u,
    v,
    bias,
    mask,
    lora_scale,
):
    return x.new_empty((x.shape[0], shape[1] if trans else shape[0]))


def _lora_linear_body(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    nested_absmax: Tensor | None,
    nested_offset: Tensor | None,
    nested_code: Tensor | None,
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    double_quant: bool,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    bias: Tensor | None,
    scaling: float,
    mask: Tensor | None,
    keep_scale: float,
    need_xa: bool = True,
) -> tuple[Tensor, Tensor]:
    """Forward of the LoRA linear: returns (y [..., N], xa = x_d @ A^T [M, r] in x's dtype, saved for
    backward). Without `need_xa` (no gradient) and without dropout, xa comes back empty [M, 0] and
    x @ A^T is left to the matmul (`_inference`)."""
    q = _weight(packed, absmax, code, nested_absmax, nested_offset, nested_code, shape, dtype, blocksize, double_quant)
    if not need_xa and mask is None:
        y = _inference(x, q, lora_A, lora_B, bias, scaling)
        return y, x.new_empty((x.numel() // x.shape[-1] if x.shape[-1] else 0, 0))
    return _forward(x, q, lora_A, lora_B, bias, scaling, mask, keep_scale)


lora_linear_op = torch.library.custom_op("nf4::lora_linear", mutates_args=())(_lora_linear_body)


def _forward(x, q, lora_A, lora_B, bias, scaling, mask, keep_scale) -> tuple[Tensor, Tensor]:
    """The body of `nf4::lora_linear`, on the NF4Tensor `q`."""
    x2 = x.reshape(-1, x.shape[-1])
    if lora_A is None:
        xa = x2.new_empty((x2.shape[0], 0))
        y = dispatch.matmul(x2, q, False, None, None, bias, None, 1.0)
    else:
        xa = _dropped(x2, mask, keep_scale) @ lora_A.to(x.dtype).t()
        y = dispatch.matmul(x2, q, False, xa, lora_B.t(), bias, None, scaling)  # B cast where needed
    return _unviewed(y, x), xa


def _inference(x, q, lora_A, lora_B, bias, scaling) -> Tensor:
    """`_forward`'s y when nothing needs xa (no backward, no dropout): x @ A^T is left to the matmul,
    which computes it inside the decode kernel at M <= 16 (`nf4.kernels.gemv`, in float32: no separate
    GEMV, no cast of a float32 A) and with torch in x's dtype otherwise."""
    x2 = x.reshape(-1, x.shape[-1])
    v = None if lora_A is None else lora_B.t()
    y = dispatch.matmul(x2, q, False, None, v, bias, None, scaling, a=lora_A)
    return _unviewed(y, x)


def _unviewed(y2: Tensor, x: Tensor) -> Tensor:
    """The matmul's [M, N] result as [..., N], x's leading dims, and not a view: autograd refuses an
    in-place op on a view returned by a custom Function (`y += 1`, `relu_`, which nn.Linear's output
    allows), and the reshape (even to the same shape) is a view of the result. `detach` makes a new
    tensor on the same storage that is no view, without a copy; nothing else holds the [M, N] result."""
    return y2.reshape(*x.shape[:-1], y2.shape[-1]).detach()


def eager(x: Tensor) -> bool:
    """True when a call may run the ops' bodies directly instead of through the `nf4::` custom ops.

    The custom ops are what `torch.compile`, `torch.export`, fake tensors and other tracers see (they
    never look inside); in plain eager mode the dispatcher's wrapping costs ~25-40 µs a call (cProfile,
    this project's CPU: the op's redispatch, autograd and dynamo-disable wrappers), more than a
    kernel's launch. So the layers call the bodies directly when nothing is tracing or intercepting:
    not compiling (dynamo, export), no `torch.jit.trace`, no dispatch mode (FakeTensorMode, make_fx,
    FlopCounterMode ...), no functorch transform (vmap, grad) and a plain tensor input (no subclass).
    Costs ~0.4 µs.
    """
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )


@lora_linear_op.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    nested_absmax,
    nested_offset,
    nested_code,
    shape,
    dtype,
    blocksize,
    double_quant,
    lora_A,
    lora_B,
    bias,
    scaling,
    mask,
    keep_scale,
    need_xa=True,
):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    r = 0 if lora_A is None or not (need_xa or mask is not None) else lora_A.shape[0]
    return x.new_empty((*x.shape[:-1], shape[0])), x.new_empty((m, r))


def _dropped(x2: Tensor, mask: Tensor | None, keep_scale: float) -> Tensor:
    """x_d = x * mask * keep_scale in x's dtype (x itself without a mask)."""
    return x2 if mask is None else x2 * mask.reshape(x2.shape) * keep_scale


_ARGS = (
    "x",
    *PIECES,
    *("shape", "dtype", "blocksize", "double_quant", "lora_A", "lora_B", "bias", "scaling", "mask", "keep_scale"),
    "need_xa",
)
"""The parameters of `nf4::lora_linear`, in order."""
_GRAD_INPUTS = ("x", "lora_A", "lora_B", "bias")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs, strict=False))  # a direct caller may leave out need_xa (default True)
    ctx.n_inputs = len(inputs)
    pieces = [args[name] for name in PIECES]
    ctx.save_for_backward(args["x"], *pieces, args["lora_A"], args["lora_B"], args["mask"], output[1])
    ctx.meta = {k: args[k] for k in ("shape", "dtype", "blocksize", "double_quant", "scaling")}
    ctx.keep_scale = args["keep_scale"]
    ctx.bias_dtype = None if args["bias"] is None else args["bias"].dtype


def _backward(ctx, dy, dxa):
    x, *pieces, lora_A, lora_B, mask, xa = ctx.saved_tensors
    meta = dict(ctx.meta)
    scaling = meta.pop("scaling")
    weight = dict(zip(PIECES, pieces, strict=True), **meta)
    out_features, k = meta["shape"]
    dy2 = dy.reshape(-1, out_features).to(x.dtype)
    x2 = x.reshape(-1, k)
    needs = dict(zip(_ARGS, ctx.needs_input_grad, strict=False))
    grads = dict.fromkeys(_GRAD_INPUTS)
    g = a = None
    if lora_A is not None:  # [M, r] and [r, K] products in x's dtype (float32 accumulation in the GEMMs)
        a = lora_A.to(x.dtype)
        g = (dy2 @ lora_B.to(x.dtype)).mul_(scaling)
        if dxa is not None:
            g.add_(dxa.to(x.dtype))
        if needs["lora_A"]:
            grads["lora_A"] = (g.t() @ _dropped(x2, mask, ctx.keep_scale)).to(lora_A.dtype)
        if needs["lora_B"]:
            grads["lora_B"] = (dy2.t() @ xa).mul_(scaling).to(lora_B.dtype)
    if needs["x"]:
        mask2 = None if mask is None else mask.reshape(x2.shape)
        if eager(dy2):
            q = _weight(*pieces, *(meta[k] for k in ("shape", "dtype", "blocksize", "double_quant")))
            dx = dispatch.matmul(dy2, q, True, g, a, None, mask2, ctx.keep_scale)
        else:
            dx = torch.ops.nf4.matmul(
                dy2, **weight, trans=True, u=g, v=a, bias=None, mask=mask2, lora_scale=ctx.keep_scale
            )
        grads["x"] = dx.reshape(x.shape)
    if ctx.bias_dtype is not None and needs["bias"]:
        grads["bias"] = dy2.sum(0, dtype=torch.float32 if dy2.dtype != torch.float64 else None).to(ctx.bias_dtype)
    return tuple(grads.get(name) for name in _ARGS[: ctx.n_inputs])


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _LoRALinear(torch.autograd.Function):
    """`nf4::lora_linear` with the same setup and backward as its registered autograd, for the layers.

    NOTE: torch's autograd wrapper of a custom op calls `torch._library.utils.fill_defaults` on every
    call with grad enabled, which re-reads the op's schema once per argument: ~78 µs of a ~184 µs eager
    LoRALinearNF4 forward with this op's 17 arguments (cProfile, launches stubbed, this project's CPU).
    Under an autograd.Function the op runs with grad disabled and skips the wrapper. The op keeps its
    registered autograd for direct callers; both share `_setup_context` and `_backward`.
    """

    @staticmethod
    def forward(ctx, *inputs):
        if eager(inputs[0]):
            output = _lora_linear_body(*inputs)
        else:
            output = torch.ops.nf4.lora_linear(**dict(zip(_ARGS, inputs, strict=True)))
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, dy, dxa):
        return _backward(ctx, dy, dxa)


def check_inputs(x, weight, lora_A=None, lora_B=None, bias=None, where: str = "lora_linear") -> None:
    """Validate `lora_linear`'s arguments: TypeError / ValueError saying expected, got and what to do."""
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
) -> Tensor:
    """`x @ dequant(weight)^T + scaling * (dropout(x) @ lora_A^T) @ lora_B^T + bias`, differentiable.

    Args:
        x: [..., K] activations (float32, float16, bfloat16; float64 on the reference path).
        weight: the frozen NF4 weight [N, K]. lora_A: [r, K], lora_B: [N, r] (both or neither).
        bias: [N] or None. dropout: probability p applied to x in the LoRA branch when `training`.
    Returns:
        [..., N] in x's dtype. Raises TypeError / ValueError for mismatched shapes, dtypes or devices.
    """
    check_inputs(x, weight, lora_A, lora_B, bias)
    return _lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout, training)


def _lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout, training) -> Tensor:
    """`lora_linear` without the checks (the modules check their input themselves)."""
    mask, keep_scale = dropout_mask(x, dropout, training and lora_A is not None)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    if not grad and mask is None and eager(x):  # the op's body for this case, without its arguments' round trip
        return _inference(x, weight, lora_A, lora_B, bias, float(scaling))
    args = dict(x=x, **weight_kwargs(weight), lora_A=lora_A, lora_B=lora_B, bias=bias, scaling=float(scaling))
    if grad:
        y, _ = _LoRALinear.apply(*args.values(), mask, keep_scale, True)
    elif eager(x):  # nothing to differentiate, nothing tracing: the op's body
        y, _ = _lora_linear_body(**args, mask=mask, keep_scale=keep_scale, need_xa=False)
    else:
        y, _ = torch.ops.nf4.lora_linear(**args, mask=mask, keep_scale=keep_scale, need_xa=False)
    return y


def dropout_mask(x: Tensor, p: float, active: bool) -> tuple[Tensor | None, float]:
    """(bool keep-mask shaped like x, 1 / (1 - p)), or (None, 1.0) when dropout is off."""
    if not active or p == 0.0:
        return None, 1.0
    return torch.rand(x.shape, device=x.device) >= p, 1.0 / (1.0 - p)
