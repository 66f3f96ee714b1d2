"""DoRA on `nf4.lora`'s own layers (`LoRALinearNF4(use_dora=True)`, `apply_lora(use_dora=True)`): the
magnitude's initial value and its life through weight and state-dict loads, the output against PEFT's
formula, merging, and PEFT's adapter files both ways (`save_adapter` / `load_adapter`)."""

import copy
import json

import peft
import pytest
import torch
from test_adapter import TARGETS, logits, tiny_llama
from torch import nn

import nf4
from nf4.lora import LoRALinearNF4, apply_lora, load_adapter, merge_and_unload, save_adapter

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Modules and files, not kernels: the fast torch path."""


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))


def dora_trained(model, seed=0):
    """B random and the magnitude moved off its initial value, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinearNF4):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
                if m.use_dora:
                    m.lora_magnitude.mul_(1 + 0.3 * torch.rand(m.lora_magnitude.shape, generator=g))
    return model


def test_magnitude_starts_at_the_row_norms_and_survives_a_state_dict_load():
    lin = nn.Linear(48, 20)
    layer = LoRALinearNF4.from_linear(lin, r=4, use_dora=True)
    rows = layer.dequantize_weight(torch.float32).double().norm(dim=1)
    assert layer.lora_magnitude.requires_grad and layer.lora_magnitude.shape == (20,)
    assert (layer.lora_magnitude.double() - rows).abs().max() <= 4 * EPS32 * rows.max()
    dora_trained(layer)
    fresh = LoRALinearNF4(48, 20, r=4, use_dora=True)  # all-zero weight: magnitude 0 until loaded
    assert torch.equal(fresh.lora_magnitude, torch.zeros(20))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.lora_magnitude, layer.lora_magnitude)  # not reset when the weight arrives
    x = torch.randn(3, 48)
    assert torch.equal(fresh(x), layer(x))
    plain = LoRALinearNF4.from_linear(lin, r=4)
    assert not hasattr(plain, "lora_magnitude") and "lora_magnitude" not in plain.state_dict()


def test_forward_is_peft_dora_and_trains_the_magnitude():
    torch.manual_seed(1)
    layer = dora_trained(LoRALinearNF4.from_linear(nn.Linear(32, 24), r=4, lora_alpha=8, use_dora=True))
    x = torch.randn(5, 32)
    w = layer.dequantize_weight(torch.float32).double()
    a, b, m = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    v = w + 2.0 * b @ a
    want = (m / v.norm(dim=1)) * (x.double() @ v.t()) + layer.bias.double()
    got = layer(x)
    assert (got.double() - want).abs().max() <= 64 * EPS32 * (want.abs().max() + 1)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.lora_magnitude.grad is not None and layer.lora_magnitude.grad.abs().max() > 0


def test_merge_is_lossy_unmerge_exact_and_the_16_bit_merge_exact(ids):
    model = dora_trained(apply_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    expect = logits(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    magnitude = layer.lora_magnitude.detach().clone()
    layer.merge()
    assert torch.equal(layer.lora_magnitude, magnitude)  # a new weight does not reset a trained magnitude
    assert not torch.equal(layer.weight, before["weight"])
    layer.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    exact = merge_and_unload(copy.deepcopy(model))
    assert torch.allclose(logits(exact, ids), expect, atol=1e-4, rtol=1e-4)


def test_adapter_files_are_peft_dora_both_ways(tmp_path, ids):
    base = tiny_llama()
    ours = dora_trained(apply_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    # PEFT's DoRA on the same dequantized base weights gives our outputs
    dequantized = copy.deepcopy(base)
    for name, module in dequantized.named_modules():
        if type(module) is nn.Linear and name.endswith(tuple(TARGETS)):
            module.weight.data = nf4.dequantize(nf4.quantize(module.weight.data))
    theirs = peft.PeftModel.from_pretrained(dequantized, tmp_path / "ours").eval()
    layer = theirs.base_model.model.model.layers[1].self_attn.v_proj
    assert torch.equal(
        layer.lora_magnitude_vector["default"].weight, ours.model.layers[1].self_attn.v_proj.lora_magnitude
    )
    assert torch.allclose(logits(theirs, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)
    # and PEFT's file back into nf4 layers
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(tiny_llama(), tmp_path / "theirs")
    assert back.model.layers[1].self_attn.v_proj.use_dora
    assert torch.allclose(logits(back, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_a_model_mixing_dora_and_plain_layers_is_refused_by_save(tmp_path):
    model = apply_lora(tiny_llama(), r=2, target_modules=["q_proj"], use_dora=True)
    model.model.layers[0].mlp.down_proj = LoRALinearNF4.from_linear(model.model.layers[0].mlp.down_proj, r=2)
    with pytest.raises(ValueError, match="mix DoRA and plain LoRA"):
        save_adapter(model, tmp_path)


def test_inference_computes_the_weight_norms_once_and_training_never_reuses_the_norm(monkeypatch):
    """||W_j||^2 once per weight and the adapter's norm once per (A, B) under no_grad in eval; a step
    with gradients, or dropout in training, recomputes the norm from the current A and B; an in-place
    change of B invalidates the cached norm."""
    import nf4.lora.dora as dora

    calls = {"weight_sq": 0, "norm": 0}
    sq, norm = dora.weight_norm_sq, dora.dora_weight_norm

    def counted_sq(*a, **k):
        calls["weight_sq"] += 1
        return sq(*a, **k)

    def counted_norm(*a, **k):
        calls["norm"] += 1
        return norm(*a, **k)

    monkeypatch.setattr(dora, "weight_norm_sq", counted_sq)
    monkeypatch.setattr(dora, "dora_weight_norm", counted_norm)
    layer = dora_trained(LoRALinearNF4.from_linear(nn.Linear(32, 12), r=4, use_dora=True, lora_dropout=0.25))
    x = torch.randn(3, 32)
    calls.update(weight_sq=0, norm=0)
    layer.eval()
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2) and calls == {"weight_sq": 1, "norm": 1}
    with torch.no_grad():
        layer.lora_B.mul_(2)
        y3 = layer(x)
    assert calls == {"weight_sq": 1, "norm": 2} and not torch.equal(y3, y1)
    layer(x).sum().backward()  # gradients: the norm comes from this call's A and B, not the cache
    layer.train()
    with torch.no_grad():
        layer(x)  # dropout runs in training
    assert calls == {"weight_sq": 1, "norm": 2}
    assert layer.lora_magnitude.grad is not None
