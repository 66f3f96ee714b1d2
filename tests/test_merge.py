"""Merging adapters (lora/merge.py and LoRALinearNF4.merge): exactly into 16-bit layers, and lossily
back into NF4 with an exact unmerge."""

import copy

import pytest
import torch
from torch import nn

import nf4
from helpers import (
    assert_linear_within_float32,
    nf4_error_bound,
    peft_scaling,
    trained_layer,
)
from nf4.lora import (
    merge_and_unload,
    merged_weight,
)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_every_16_bit_merge_path_uses_the_layers_scaling(reference_path, use_rslora):
    """`delta_weight`, `merged_weight` and `merge_and_unload` fold in the scaling the forward uses
    (lora_alpha / sqrt(r) with rsLoRA): the exported nn.Linear and the layer both compute the float64
    formula within float32's worst-case accumulation error (gamma_n = n * eps / 2 per term)."""

    layer = trained_layer(64, 48, use_rslora)
    scaling = peft_scaling(4, 6, use_rslora)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    w = nf4.dequantize(layer.nf4_weight, torch.float32)
    assert layer.scaling == scaling
    assert torch.equal(layer.delta_weight(), scaling * (b @ a))
    assert torch.equal(merged_weight(layer), w + scaling * (b @ a))
    exported = merge_and_unload(nn.Sequential(copy.deepcopy(layer)))[0]
    assert type(exported) is nn.Linear and torch.equal(exported.weight, w + scaling * (b @ a))

    x = torch.randn(5, 64)
    with torch.no_grad():
        for y in (layer(x), exported(x)):
            assert_linear_within_float32(y, x, w.double() + scaling * b.double() @ a.double(), layer.bias)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_merge_into_nf4_requantizes_base_plus_update(reference_path, use_rslora, double_quant):
    """`merge()` stores quantize(dequant(W) + scaling * B @ A), byte for byte (rsLoRA's scaling
    included): within the format's error bound of the intended weight (`helpers.nf4_error_bound`) and,
    for an update that moves codes, closer to it than the base alone. The reported norms are those of
    the weights; `unmerge()` restores the base bytes."""
    layer = trained_layer(256, 96, use_rslora, double_quant, std=0.05)
    base_q = layer.nf4_weight
    base = nf4.dequantize(base_q, torch.float32)
    delta = peft_scaling(4, 6, use_rslora) * (layer.lora_B.detach() @ layer.lora_A.detach())
    target = base + delta
    stats = layer.merge()
    expect = nf4.quantize(target, 64, double_quant)
    for name, t in expect._tensors().items():
        assert torch.equal(getattr(layer.nf4_weight, name), t), name
    merged = nf4.dequantize(layer.nf4_weight, torch.float32)
    error = merged - target
    assert torch.all(error.abs().double() <= nf4_error_bound(target, 64, double_quant))
    assert error.norm() < delta.norm()  # the base alone is off by the whole update (measured ~0.45 of it)
    assert stats["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert stats["error_norm"] == pytest.approx(float(error.norm()), rel=1e-6)
    assert stats["update_lost"] == pytest.approx(float(error.norm() / delta.norm()), rel=1e-6)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert_linear_within_float32(layer(x), x, merged.double(), layer.bias)  # the adapter is not added again
        layer.unmerge()
    for name, t in base_q._tensors().items():
        assert torch.equal(getattr(layer.nf4_weight, name), t), name
