"""Exact merge for export: `dequant(W) + scaling * B @ A` (DoRA: PEFT's `m / ||.|| * (...)`) in fp32,
rounded once into nn.Linear.
(`LoRALinearNF4.merge()` requantizes to 4 bits instead, losing much of the update.)
"""

from __future__ import annotations

import torch
from torch import nn

from nf4.api import dequantize
from nf4.lora.modules import LinearNF4, LoRALinearNF4


def merged_weight(layer: LinearNF4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequant(W) [+ scaling * B @ A]` in fp32, rounded once to `dtype` (default: W's dtype)."""
    weight = layer.nf4_weight
    w = dequantize(weight, torch.float32)
    if isinstance(layer, LoRALinearNF4) and not layer.merged:
        w = layer.adapted_weight(w)
    return w.to(dtype or weight.dtype)


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, include_base: bool = True) -> nn.Module:
    """Replace each LoRALinearNF4 (LinearNF4 too if `include_base`) by an nn.Linear of `merged_weight`,
    bias kept, in place; returns `model`."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoRALinearNF4) or (include_base and isinstance(m, LinearNF4))
    ]
    for name, layer in targets:
        weight = merged_weight(layer, dtype)
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.to(weight.dtype))
        model.set_submodule(name, linear)
    return model
