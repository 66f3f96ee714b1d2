"""The NF4 format's constants and small types: a leaf module (tests/test_import_graph.py keeps it one).

A quantized weight is named pieces (`PIECES`, in this order) plus metadata (`NF4Meta`):

    packed         uint8   [(n + 1) // 2, 1]        two codes per byte, element 2k in the high nibble
    absmax         float32 [nblocks]                (plain), or uint8 [nblocks] (double-quantized codes)
    code           float32 [16]                     the NF4 table (bitsandbytes' `quant_map`)
    nested_absmax  float32 [ceil(nblocks / 256)]    } double quantization only (None without): absmax is
    nested_offset  float32 []                       }   nested_code[q] * nested_absmax[b // 256]
    nested_code    float32 [256]                    }   + nested_offset

`NF4Meta.nested_dtype`: what that decode rounds through (d), fp32 unless a bitsandbytes checkpoint
records bf16 / fp16: then `d(d(map[q] * absmax2) + offset)`.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""bitsandbytes' block sizes (transformers' checkpoints use 64)."""

NESTED_BLOCKSIZE = 256
"""Block size of the absmax's double quantization."""

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Original dtypes, by bitsandbytes' serialized names."""

PIECES = ("packed", "absmax", "code", "nested_absmax", "nested_offset", "nested_code")
"""A weight's tensors in canonical order (the last three: double quant only)."""

NESTED_PIECES = PIECES[3:]


class NF4Meta(NamedTuple):
    """A weight's metadata: original shape and dtype, blocksize, double quantization, nested_dtype."""

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    double_quant: bool
    nested_dtype: torch.dtype = torch.float32


def check_blocksize(blocksize) -> int:
    """`blocksize` as an int if in `BLOCKSIZES`, else ValueError."""
    if not isinstance(blocksize, bool):
        try:
            value = operator.index(blocksize)
        except TypeError:
            value = None
        if value in BLOCKSIZES:
            return value
    raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
