"""DoRA (`use_dora=True`) on nf4 through PEFT: against PEFT's DoRA on bitsandbytes with the same bytes
(outputs, gradients, the magnitude's initial value, several adapters, merging, files both ways), the
inference cache, and what is refused.

Tolerance: `hf_helpers.close` (twice float32's error on these sums at the output's scale).
"""

import copy

import peft
import pytest
import torch
from hf_helpers import close, load_bnb, load_nf4

import nf4.hf
from helpers import count_calls
from nf4.hf import peft as nf4_peft
from nf4.lora import LinearNF4

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole models on the CPU: the torch path, not the kernel interpreter."""


@pytest.fixture
def ids():
    return torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def dora(model, seed=1, name="default", **kwargs):
    config = peft.LoraConfig(**dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True), **kwargs))
    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, config)
    else:
        model = peft.get_peft_model(model, config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif f"lora_magnitude_vector.{name}" in pname:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return model


def pair(tiny32, **kwargs):
    """(nf4, bitsandbytes) PEFT DoRA models holding the same adapter parameters, in training mode (the
    bitsandbytes CPU inference path repacks and rounds: not the oracle)."""
    ours = dora(load_nf4(tiny32, double_quant=False), **kwargs)
    theirs = peft.get_peft_model(load_bnb(tiny32, double_quant=False), copy.deepcopy(ours.peft_config["default"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(ours.get_parameter(name))
    return ours.train(), theirs.train()


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nf4_peft.PeftLinearNF4)}


def test_magnitude_starts_at_the_row_norms_of_the_dequantized_base(tiny32):
    ours = peft.get_peft_model(load_nf4(tiny32, double_quant=False), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                                        use_dora=True))  # fmt: skip
    theirs = peft.get_peft_model(load_bnb(tiny32, double_quant=False), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                                          use_dora=True))  # fmt: skip
    mine = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mine) == 6 and all(p.requires_grad and p.dtype == torch.float32 for p in mine.values())
    for name, p in theirs.named_parameters():
        if "lora_magnitude_vector" in name:
            want = p.detach()
            assert (mine[name].detach() - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.max(), name


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
def test_outputs_and_gradients_agree_with_peft_dora_on_bitsandbytes(monkeypatch, tiny32, ids, dtype):
    ours, theirs = pair(tiny32)
    calls = count_calls(monkeypatch, nf4_peft, ["dora_forward", "lora_linear"])
    a, b = ours(ids).logits, theirs(ids).logits
    assert calls == {"dora_forward": 6, "lora_linear": 0}  # one DoRA call per adapted layer
    assert close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(grads) and sum("lora_magnitude_vector" in n for n in mine) == 6
    for name, p in mine.items():
        assert close(p.grad, grads[name]), name


def test_inference_caches_the_norm_until_the_adapter_changes(tiny32, ids):
    ours, _ = pair(tiny32)
    expect = ours(ids).logits.detach()
    ours.eval()
    layer = next(iter(layers(ours).values()))
    with torch.no_grad():
        assert close(ours(ids).logits, expect)
        cached = layer._nf4_dora_cache[("norm", "default")][1]
        assert close(ours(ids).logits, expect) and layer._nf4_dora_cache[("norm", "default")][1] is cached  # reused
        layer.lora_B["default"].weight.mul_(3)  # in place: the cache sees the version change
        ours.train()
        changed = ours(ids).logits
        ours.eval()
        assert close(ours(ids).logits, changed) and not close(changed, expect)
        assert layer._nf4_dora_cache[("norm", "default")][1] is not cached


def test_dora_and_lora_adapters_active_together_match_peft(tiny32):
    ours, theirs = pair(tiny32)
    for model in (ours, theirs):
        model.add_adapter("plain", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
        dora(model, seed=3, name="second", r=2, target_modules=["q_proj"])
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name and ("plain" in name or "second" in name):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1 + (
                    1 if "magnitude" in name else 0))  # fmt: skip
                ours.get_parameter(name).copy_(p)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    got, want = [], []
    for model, out in ((ours, got), (theirs, want)):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.set_adapter(["default", "plain", "second"])
        out.append(layer(x))
    assert close(got[0], want[0])
    ours.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        ours(torch.ones(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])


def test_merge_is_lossy_unmerge_exact_and_the_16_bit_merge_exact(tiny32, ids):
    ours, _ = pair(tiny32)
    ours.eval()
    with torch.no_grad():
        expect = ours(ids).logits
        layer = ours.base_model.model.model.layers[1].mlp.down_proj
        before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        with pytest.warns(UserWarning, match="requantizes it"):
            ours.merge_adapter()
        merged = ours(ids).logits
        ours.unmerge_adapter()
        assert all(torch.equal(v, before[k]) for k, v in layer.base_layer.state_dict().items())
        assert close(ours(ids).logits, expect)
        with ours.disable_adapter():
            base = ours(ids).logits
        assert 0 < (merged - expect).abs().max() < (base - expect).abs().max()
        exact = nf4.hf.merge_and_unload(copy.deepcopy(ours))
        assert not any(isinstance(m, (LinearNF4, nf4_peft.PeftLinearNF4)) for m in exact.modules())
        assert close(exact(ids).logits, expect)


def test_dora_files_load_both_ways_with_peft_on_bitsandbytes(tmp_path, tiny32, ids):
    ours, theirs = pair(tiny32)
    ours.save_pretrained(tmp_path / "nf4")
    theirs.save_pretrained(tmp_path / "bnb")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "nf4" / "adapter_model.safetensors").keys()
    assert sum(k.endswith("lora_magnitude_vector") for k in keys) == 6  # PEFT's key names
    assert set(keys) == set(load_file(tmp_path / "bnb" / "adapter_model.safetensors").keys())
    with torch.no_grad():
        expect = ours(ids).logits
        into_bnb = peft.PeftModel.from_pretrained(load_bnb(tiny32, double_quant=False), tmp_path / "nf4").train()
        into_nf4 = nf4.hf.load_adapter(load_nf4(tiny32, double_quant=False), tmp_path / "bnb").train()
        assert close(into_bnb(ids).logits, expect)
        assert close(into_nf4(ids).logits, expect)
        mags = [m for n, m in into_nf4.named_parameters() if "lora_magnitude_vector" in n]
        assert torch.equal(mags[0], ours.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector[
            "default"].weight)  # fmt: skip


def test_nf4_hf_lora_config_takes_use_dora(tiny32, ids):
    model = load_nf4(tiny32)
    pm = peft.get_peft_model(model, nf4.hf.lora_config(model=model, r=4, target_modules=["q_proj"], use_dora=True))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nf4_peft.PeftLinearNF4) and "default" in layer.lora_magnitude_vector
    with pytest.raises(ValueError, match="do not support lora_bias=True"):
        peft.get_peft_model(load_nf4(tiny32), nf4.hf.lora_config(target_modules=["q_proj"], lora_bias=True))


def test_peft_dora_on_bitsandbytes_converts_in_place_keeping_the_magnitude(tiny32, ids):
    from nf4.lora import apply_lora

    _, theirs = pair(tiny32)
    expect = theirs(ids).logits.detach()
    params = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    apply_lora(theirs)
    assert len(layers(theirs)) == 6
    assert {n: p for n, p in theirs.named_parameters() if "lora_" in n} == params  # the same Parameters
    assert close(theirs(ids).logits, expect)
