"""The NF4 format's constants and small types: a leaf module every layer may import.

Arrows run one way: `nf4.lora` -> `nf4.kernels` -> this module (and `nf4.codebook`); nothing here imports
another part of the package. `tests/test_import_graph.py` keeps it so.

A quantized weight is a set of named pieces (`PIECES`, always in this order) plus its metadata (`NF4Meta`):

    packed         uint8   [(n + 1) // 2, 1]        two codes per byte, element 2k in the high nibble
    absmax         float32 [nblocks]                (plain), or uint8 [nblocks] (double-quantized codes)
    code           float32 [16]                     the NF4 table (bitsandbytes' `quant_map`)
    nested_absmax  float32 [ceil(nblocks / 256)]    } double quantization only (None without): absmax is
    nested_offset  float32 []                       }   nested_code[q] * nested_absmax[b // 256]
    nested_code    float32 [256]                    }   + nested_offset

`NF4Meta.nested_dtype` is the dtype that decode rounds through (bitsandbytes' `nested_dtype`): float32 for
everything nf4 writes; bitsandbytes writes bfloat16 or float16 (the weight's dtype) when it repacks a layer
for its CPU kernel and undoes it, and then decodes `d(d(map[q] * absmax2) + offset)`, rounded to d twice.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes the format allows (bitsandbytes' set; checkpoints from transformers use 64)."""

NESTED_BLOCKSIZE = 256
"""Block size of the second-level (double) quantization of the absmax constants."""

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Original dtypes a quantized tensor may have, by the names bitsandbytes serializes."""

PIECES = ("packed", "absmax", "code", "nested_absmax", "nested_offset", "nested_code")
"""The tensors of a quantized weight, in their one canonical order (the last three: double quant only)."""

NESTED_PIECES = PIECES[3:]


class NF4Meta(NamedTuple):
    """What a quantized weight is, besides its tensors: the original shape and dtype, the blocksize,
    whether the absmax constants are double-quantized (the nested pieces are present), and the dtype
    their decode rounds to (see the module docstring; float32 unless a bitsandbytes checkpoint says
    otherwise)."""

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    double_quant: bool
    nested_dtype: torch.dtype = torch.float32


def check_blocksize(blocksize) -> int:
    """`blocksize` as an int if it is one of `BLOCKSIZES` (ints, numpy ints), else ValueError."""
    if not isinstance(blocksize, bool):
        try:
            value = operator.index(blocksize)
        except TypeError:
            value = None
        if value in BLOCKSIZES:
            return value
    raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
