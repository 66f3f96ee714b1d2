"""nf4: 4-bit NormalFloat (NF4) weights for QLoRA, bitsandbytes-compatible, with Triton kernels.

    q = nf4.quantize(weight)          # NF4Tensor: packed codes + (double-quantized) absmax
    w = nf4.dequantize(q)             # back to the original dtype and shape
    nf4.lora.LoRALinearNF4            # the subpackages load on first use: nf4.lora, nf4.kernels

Importing this package does not import Triton or initialise CUDA (`nf4.kernels` imports Triton).
"""

import importlib

from nf4.api import decode_absmax, dequantize, quantize
from nf4.codebook import FP4_CODE, NF4_CODE, dynamic_map, normal_float_code
from nf4.tensor import BLOCKSIZES, NF4Tensor

__all__ = [
    "BLOCKSIZES",
    "FP4_CODE",
    "NF4_CODE",
    "NF4Tensor",
    "decode_absmax",
    "dequantize",
    "dynamic_map",
    "normal_float_code",
    "quantize",
]
__version__ = "0.1.0"

_SUBPACKAGES = ("kernels", "lora")


def __getattr__(name: str):
    """`nf4.lora` / `nf4.kernels` without a separate import: loaded on first access."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"nf4.{name}")
    raise AttributeError(f"module 'nf4' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBPACKAGES])
