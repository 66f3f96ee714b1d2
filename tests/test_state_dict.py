"""LinearNF4's state dict (nf4/lora/modules.py): bitsandbytes' serialized keys and bytes out; loads in
place (same parameter objects, the loaded metadata), by assignment, into another layout, onto the meta
device; missing, corrupted and mis-shaped weights reported by key."""

import pytest
import torch
from torch import nn

from nf4.lora import LinearNF4, LoRALinearNF4

OUT, IN = 48, 128


def layer(seed=0, dtype=torch.float32, blocksize=64, double_quant=True, cls=LinearNF4, **kwargs):
    torch.manual_seed(seed)
    return cls.from_linear(nn.Linear(IN, OUT).to(dtype), blocksize=blocksize, double_quant=double_quant, **kwargs)


def same_bytes(q, r):
    a, b = q.to_bnb_state_dict(), r.to_bnb_state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_bitsandbytes_serialized_form(double_quant):
    m = layer(double_quant=double_quant)
    state = m.state_dict()
    want = m.nf4_weight.to_bnb_state_dict("weight")
    assert set(state) == {"bias", *want}
    assert all(torch.equal(state[k], v) for k, v in want.items())
    assert not any(k.startswith(("weight_", "_")) for k in state)
    prefixed = nn.Sequential(m).state_dict()
    assert set(prefixed) == {f"0.{k}" for k in state}


def test_a_meta_module_lists_the_weight_to_load():
    with torch.device("meta"):
        m = LinearNF4(IN, OUT, dtype=torch.bfloat16)
    state = m.state_dict()
    assert set(state) == {"weight", "bias"}
    assert state["weight"].device.type == "meta" and state["weight"].shape == (OUT, IN)
    assert state["weight"].dtype == torch.bfloat16
    source = layer(dtype=torch.bfloat16)
    m.load_state_dict(source.state_dict(), assign=True)
    assert same_bytes(m.nf4_weight, source.nf4_weight) and m.weight.device.type == "cpu"


def test_an_in_place_load_keeps_the_parameters_and_takes_the_loaded_metadata():
    target = layer(seed=0, dtype=torch.float32)
    source = layer(seed=1, dtype=torch.bfloat16)  # same layout, another original dtype and nested offset
    params = {n: p for n, p in target.named_parameters()}
    target.load_state_dict(source.state_dict())
    assert {n: p for n, p in target.named_parameters()} == params  # the same objects (FSDP2, optimizers)
    assert same_bytes(target.nf4_weight, source.nf4_weight)
    assert target.nf4_meta == source.nf4_meta and target.nf4_meta.dtype == torch.bfloat16
    assert torch.equal(target.dequantize_weight(), source.dequantize_weight())
    assert target.dequantize_weight().dtype == torch.bfloat16
    x = torch.randn(3, IN)
    assert torch.equal(target(x), source(x))


def test_assign_and_another_layout_replace_the_pieces():
    target, source = layer(seed=0), layer(seed=1)
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.weight.data_ptr() == source.weight.data_ptr()
    other = layer(seed=2, blocksize=128, double_quant=False)
    target.load_state_dict(other.state_dict())
    assert same_bytes(target.nf4_weight, other.nf4_weight)
    assert (target.nf4_meta.blocksize, target.nf4_meta.double_quant) == (128, False)


def test_missing_corrupted_and_mis_shaped_weights_are_reported_by_key():
    m = layer()
    before = m.nf4_weight
    state = m.state_dict()
    result = m.load_state_dict({"bias": state["bias"]}, strict=False)
    assert result.missing_keys == ["weight"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        m.load_state_dict({"bias": state["bias"]})
    broken = dict(state)
    broken["weight.absmax"] = state["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"weight: .*weight.absmax: expected uint8"):
        m.load_state_dict(broken)
    wrong = LinearNF4.from_linear(nn.Linear(IN, OUT + 2)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight: the checkpoint's weight has shape \[50, 128\], this module "
                                           r"expects \[48, 128\]"):  # fmt: skip
        m.load_state_dict(wrong)
    assert same_bytes(m.nf4_weight, before)


def test_lora_layer_state_dict_adds_its_adapter():
    m = layer(cls=LoRALinearNF4, r=4)
    state = m.state_dict()
    assert {"lora_A", "lora_B"} <= set(state) and "weight.quant_state.bitsandbytes__nf4" in state
    fresh = layer(cls=LoRALinearNF4, seed=5, r=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.lora_A, m.lora_A) and same_bytes(fresh.nf4_weight, m.nf4_weight)
