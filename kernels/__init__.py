"""Triton kernels and their launchers: tensors in, tensors out, no autograd.

Import this module only after deciding on `TRITON_INTERPRET` (Triton reads it at import).
"""

from nf4.kernels.dequantize import dequantize_nf4
from nf4.kernels.quantize import quantize_absmax, quantize_nf4

__all__ = ["dequantize_nf4", "quantize_absmax", "quantize_nf4"]
