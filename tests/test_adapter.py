"""Adapters in PEFT's format, both ways, and merging."""

import copy
import json
import math

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import nf4
from helpers import nf4_error_bound
from nf4.lora import LinearNF4, LoRALinearNF4, apply_lora, load_adapter, merge_and_unload, quantize_model, save_adapter
from nf4.lora.adapter import lora_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """These tests are about files and modules, not kernels: the fast torch path."""


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def trained(model, std=0.05):
    for m in model.modules():
        if isinstance(m, LoRALinearNF4):
            nn.init.normal_(m.lora_B, std=std)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_saved_adapter_loads_in_peft_on_the_unquantized_model(tmp_path, ids):
    base = tiny_llama()
    ours = trained(apply_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=TARGETS))
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinearNF4):
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert torch.equal(peft_layer.lora_A["default"].weight, m.lora_A)
            assert torch.equal(peft_layer.lora_B["default"].weight, m.lora_B)
    # outputs agree up to the quantization of the base: compare against the same adapter on the
    # dequantized base weights
    dequantized = copy.deepcopy(base)
    for name, module in dequantized.named_modules():
        if type(module) is nn.Linear and name.endswith(tuple(TARGETS)):
            module.weight.data = nf4.dequantize(nf4.quantize(module.weight.data))
    on_dequantized = peft.PeftModel.from_pretrained(dequantized, tmp_path).eval()
    assert torch.allclose(logits(on_dequantized, ids), logits(ours, ids), atol=1e-4, rtol=1e-4)
    lora_effect = (logits(theirs, ids) - logits(base, ids)).abs().max()
    quantization = (logits(theirs, ids) - logits(ours, ids)).abs().max()
    assert lora_effect > 0.05 and quantization < lora_effect


def test_peft_saved_adapter_loads_into_ours(tmp_path, ids):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                                     use_rslora=True))  # fmt: skip
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path).eval()  # plain nn.Linear layers get quantized
    layers = [m for m in ours.modules() if isinstance(m, LoRALinearNF4)]
    assert len(layers) == 6 and all(m.scaling == 16 / 2 for m in layers)  # rsLoRA: alpha / sqrt(r)
    reference = apply_lora(copy.deepcopy(base), r=4, lora_alpha=16, use_rslora=True, target_modules=TARGETS)
    for name, m in reference.named_modules():
        if isinstance(m, LoRALinearNF4):
            peft_layer = theirs.base_model.model.get_submodule(name)
            m.lora_A.data.copy_(peft_layer.lora_A["default"].weight)
            m.lora_B.data.copy_(peft_layer.lora_B["default"].weight)
    assert torch.equal(logits(ours, ids), logits(reference, ids))


def test_round_trip_into_existing_nf4_layers(tmp_path, ids):
    model = trained(apply_lora(tiny_llama(), r=3, lora_alpha=6))
    model.model.layers[0].self_attn.q_proj.r  # noqa: B018 - a LoRALinearNF4 layer
    save_adapter(model, tmp_path)
    fresh = apply_lora(tiny_llama(), r=3, lora_alpha=6)
    packed = fresh.model.layers[0].mlp.up_proj.weight.clone()
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, packed)  # not requantized
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    inference = quantize_model(tiny_llama(), progress=False)  # LinearNF4 layers gain adapters
    load_adapter(inference, tmp_path)
    assert torch.equal(logits(inference, ids), logits(model, ids))


def test_mixed_ranks_use_peft_patterns(tmp_path):
    model = apply_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    model.model.layers[1].mlp.down_proj = LoRALinearNF4.from_linear(nn.Linear(96, 64), r=2, lora_alpha=3)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 3}
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert loaded.model.layers[1].mlp.down_proj.r == 2 and loaded.model.layers[0].mlp.down_proj.r == 4


MIXED = {  # module: (r, lora_alpha), against the adapter's r = 4, lora_alpha = 8
    "model.layers.1.mlp.down_proj": (2, 3),  # both patterns
    "model.layers.0.self_attn.v_proj": (4, 5),  # alpha_pattern only
    "model.layers.1.self_attn.q_proj": (6, 8),  # rank_pattern only
}


def dequantized_base(base):
    """`base` with the target layers' weights replaced by their NF4 round trip (what ours computes with)."""
    model = copy.deepcopy(base)
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.endswith(tuple(TARGETS)):
            module.weight.data = nf4.dequantize(nf4.quantize(module.weight.data))
    return model


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_every_numeric_config_field_round_trips(tmp_path, ids, use_rslora):
    """lora_alpha, rank_pattern, alpha_pattern and use_rslora (the PEFT fields that change the outputs)
    survive save_adapter -> load_adapter: every layer comes back with its r, alpha and scaling
    (alpha / r, or alpha / sqrt(r) with rsLoRA, from PEFT's definition) and the logits are identical;
    PEFT reads the same files to the same ranks, scalings and (on the dequantized base) logits."""
    base = tiny_llama()
    model = apply_lora(copy.deepcopy(base), r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=TARGETS)
    for name, (r, alpha) in MIXED.items():
        linear = copy.deepcopy(base.get_submodule(name))
        model.set_submodule(name, LoRALinearNF4.from_linear(linear, r=r, lora_alpha=alpha, use_rslora=use_rslora))
    trained(model, std=0.2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, use_rslora)
    assert config["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 6}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 3, "model.layers.0.self_attn.v_proj": 5}

    loaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    theirs = peft.PeftModel.from_pretrained(dequantized_base(base), tmp_path).eval()
    layers = lora_layers(model)
    assert set(lora_layers(loaded)) == set(layers) and len(layers) == 6
    for name in layers:
        r, alpha = MIXED.get(name, (4, 8))
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        got = loaded.get_submodule(name)
        assert (got.r, got.lora_alpha, got.use_rslora, got.scaling) == (r, alpha, use_rslora, scaling), name
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert (peft_layer.r["default"], peft_layer.scaling["default"]) == (r, scaling), name
    expect = logits(model, ids)
    assert torch.equal(logits(loaded, ids), expect)
    assert torch.allclose(logits(theirs, ids), expect, atol=1e-4, rtol=1e-4)
    assert (expect - logits(dequantized_base(base), ids)).abs().max() > 0.05  # the adapter's effect shows


def test_mismatched_adapter_is_refused_listing_every_problem(tmp_path):
    from safetensors.torch import save_file

    model = apply_lora(tiny_llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    save_adapter(model, tmp_path)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 65),  # wrong in
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),  # no such layer
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        "base_model.model.model.norm.lora_A.weight": torch.zeros(4, 64),  # not a Linear
        "base_model.model.model.norm.lora_B.weight": torch.zeros(64, 4),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": torch.zeros(4, 64),  # B missing
    }
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = tiny_llama()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as e:
        load_adapter(target, tmp_path)
    message = str(e.value)
    assert "model.layers.0.self_attn.q_proj: lora_A [4, 65] / lora_B [64, 4] do not fit" in message
    assert "model.layers.9.self_attn.q_proj: no such module" in message
    assert "model.norm: is a LlamaRMSNorm, not a Linear layer" in message
    assert "model.layers.1.self_attn.v_proj: has ['lora_A'] but needs lora_A and lora_B" in message
    after = target.state_dict()  # nothing was changed
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_weights", "bad_json", "dora"])
def test_damaged_files_are_refused(tmp_path, damage):
    model = apply_lora(tiny_llama(), r=2, target_modules=TARGETS)
    save_adapter(model, tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "dora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    message = {
        "truncate": "not a readable safetensors file", "garbage": "not a readable safetensors file",
        "no_weights": "has neither adapter_model.safetensors", "bad_json": "is not valid JSON",
        "dora": "needs lora_A and lora_B and lora_magnitude_vector",  # a DoRA config without magnitudes
    }[damage]  # fmt: skip
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adapter(tiny_llama(), tmp_path)


def test_legacy_bin_loads_with_weights_only(tmp_path, ids):
    from safetensors.torch import load_file

    model = trained(apply_lora(tiny_llama(), r=2, lora_alpha=4, target_modules=TARGETS))
    save_adapter(model, tmp_path)
    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    assert torch.equal(logits(load_adapter(tiny_llama(), tmp_path), ids), logits(model, ids))
    torch.save({"x": object()}, tmp_path / "adapter_model.bin")  # a pickle that is not just tensors
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_adapter(tiny_llama(), tmp_path)


def test_save_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinearNF4 layers"):
        save_adapter(tiny_llama(), tmp_path)


# -- merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_merge_into_16_bit_is_exact(ids, use_rslora):
    model = trained(apply_lora(tiny_llama(), r=4, lora_alpha=8, use_rslora=use_rslora))
    expect = logits(model, ids)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, LinearNF4) for m in merged.modules())
    assert torch.allclose(logits(merged, ids), expect, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].self_attn.q_proj
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4  # PEFT's definition, not the layer's attribute
    w = nf4.dequantize(layer.nf4_weight, torch.float32) + scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, w)
    half = merge_and_unload(copy.deepcopy(model), dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merge_into_nf4_reports_the_loss_and_unmerges_exactly(ids):
    model = trained(apply_lora(tiny_llama(), r=4, lora_alpha=8), std=0.005)  # a realistic, small update
    expect = logits(model, ids)
    layer = model.model.layers[0].mlp.up_proj
    before = {k: v.clone() for k, v in layer.nf4_weight.to_bnb_state_dict().items()}
    delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
    target = nf4.dequantize(layer.nf4_weight, torch.float32) + delta
    stats = layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    # the merged weight is the NF4 quantization of base + update: the same bytes, so within the format's
    # error bound of it. An update this small moves few codes while the new blocks' absmax moves every
    # value a little: most of it is lost (update_lost 0.86 here; above 1 on some layers). The upper bound
    # that needs a larger update (closer to base + update than the base) is in test_merge.py.
    assert torch.equal(layer.nf4_weight.packed, nf4.quantize(target).packed)
    error = nf4.dequantize(layer.nf4_weight, torch.float32) - target
    assert torch.all(error.abs().double() <= nf4_error_bound(target, 64, double_quant=True))
    assert set(stats) == {"update_norm", "error_norm", "update_lost"}
    assert stats["update_lost"] == pytest.approx(float(error.norm() / delta.norm()), rel=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    # exported while merged: the adapter is inside the NF4 weight and is not added a second time
    exported = merge_and_unload(copy.deepcopy(model)).model.layers[0].mlp.up_proj
    assert torch.equal(exported.weight, nf4.dequantize(layer.nf4_weight, torch.float32))
    layer.unmerge()
    assert all(torch.equal(before[k], v) for k, v in layer.nf4_weight.to_bnb_state_dict().items())
    assert torch.equal(logits(model, ids), expect)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
