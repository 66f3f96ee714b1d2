"""nf4: 4-bit NormalFloat (NF4) weights for QLoRA, bitsandbytes-compatible, with Triton kernels.

    q = nf4.quantize(weight)          # NF4Tensor: packed codes + (double-quantized) absmax
    w = nf4.dequantize(q)             # back to the original dtype and shape

Importing this package does not import Triton or initialise CUDA.
"""

from nf4.api import dequantize, quantize
from nf4.codebook import FP4_CODE, NF4_CODE, dynamic_map, normal_float_code
from nf4.tensor import BLOCKSIZES, NF4Tensor

__all__ = [
    "BLOCKSIZES",
    "FP4_CODE",
    "NF4_CODE",
    "NF4Tensor",
    "dequantize",
    "dynamic_map",
    "normal_float_code",
    "quantize",
]
__version__ = "0.1.0"
