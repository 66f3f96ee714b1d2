"""nf4's PEFT LoRA layer (nf4/hf/peft.py) against PEFT's own `lora.Linear` on the same weights: an
nn.Linear holding dequant(W) and the same adapters. Forward (one adapter, several, a mixed batch, dropout
in eval), merging bookkeeping and bytes, the exact 16-bit merge, adapter loading flags, config checks.

Tolerance of the outputs: float32 sums over K = 64 (and the rank) at the output's scale, as in
test_hf_peft.py; merged bytes are compared exactly with `nf4.quantize` of PEFT's merged weight.
"""

import copy
import itertools
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from peft import LoraConfig
from torch import nn

import nf4
import nf4.hf
from helpers import count_calls
from nf4.hf.peft import (
    PeftLinearNF4,
    convert_peft_layer,
    dense_layer,
    dequantize_model,
    drop_4bit_markers,
    load_adapter,
)
from nf4.lora import LinearNF4

K, N = 64, 48


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """The torch path on the CPU."""


class Net(nn.Module):
    def __init__(self, proj, other=None):
        super().__init__()
        self.block = nn.Module()
        self.block.proj = proj
        self.block.other = other if other is not None else nn.Linear(K, K)

    def forward(self, x):
        return self.block.proj(x)


def close(a, b):
    return (a - b).abs().max() <= 2 * 128 * torch.finfo(torch.float32).eps * b.abs().max() + 1e-6


def same_bytes(q, r):
    a, b = q.to_bnb_state_dict(), r.to_bnb_state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def models(dropout=0.0, seed=0):
    """(nf4 PeftModel, PEFT's PeftModel on nn.Linear(dequant(W))), adapters "default" (r 4, alpha 8) and
    "other" (r 2, alpha 6, rsLoRA) with the same random values in both."""
    torch.manual_seed(seed)
    linear = nn.Linear(K, N)
    q = LinearNF4.from_linear(linear)
    ref = nn.Linear(K, N)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize_weight(torch.float32))
        ref.bias.copy_(linear.bias)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"])
    other = dict(r=2, lora_alpha=6, lora_dropout=dropout, use_rslora=True, target_modules=["proj"])
    ours = peft.get_peft_model(Net(q), nf4.hf.lora_config(**kwargs))
    ours.add_adapter("other", nf4.hf.lora_config(**other))
    theirs = peft.get_peft_model(Net(ref), LoraConfig(**kwargs))
    theirs.add_adapter("other", LoraConfig(**other))
    g = torch.Generator().manual_seed(seed + 1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                mine[name].copy_(p)
    return ours, theirs


def layers(ours, theirs):
    return ours.base_model.model.block.proj, theirs.base_model.model.block.proj


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    yield
    torch.set_grad_enabled(True)


@pytest.fixture
def x():
    return torch.randn(5, K, generator=torch.Generator().manual_seed(7))


def test_one_adapter_equals_peft(x):
    ours, theirs = models()
    mine, ref = layers(ours, theirs)
    assert isinstance(mine, PeftLinearNF4) and repr(mine).startswith("lora.PeftLinearNF4(")
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        for name in ("default", "other"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            assert mine.scaling[name] == ref.scaling[name]
            assert close(mine(x), ref(x)), (mode, name)


def test_several_active_adapters_each_keep_their_scaling(x):
    ours, theirs = models()
    mine, ref = layers(ours, theirs)
    mine.set_adapter(["default", "other"])
    ref.set_adapter(["default", "other"])
    assert close(mine(x), ref(x))
    one = copy.deepcopy(ref)
    one.set_adapter("default")
    assert not close(mine(x), one(x))  # the second adapter counts


def test_a_mixed_batch_at_inference_is_one_fused_call_equal_to_peft(monkeypatch, x):
    from nf4.lora import ops

    calls = count_calls(monkeypatch, ops, ["matmul", "matmul_adapters"])
    ours, theirs = models()
    ours.eval()
    theirs.eval()
    mine, ref = layers(ours, theirs)
    names = ["other", "__base__", "default", "other", "default"]
    with torch.no_grad():
        assert close(mine(x, adapter_names=names), ref(x, adapter_names=names))
        assert calls == {"matmul": 0, "matmul_adapters": 1}
        assert close(ours(x, adapter_names=names), theirs(x, adapter_names=names))
        bank = mine._nf4_bank[1]
        assert calls["matmul_adapters"] == 2 and bank.adapters == {"default": 0, "other": 1}
        assert mine(x, adapter_names=names) is not None and mine._nf4_bank[1] is bank  # kept while unchanged
        for layer in (mine, ref):  # an optimizer step, in place: the bank follows
            layer.lora_B["other"].weight.mul_(-3.0)
        assert close(mine(x, adapter_names=names), ref(x, adapter_names=names)) and mine._nf4_bank[1] is not bank
        for model in (ours, theirs):  # a new adapter, and one deleted
            model.add_adapter("third", LoraConfig(r=3, lora_alpha=5, target_modules=["proj"]))
            model.base_model.model.block.proj.lora_B["third"].weight.fill_(0.25)
            model.delete_adapter("default")
        mine.lora_A["third"].weight.copy_(ref.lora_A["third"].weight)
        names = ["third", "other", "__base__", "third", "other"]
        assert close(mine(x, adapter_names=names), ref(x, adapter_names=names))
        assert mine._nf4_bank[1].adapters == {"other": 0, "third": 1} and mine._nf4_bank[1].max_rank == 3
        with pytest.raises(ValueError, match="non-existing adapter"):
            ours(x, adapter_names=["default"] * 5)  # PEFT's own check of the names
    assert "_nf4_bank" not in "".join(ours.state_dict())  # a cache, not saved


def test_mixed_batch_and_disabled_adapters_equal_peft(x):
    ours, theirs = models()
    ours.eval()
    theirs.eval()
    names = ["other", "__base__", "default", "other", "__base__"]
    assert close(ours(x, adapter_names=names), theirs(x, adapter_names=names))
    with ours.disable_adapter(), theirs.disable_adapter():
        assert close(ours(x), theirs(x))
        assert torch.equal(ours(x), ours.base_model.model.block.proj.base_layer(x))


@pytest.mark.parametrize("several", [False, True])
def test_dropout_is_off_in_eval_mode(x, several):
    ours, theirs = models(dropout=0.5)
    mine, ref = layers(ours, theirs)
    active = ["default", "other"] if several else "default"
    mine.set_adapter(active)
    ref.set_adapter(active)
    ours.eval()
    theirs.eval()
    first = mine(x)
    assert torch.equal(mine(x), first) and close(first, ref(x))  # deterministic, and as without dropout
    ours.train()
    assert not close(mine(x), first)  # active while training


def test_delta_weight_equals_peft(x):
    ours, theirs = models()
    mine, ref = layers(ours, theirs)
    for name in ("default", "other"):
        assert torch.equal(mine.get_delta_weight(name), ref.get_delta_weight(name))


def test_merge_requantizes_peft_merged_weight_and_unmerge_restores_the_bytes(x):
    ours, theirs = models()
    mine, ref = layers(ours, theirs)
    before = mine.base_layer.nf4_weight
    before_bytes = {k: v.clone() for k, v in mine.base_layer.state_dict().items()}
    with pytest.warns(UserWarning, match="requantizes it"):
        mine.merge()
    ref.merge()
    assert mine.merged and mine.merged_adapters == ref.merged_adapters == ["default"]
    assert same_bytes(mine.base_layer.nf4_weight, nf4.quantize(ref.base_layer.weight.detach(), 64, True))
    assert torch.equal(mine(x), mine.base_layer(x))  # merged: the adapter is not added a second time
    mine.merge()  # already merged: nothing more
    assert mine.merged_adapters == ["default"]
    mine.unmerge()
    assert not mine.merged and mine.merged_adapters == []
    state = mine.base_layer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before_bytes.items())
    assert same_bytes(mine.base_layer.nf4_weight, before)
    with pytest.warns(UserWarning, match="Already unmerged"):
        mine.unmerge()


def test_merging_two_adapters_requantizes_after_each(x):
    ours, _ = models()
    mine = ours.base_model.model.block.proj
    before = mine.base_layer.nf4_weight
    w = mine.base_layer.dequantize_weight(torch.float32)
    deltas = [mine.get_delta_weight(n) for n in ("default", "other")]
    with pytest.warns(UserWarning):
        mine.merge(adapter_names=["default", "other"])
    assert mine.merged_adapters == ["default", "other"]
    once = nf4.quantize(w + deltas[0], 64, True)
    twice = nf4.quantize(nf4.dequantize(once, torch.float32) + deltas[1], 64, True)
    assert same_bytes(mine.base_layer.nf4_weight, twice)
    with ours.disable_adapter():  # disabling a merged layer unmerges it first
        assert torch.equal(mine(x), mine.base_layer(x))
        assert not mine.merged and same_bytes(mine.base_layer.nf4_weight, before)


def test_safe_merge_refuses_a_broken_adapter():
    ours, _ = models()
    mine = ours.base_model.model.block.proj
    before = mine.base_layer.nf4_weight
    with torch.no_grad():
        mine.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        mine.merge(safe_merge=True)
    assert not mine.merged and mine.base_layer.nf4_weight is not None
    assert same_bytes(mine.base_layer.nf4_weight, before)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_exact_merge_and_unload_sums_every_active_adapter(dtype):
    ours, _ = models()
    mine = ours.base_model.model.block.proj
    mine.set_adapter(["default", "other"])
    w = mine.base_layer.dequantize_weight(torch.float32)
    want = w + mine.get_delta_weight("default") + mine.get_delta_weight("other")
    bias = mine.base_layer.bias.detach().clone()
    with pytest.warns(UserWarning):
        mine.merge()  # merged into the NF4 bytes first: unmerged before the exact merge
    base = nf4.hf.merge_and_unload(ours, dtype=dtype)
    proj, other = base.block.proj, base.block.other
    assert type(proj) is nn.Linear and proj.weight.dtype == (dtype or torch.float32)
    assert torch.equal(proj.weight, want.to(dtype or torch.float32))
    assert torch.equal(proj.bias, bias.to(dtype or torch.float32))
    assert type(other) is nn.Linear


def test_adapters_are_float32_where_the_bytes_are():
    q = LinearNF4.from_linear(nn.Linear(K, N).bfloat16())
    pm = peft.get_peft_model(Net(q), nf4.hf.lora_config(r=2, target_modules=["proj"]))
    layer = pm.base_model.model.block.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_A["default"].weight.device == q.weight.device


@pytest.mark.parametrize("option", ["lora_bias", "fan_in_fan_out"])
def test_unsupported_variants_are_refused_by_name(option):
    q = LinearNF4.from_linear(nn.Linear(K, N))
    with pytest.raises(ValueError, match=rf"do not support {option}=True; use plain LoRA or DoRA"):
        peft.get_peft_model(Net(q), nf4.hf.lora_config(r=2, target_modules=["proj"], **{option: True}))


def test_lora_config_targets():
    model = Net(LinearNF4.from_linear(nn.Linear(K, N)))
    config = nf4.hf.lora_config(model=model, target_modules="all-linear", r=2)
    assert config.target_modules == "all-linear"  # resolved when PEFT injects (nf4.hf.compat), as PEFT does
    pm = peft.get_peft_model(copy.deepcopy(model), config)  # nf4's LoRA layer on nf4, PEFT's on nn.Linear
    assert type(pm.base_model.model.block.proj) is PeftLinearNF4
    assert type(pm.base_model.model.block.other) is peft.tuners.lora.Linear
    assert nf4.hf.lora_config(model=model, target_modules=["proj"]).target_modules == {"proj"}
    assert nf4.hf.lora_config(model=model, target_modules=r"block\.p.*").target_modules == r"block\.p.*"
    with pytest.raises(ValueError, match=r"matches no module of this Net; its Linear / nf4 layers are named "
                                         r"\['other', 'proj'\]"):  # fmt: skip
        nf4.hf.lora_config(model=model, target_modules=["roj"])
    with pytest.raises(ValueError, match="matches no module"):
        nf4.hf.lora_config(model=model, target_modules="proj")  # a regex must match the whole name


def test_all_linear_leaves_out_the_output_head():
    from hf_helpers import tiny_config
    from transformers import LlamaForCausalLM

    model = nf4.lora.quantize_model(LlamaForCausalLM(tiny_config(num_hidden_layers=1)))
    pm = peft.get_peft_model(model, nf4.hf.lora_config(target_modules="all-linear"))
    names = {n.rpartition(".")[2] for n, m in pm.named_modules() if isinstance(m, PeftLinearNF4)}
    assert len(names) == 7 and type(pm.base_model.model.lm_head) is LinearNF4  # the head: quantized, not adapted


@pytest.mark.parametrize("trainable", [False, True])
def test_load_adapter_onto_a_base_model_and_onto_a_peft_model(tmp_path, x, trainable):
    ours, _ = models()
    ours.eval()
    ours.save_pretrained(tmp_path)  # "default" only
    expect = ours(x)
    saved = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n and ".default." in n}

    fresh, _ = models()  # the same base weights; its adapters are unloaded
    base = fresh.unload()
    loaded = load_adapter(base, tmp_path, **({"is_trainable": True} if trainable else {}))  # default: frozen
    assert isinstance(loaded, peft.PeftModel)
    params = dict(loaded.named_parameters())
    for name, value in saved.items():
        assert torch.equal(params[name], value) and params[name].requires_grad == trainable
    loaded.eval()
    assert not trainable or loaded.training is False
    assert close(loaded(x), expect)

    again = load_adapter(loaded, tmp_path, adapter_name="second", is_trainable=trainable)
    assert again is loaded
    params = dict(again.named_parameters())
    for name, value in saved.items():
        second = name.replace(".default.", ".second.")
        # as PEFT's own load_adapter: is_trainable marks the loaded adapter trainable before set_adapter
        assert torch.equal(params[second], value) and params[second].requires_grad == trainable
    assert again.peft_config["second"].inference_mode == (not trainable)
    again.set_adapter("second")
    assert close(again(x), expect)


def test_convert_peft_layer_refuses_merged_and_variant_layers_and_keeps_the_rest():
    torch.manual_seed(0)
    plain = peft.get_peft_model(Net(nn.Linear(K, N)), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    layer = plain.base_model.model.block.proj
    layer.set_adapter("default")
    q = LinearNF4.from_linear(layer.base_layer)
    new = convert_peft_layer(layer, q)
    assert isinstance(new, PeftLinearNF4) and new.lora_A is layer.lora_A and new.scaling == layer.scaling
    assert new.base_layer is q and new.get_base_layer() is q and type(layer.base_layer) is nn.Linear
    assert new.active_adapters == ["default"] and not new.merged and new._nf4_before_merge is None
    layer.merge()
    with pytest.raises(ValueError, match=r"merged into its base weight; unmerge\(\) them first"):
        convert_peft_layer(layer, LinearNF4.from_linear(layer.base_layer))
    for variant in ({"lora_bias": True},):
        other = peft.get_peft_model(Net(nn.Linear(K, N)), LoraConfig(r=2, target_modules=["proj"], **variant))
        with pytest.raises(ValueError, match="plain LoRA or DoRA only"):
            convert_peft_layer(other.base_model.model.block.proj, LinearNF4.from_linear(nn.Linear(K, N)))


def with_third(ours):
    """A third adapter on `block.other` only: `block.proj` has no such adapter."""
    ours.add_adapter("third", nf4.hf.lora_config(r=2, target_modules=["other"]))
    with torch.no_grad():
        ours.base_model.model.block.other.lora_B["third"].weight.normal_()
    return ours


GRAD_MODES = pytest.mark.parametrize("grad", [True, False], ids=["grad: PEFT's loop", "no grad: fused"])


@GRAD_MODES
def test_an_adapter_this_layer_lacks_leaves_its_output_alone(x, grad):
    torch.set_grad_enabled(grad)  # restored by pytest's fixture below
    ours = with_third(models()[0])
    ours.eval()
    mine = ours.base_model.model.block.proj
    base = mine.base_layer(x)
    ours.set_adapter("third")
    assert torch.equal(mine(x), base)
    names = ["third", "default", "__base__", "third", "other"]
    mixed = mine(x, adapter_names=names)
    assert torch.equal(mixed[[0, 2, 3]], base[[0, 2, 3]]) and not torch.equal(mixed[1], base[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to merge here: no requantization warning
        mine.merge(adapter_names=["third"])
    assert not mine.merged


@GRAD_MODES
def test_a_mixed_batch_applies_the_adapters_after_one_this_layer_lacks(x, grad):
    """The adapter `block.proj` lacks comes first in the batch's names, both in the list and in the set the
    layer walks (its order follows the string hash seed, so the name is picked to come first): the adapters
    after it still apply, as in PEFT's layer."""
    rows = ["default", "__base__", "other", "default"]
    candidates = (f"absent{i}" for i in itertools.count())
    missing = next(name for name in candidates if next(iter(set([name, *rows]) - {"__base__"})) == name)
    names = [missing, *rows]
    torch.set_grad_enabled(grad)
    ours, theirs = models()
    ours.add_adapter(missing, nf4.hf.lora_config(r=2, target_modules=["other"]))
    theirs.add_adapter(missing, LoraConfig(r=2, target_modules=["other"]))
    ours.eval()
    theirs.eval()
    mine, ref = layers(ours, theirs)
    assert missing not in mine.lora_A and missing in ours.base_model.model.block.other.lora_A
    mixed, base = mine(x, adapter_names=names), mine.base_layer(x)
    assert close(mixed, ref(x, adapter_names=names))
    assert torch.equal(mixed[[0, 2]], base[[0, 2]])
    assert all(not torch.equal(mixed[i], base[i]) for i in (1, 3, 4))


def test_one_adapter_runs_one_fused_call_and_checks_its_input(monkeypatch, x):
    import nf4.hf.peft as layer_module

    calls = []
    real = layer_module.lora_linear
    monkeypatch.setattr(layer_module, "lora_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    ours, _ = models()
    mine = ours.base_model.model.block.proj
    mine(x)
    assert len(calls) == 1 and calls[0][5] == mine.scaling["default"]
    with pytest.raises(ValueError, match="PeftLinearNF4"):
        mine(torch.randn(2, K + 1))


def test_mixed_batch_backward_equals_peft(x):
    ours, theirs = models()
    grads = []
    for model in (ours, theirs):
        model.eval()  # PEFT refuses adapter_names in training mode; gradients still flow
        xi = x.clone().requires_grad_()
        model(xi, adapter_names=["other", "__base__", "default", "other", "__base__"]).square().sum().backward()
        grads.append(xi.grad)
    assert close(*grads)


def test_adapter_names_with_merged_adapters_are_refused(x):
    ours, _ = models()
    mine = ours.base_model.model.block.proj
    ours.eval()
    with pytest.warns(UserWarning):
        mine.merge()
    with pytest.raises(ValueError, match="merged"):
        ours(x, adapter_names=["default"] * 5)


def test_lora_config_with_a_model_and_no_targets_is_peft_default():
    model = Net(LinearNF4.from_linear(nn.Linear(K, N)))
    assert nf4.hf.lora_config(model=model, r=2).target_modules is None


def test_exact_merge_keeps_the_weights_dtype_and_a_missing_bias():
    q = LinearNF4.from_linear(nn.Linear(K, N, bias=False).bfloat16())
    pm = peft.get_peft_model(Net(q), nf4.hf.lora_config(r=2, target_modules=["proj"]))
    want = q.dequantize_weight(torch.float32) + pm.base_model.model.block.proj.get_delta_weight("default")
    base = nf4.hf.merge_and_unload(pm)
    proj = base.block.proj
    assert proj.weight.dtype == torch.bfloat16 and proj.bias is None
    assert torch.equal(proj.weight, want.bfloat16())


def test_activated_lora_and_arrow_are_refused_by_name():
    q = LinearNF4.from_linear(nn.Linear(K, N))
    with pytest.raises(ValueError, match=r"do not support alora_invocation_tokens=\[5, 6\]"):
        peft.get_peft_model(Net(q), nf4.hf.lora_config(r=2, target_modules=["proj"], alora_invocation_tokens=[5, 6]))
    from peft import ArrowConfig

    with pytest.raises(ValueError, match=r"do not support arrow_config=ArrowConfig"):
        peft.get_peft_model(Net(q), nf4.hf.lora_config(r=2, target_modules=["proj"], arrow_config=ArrowConfig()))


def test_merge_flags_safe_merge_and_adapters_the_layer_lacks():
    ours = with_third(models()[0])
    mine = ours.base_model.model.block.proj
    w = mine.base_layer.dequantize_weight(torch.float32)
    want = nf4.quantize(w + mine.get_delta_weight("default"), 64, True)
    with pytest.warns(UserWarning):
        mine.merge(safe_merge=True, adapter_names=["third", "default"])  # finite: merged; "third" skipped
    assert mine.merged_adapters == ["default"] and same_bytes(mine.base_layer.nf4_weight, want)


def test_exact_merge_dequantizes_the_other_nf4_layers_too():
    other = LinearNF4.from_linear(nn.Linear(K, K))
    pm = peft.get_peft_model(
        Net(LinearNF4.from_linear(nn.Linear(K, N)), other), nf4.hf.lora_config(r=2, target_modules=["proj"])
    )
    want = other.dequantize_weight()
    base = nf4.hf.merge_and_unload(pm)
    assert type(base.block.other) is nn.Linear and torch.equal(base.block.other.weight, want)


@pytest.mark.parametrize("training", [False, True])
def test_dense_layer_keeps_the_mode_and_gpt2s_conv1d_layout(x, training):
    from transformers.pytorch_utils import Conv1D

    q = LinearNF4.from_linear(nn.Linear(K, N)).train(training)
    w = q.dequantize_weight(torch.float32)
    linear = dense_layer(q, w)
    assert type(linear) is nn.Linear and torch.equal(linear.weight, w) and torch.equal(linear.bias, q.bias)
    assert linear.training == training
    q.transposed_checkpoint = True  # how the quantizer marks GPT-2's Conv1D layers: weight stored [in, out]
    conv = dense_layer(q, w)
    assert type(conv) is Conv1D and torch.equal(conv.weight, w.t()) and torch.equal(conv.bias, q.bias)
    assert conv.training == training and close(conv(x), linear(x))


def test_4bit_markers_go_only_with_the_last_4bit_layer():
    """What transformers, PEFT and TRL read as "this model is 4-bit" stays while an nf4 or bitsandbytes layer
    is left, and goes with the last one (transformers' quantizer cleanup called, then the rest removed)."""
    import bitsandbytes as bnb

    class Quantizer:
        def __init__(self):
            self.cleaned = []

        def remove_quantization_config(self, model):
            self.cleaned.append(model)

    def marked(layer):
        model = nn.Sequential(layer)
        model.config = SimpleNamespace(quantization_config={"load_in_4bit": True})
        model.hf_quantizer = Quantizer()
        model.is_loaded_in_4bit, model.quantization_method, model.is_quantized = True, "bitsandbytes", True
        return model

    for layer in (LinearNF4.from_linear(nn.Linear(K, N)), bnb.nn.Linear4bit(K, N), bnb.nn.Linear8bitLt(K, N)):
        model = marked(layer)
        drop_4bit_markers(model)
        assert model.hf_quantizer.cleaned == [] and model.config.quantization_config == {"load_in_4bit": True}
        assert (model.is_loaded_in_4bit, model.quantization_method, model.is_quantized) == (True, "bitsandbytes", True)
    model = marked(LinearNF4.from_linear(nn.Linear(K, N)))
    quantizer = model.hf_quantizer
    assert dequantize_model(model) is model and type(model[0]) is nn.Linear
    assert quantizer.cleaned == [model] and not hasattr(model.config, "quantization_config")
    assert "is_loaded_in_4bit" not in vars(model) and "quantization_method" not in vars(model)
    assert model.is_quantized is False
    bare = nn.Sequential(nn.Linear(K, N))
    bare.config = SimpleNamespace()  # a config without quantization_config: nothing to remove
    drop_4bit_markers(bare)
    assert vars(bare.config) == {} and not hasattr(bare, "is_quantized")


def test_a_batch_on_one_adapter_runs_the_single_adapter_call(monkeypatch, x):
    from nf4.lora import ops

    ours, theirs = models()
    ours.eval()
    theirs.eval()
    mine, ref = layers(ours, theirs)
    calls = count_calls(monkeypatch, ops, ["matmul", "matmul_adapters"])
    with torch.no_grad():
        for names, expect in ((["other"] * 5, {"matmul": 1, "matmul_adapters": 0}),
                              (["__base__"] * 5, {"matmul": 2, "matmul_adapters": 0}),
                              (["other", "default"] * 2 + ["other"], {"matmul": 2, "matmul_adapters": 1})):  # fmt: skip
            assert close(mine(x, adapter_names=names), ref(x, adapter_names=names)), names
            assert calls == expect, names
        assert torch.equal(mine(x, adapter_names=["__base__"] * 5), mine.base_layer(x))
