"""Merging adapters for export: exactly into 16-bit nn.Linear layers.

`merge_and_unload(model)` replaces every LoRALinearNF4 by an ordinary nn.Linear whose weight is
`dequant(W) + scaling * B @ A`, computed in float32 and rounded once to the chosen dtype: the fine-tune
is kept exactly (up to that rounding), and the result loads anywhere. The other way,
`LoRALinearNF4.merge()`, folds the adapter back into a 4-bit weight; that requantization loses much of
the update (see its docstring, and `nf4 demo`, which measures both).
"""

from __future__ import annotations

import torch
from torch import nn

from nf4.api import dequantize
from nf4.lora.modules import LinearNF4, LoRALinearNF4


def merged_weight(layer: LinearNF4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequant(W) [+ scaling * B @ A]` in float32, rounded once to `dtype` (default: W's dtype)."""
    weight = layer.nf4_weight
    w = dequantize(weight, torch.float32)
    if isinstance(layer, LoRALinearNF4) and not layer.merged:
        w = w + layer.delta_weight()
    return w.to(dtype or weight.dtype)


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, include_base: bool = True) -> nn.Module:
    """Replace every LoRALinearNF4 (and, with `include_base`, every LinearNF4) of `model` by an nn.Linear
    holding the merged 16-bit weight, in place; returns the model. `dtype` defaults to each weight's
    original dtype. Biases are kept."""
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
