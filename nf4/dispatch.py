"""The one place that decides whether an operation runs the Triton kernels or the torch reference.

CUDA tensors run the Triton kernels. CPU tensors run the torch reference, unless `TRITON_INTERPRET=1`
was set in the environment before `nf4` was imported: then they run the same Triton kernels through
Triton's CPU interpreter (how the test suite checks the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Read once, at import: Triton itself reads the variable when `nf4.kernels` is first imported."""


def use_kernels(device: torch.device) -> bool:
    """True when tensors on `device` run the Triton kernels, False for the torch reference."""
    if device.type == "cuda":
        return True
    return INTERPRET and device.type == "cpu"
