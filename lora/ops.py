"""The custom ops `nf4::matmul` and `nf4::matmul_adapters` (schemas, fakes) and when calls go through them.

It takes the weight's pieces (`NF4Tensor.flatten`): a schema cannot name a Python object. Plain eager
calls skip it, bit-identically (tests/test_functional.py, test_eager_calls_match_the_custom_op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nf4 import dispatch
from nf4.format import PIECES, NF4Meta
from nf4.tensor import NF4Tensor


@torch.library.custom_op("nf4::matmul", mutates_args=())
def _matmul_op(
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
    a: Tensor | None,
) -> Tensor:
    """`nf4.dispatch.matmul` on the weight rebuilt from its pieces (checked when first built)."""
    pieces = dict(zip(PIECES, (packed, absmax, code, nested_absmax, nested_offset, nested_code), strict=True))
    q = NF4Tensor.unflatten(pieces, NF4Meta(torch.Size(shape), dtype, blocksize, double_quant))
    return dispatch.matmul(x, q, trans, u, v, bias, mask, lora_scale, a=a)


@_matmul_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_offset, nested_code, shape, dtype, blocksize, double_quant,
      trans, u, v, bias, mask, lora_scale, a):  # fmt: skip
    return x.new_empty((x.shape[0], shape[1] if trans else shape[0]))


def matmul(x2, q: NF4Tensor, trans=False, u=None, v=None, bias=None, mask=None, lora_scale=1.0, a=None) -> Tensor:
    """`nf4.dispatch.matmul`: directly in plain eager mode, else through `nf4::matmul`."""
    if eager(x2):
        return dispatch.matmul(x2, q, trans, u, v, bias, mask, lora_scale, a=a)
    pieces, meta = q.decodable().flatten()  # a 16-bit nested absmax is decoded first: the schema has no flag
    return torch.ops.nf4.matmul(x2, **pieces, shape=list(meta.shape), dtype=meta.dtype, blocksize=meta.blocksize,
                                double_quant=meta.double_quant, trans=trans, u=u, v=v, bias=bias, mask=mask,
                                lora_scale=float(lora_scale), a=a)  # fmt: skip


@torch.library.custom_op("nf4::matmul_adapters", mutates_args=())
def _matmul_adapters_op(
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
    a_bank: Tensor,
    v_bank: Tensor,
    scales: Tensor,
    index: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """`nf4.dispatch.matmul_adapters` on the weight rebuilt from its pieces."""
    pieces = dict(zip(PIECES, (packed, absmax, code, nested_absmax, nested_offset, nested_code), strict=True))
    q = NF4Tensor.unflatten(pieces, NF4Meta(torch.Size(shape), dtype, blocksize, double_quant))
    return dispatch.matmul_adapters(x, q, a_bank, v_bank, scales, index, bias)


@_matmul_adapters_op.register_fake
def _(x, packed, absmax, code, nested_absmax, nested_offset, nested_code, shape, dtype, blocksize, double_quant,
      a_bank, v_bank, scales, index, bias):  # fmt: skip
    return x.new_empty((x.shape[0], shape[0]))


def matmul_adapters(x2, q: NF4Tensor, a_bank, v_bank, scales, index, bias=None) -> Tensor:
    """`nf4.dispatch.matmul_adapters`: directly in plain eager mode, else through `nf4::matmul_adapters`."""
    if eager(x2):
        return dispatch.matmul_adapters(x2, q, a_bank, v_bank, scales, index, bias)
    pieces, meta = q.decodable().flatten()
    return torch.ops.nf4.matmul_adapters(x2, **pieces, shape=list(meta.shape), dtype=meta.dtype,
                                         blocksize=meta.blocksize, double_quant=meta.double_quant, a_bank=a_bank,
                                         v_bank=v_bank, scales=scales, index=index, bias=bias)  # fmt: skip


def eager(x: Tensor) -> bool:
    """Nothing traces or intercepts `x`. NOTE: in eager mode the op's wrapping costs more than a launch
    (benchmarks/bench_launch.py)."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )
