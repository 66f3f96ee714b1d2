"""Pieces shared by the kernel files: interpreter detection, launch configurations, rounding helpers."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from nf4.env import INTERPRET  # noqa: F401  (the kernel files import it from here)

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of a kernel, as `triton.compile` builds it ahead of time: signature (Triton
    types of the non-constexpr arguments), constexprs, compile options."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    large_m: bool = False  # a large-M (training / prefill) tile: on sm_90 it must use wgmma
    stack_ok: int = 0  # stack bytes allowed (see `IEEE_DIV_STACK`); spills are never allowed
    aligned_only: bool = False  # the launcher runs it only on 16-byte aligned tensors (no "plain" variant)
    archs: tuple[int, ...] = ()  # the only GPU architectures it is launched on (e.g. (90,)); () for all

    @property
    def path(self) -> tuple:
        """What selects the traced code path: the kernel and its boolean meta-parameters."""
        flags = tuple(sorted((k, v) for k, v in self.constexprs.items() if isinstance(v, bool)))
        return (self.kernel.__name__, flags, tuple(self.signature.values()))


IEEE_DIV_STACK = 32
"""Stack bytes allowed where `tl.math.div_rn` is called: triton 3.6 gives its slow path a 32-byte frame.
NOTE: never run: divisors are pre-scaled into [2**-64, 2**64] (`nf4.reference.unit_scale`); other stack
fails tests/test_compile.py."""


def float32_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: byte b -> float32 bits of code[b >> 4] (low word) and code[b & 15] (high word)."""
    bits = code.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256, device=code.device)
    return bits[byte >> 4] | (bits[byte & 15] << 32)


def nested_pointers(weight) -> tuple:
    """(nested_absmax, nested_offset, nested_code) of `weight` for a kernel's arguments; absmax three
    times without double quantization (never read)."""
    if weight.double_quant:
        return weight.nested_absmax, weight.nested_offset, weight.nested_code
    return weight.absmax, weight.absmax, weight.absmax


def weight_signature(double_quant: bool) -> dict[str, str]:
    """The pointer types of an NF4 weight's pieces in a kernel signature (codes, absmax, nested pieces)."""
    return {
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8" if double_quant else "*fp32",
        "nested_absmax_ptr": "*fp32",
        "nested_offset_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
    }


@functools.cache
def nf4_pairs(device: torch.device) -> torch.Tensor:
    """`float32_pair_table` of the NF4 code on `device`, cached (every NF4Tensor's code is NF4)."""
    from nf4.codebook import NF4_CODE

    return float32_pair_table(NF4_CODE.to(device))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA `device` (cached)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints (`triton.cdiv` is a JIT function, ~5 µs per Python call)."""
    return -(-a // b)


def ptr_type(dtype: torch.dtype) -> str:
    """Triton signature string of a pointer to `dtype` elements, e.g. `*bf16`."""
    return (
        "*"
        + {
            torch.float32: "fp32",
            torch.float16: "fp16",
            torch.bfloat16: "bf16",
            torch.uint8: "u8",
            torch.int32: "i32",
        }[dtype]
    )


@triton.jit
def to_f32(x, SOFT_BF16: tl.constexpr):
    """Widen x to fp32 exactly. NOTE: the interpreter widens bf16 subnormals wrongly; SOFT_BF16 moves the
    bits instead (tests/test_kernels.py is bit-exact)."""
    if SOFT_BF16 and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 `x` to `dtype`, to nearest even. NOTE: the interpreter truncates to bf16; SOFT_BF16
    rounds in integers (tests/test_kernels.py)."""
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
