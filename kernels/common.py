"""Pieces shared by the kernel files: interpreter detection, launch configurations, rounding helpers."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton runs kernels through its CPU interpreter (set before this module is imported)."""

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of a kernel: what `triton.compile` needs to build it ahead of time.

    `signature` maps every non-constexpr argument to its Triton type (`"*fp32"`, `"i64"`, ...);
    `constexprs` holds the meta-parameters; `options` the compile options (num_warps, ...).
    """

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
        """What selects the code path traced: the kernel and its boolean meta-parameters (tile sizes
        change shapes, not which statements are compiled)."""
        flags = tuple(sorted((k, v) for k, v in self.constexprs.items() if isinstance(v, bool)))
        return (self.kernel.__name__, flags, tuple(self.signature.values()))


IEEE_DIV_STACK = 32
"""Stack bytes the IEEE division's slow-path subroutine may take (kernels that call `tl.math.div_rn`).

NOTE: `div.rn.f32` compiles to MUFU.RCP + FMA refinement with a CALL to a slow-path subroutine for
divisors near the ends of the exponent range. ptxas from triton 3.6 gives that subroutine a 32-byte
stack frame (seen in every quantize configuration, sm_80 and sm_90); triton 3.9's needs none. Our
divisors are pre-scaled into [2**-64, 2**64] (`nf4.reference.unit_scale`), so the slow path, and with
it the stack, is never used at run time. Any other stack use, or any spill, still fails the report.
"""


def float32_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: for byte b, the float32 bits of code[b >> 4] (low word) and code[b & 15] (high word)."""
    bits = code.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256, device=code.device)
    return bits[byte >> 4] | (bits[byte & 15] << 32)


def nested_pointers(weight) -> tuple:
    """(nested_absmax, nested_offset, nested_code) of the NF4Tensor `weight` for a kernel's arguments:
    the pieces with double quantization (the 0-d offset as is: a kernel only needs its address), else
    absmax three times (never read when DOUBLE_QUANT is off)."""
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
    """The pair table of the NF4 code on `device`, built once (every NF4Tensor's code is the NF4 table:
    checked when the NF4Tensor is built, so kernels never read the per-tensor copy)."""
    from nf4.codebook import NF4_CODE

    return float32_pair_table(NF4_CODE.to(device))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA `device` (cached: the property query costs a driver call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints. NOTE: `triton.cdiv` is a JIT function whose Python call costs ~5 µs
    (cProfile, this project's CPU); launchers call this one, several times per call."""
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
    """Widen x (fp32/fp16/bf16) to fp32 exactly.

    NOTE: Triton's interpreter (3.9) converts bf16 subnormals wrongly (254 of the 65536 bf16 values
    come out as other numbers), so under the interpreter (`SOFT_BF16`) bf16 is widened by moving its
    bits to the top half of a 32-bit word, which is what the GPU's conversion does too.
    """
    if SOFT_BF16 and x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 `x` to `dtype` to nearest even.

    NOTE: Triton's interpreter (3.6 and 3.9) truncates fp32 -> bf16 instead of rounding (half of
    random values come out one ulp low), so under the interpreter (`SOFT_BF16`) bf16 is rounded with
    integer arithmetic; on a GPU the conversion instruction rounds to nearest even itself.
    """
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
