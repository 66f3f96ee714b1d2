"""PEFT on nf4 layers through PEFT's and transformers' stock calls (`import nf4.hf` is all it takes, see
nf4/hf/compat.py), bitsandbytes + PEFT models converted in place, the training stack (gradient
checkpointing, prepare_model_for_kbit_training, the HF Trainer, TRL's SFTTrainer, also without
bitsandbytes installed), the parameter counts against bitsandbytes', and the exact 16-bit merge.

Tolerance against PEFT on bitsandbytes (same bytes, same adapter, float32): twice float32's error on these
sums (K <= 128) at the output's scale.
"""

import copy
import importlib.util
import json

import peft
import pytest
import torch
from hf_helpers import TARGETS, close, load_bnb, load_nf4, tiny_config, tiny_tokenizer
from torch import nn
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import nf4.hf
from helpers import count_calls, same_bnb_entry
from nf4.hf import peft as nf4_peft
from nf4.lora import LinearNF4, apply_lora, quantize_model


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole models on the CPU: the torch path, not the kernel interpreter."""


@pytest.fixture
def ids():
    return torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def adapted(model, seed=1, make_config=peft.LoraConfig, **kwargs):
    kwargs = dict(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), **kwargs)
    pm = peft.get_peft_model(model, make_config(**kwargs))
    randomize(pm, seed)
    return pm


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nf4_peft.PeftLinearNF4)}


@pytest.mark.parametrize("make_config", [peft.LoraConfig, nf4.hf.lora_config], ids=["peft", "nf4"])
def test_get_peft_model_wraps_nf4_layers_and_runs_one_fused_call(monkeypatch, tiny32, ids, make_config):
    pm = adapted(load_nf4(tiny32), make_config=make_config)
    found = lora_layers(pm)
    assert len(found) == 6 and all(isinstance(m.base_layer, LinearNF4) for m in found.values())
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in found.values())
    calls = []
    real = nf4_peft.lora_linear
    monkeypatch.setattr(nf4_peft, "lora_linear", lambda *a, **k: calls.append(a) or real(*a, **k))
    pm(ids).logits.sum().backward()
    assert len(calls) == 6  # one fused call per adapted layer: NF4 matmul and LoRA term together
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == 12 and all("lora_" in n for n in trainable)
    assert all(pm.get_parameter(n).grad is not None for n in trainable)


def test_outputs_and_gradients_agree_with_peft_on_bitsandbytes(tiny32, ids):
    ours = adapted(load_nf4(tiny32, double_quant=False))
    theirs = peft.get_peft_model(load_bnb(tiny32, double_quant=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))  # fmt: skip
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(ours.get_parameter(name))
    for model in (ours, theirs):
        model.train()  # bitsandbytes' CPU inference path (eval, no grad) repacks and rounds: not the oracle
    a, b = ours(ids).logits, theirs(ids).logits
    assert close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert close(p.grad, grads[name]), name


def test_several_adapters_switching_disabling_and_mixed_batches(tiny32, ids):
    pm = adapted(load_nf4(tiny32))
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    randomize(pm, 2)
    pm.eval()
    pm.set_adapter("other")
    other = pm(ids).logits
    pm.set_adapter("default")
    default = pm(ids).logits
    with pm.disable_adapter():
        base = pm(ids).logits
    assert not torch.equal(other, default) and not torch.equal(default, base) and not torch.equal(other, base)
    mixed = pm(ids, adapter_names=["other", "__base__"]).logits
    assert close(mixed[0], other[0]) and close(mixed[1], base[1])
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "other"])  # both at once: the base's fused matmul, then PEFT's terms
    both = layer(torch.randn(3, 64))
    assert both.shape == (3, 64)


def test_merge_is_lossy_unmerge_exact_and_the_16_bit_merge_exact(tiny32, ids):
    pm = adapted(load_nf4(tiny32))
    pm.eval()
    with torch.no_grad():
        expect = pm(ids).logits
        layer = pm.base_model.model.model.layers[1].mlp.down_proj
        before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        with pytest.warns(UserWarning, match="requantizes it"):
            pm.merge_adapter()
        merged = pm(ids).logits
        assert not torch.equal(layer.base_layer.weight, before["weight"])  # the update went into the codes
        pm.unmerge_adapter()
        assert all(torch.equal(v, before[k]) for k, v in layer.base_layer.state_dict().items())
        assert torch.equal(pm(ids).logits, expect)
        # NF4 merge: closer to the adapted model than the base is, not equal (lossy)
        with pm.disable_adapter():
            base = pm(ids).logits
        assert 0 < (merged - expect).abs().max() < (base - expect).abs().max()
        exact = nf4.hf.merge_and_unload(copy.deepcopy(pm))
        assert not any(isinstance(m, (LinearNF4, nf4_peft.PeftLinearNF4)) for m in exact.modules())
        assert close(exact(ids).logits, expect)
        unloaded = pm.merge_and_unload()
        assert isinstance(unloaded.model.layers[1].mlp.down_proj, LinearNF4)
        assert torch.equal(unloaded(ids).logits, merged)


ATTN_MLP = [("self_attn", t) for t in TARGETS[:4]] + [("mlp", t) for t in TARGETS[4:]]


def test_save_in_peft_format_and_load_back(tmp_path, tiny32, ids):
    pm = adapted(load_nf4(tiny32), use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    pm.eval()
    expect = pm(ids).logits
    pm.save_pretrained(tmp_path / "adapter")
    back = nf4.hf.load_adapter(load_nf4(tiny32), tmp_path / "adapter")
    layer = back.base_model.model.model.layers[0]
    assert layer.mlp.down_proj.r["default"] == 2 and layer.self_attn.v_proj.lora_alpha["default"] == 3
    assert layer.self_attn.q_proj.scaling["default"] == 8 / 2  # rsLoRA: alpha / sqrt(r)
    assert torch.equal(back(ids).logits, expect)
    second = nf4.hf.load_adapter(back, tmp_path / "adapter", adapter_name="again")
    second.set_adapter("again")
    assert torch.equal(second(ids).logits, expect)


def test_config_errors_say_what_to_write(tiny32):
    model = load_nf4(tiny32)
    with pytest.raises(ValueError, match=r"matches no module.*named \['down_proj', 'gate_proj', 'k_proj'"):
        nf4.hf.lora_config(model=model, target_modules=["qproj"])
    for make_config in (peft.LoraConfig, nf4.hf.lora_config):
        with pytest.raises(ValueError, match="do not support lora_bias=True"):
            peft.get_peft_model(model, make_config(target_modules=["q_proj"], lora_bias=True))


# -- bitsandbytes + PEFT models move to nf4 in place ---------------------------------------------


@pytest.mark.parametrize("convert", [apply_lora, quantize_model], ids=["apply_lora", "quantize_model"])
def test_peft_on_bitsandbytes_converts_in_place_keeping_adapters(tiny32, ids, convert):
    theirs = peft.get_peft_model(
        load_bnb(tiny32), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    randomize(theirs, 3)
    theirs.train()
    expect = theirs(ids).logits
    bnb_state = {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}
    adapters = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    convert(theirs)
    found = lora_layers(theirs)
    assert len(found) == 4 and type(theirs.base_model.model.lm_head) is nn.Linear  # the 16-bit head stays
    assert all(isinstance(m, LinearNF4) for n, m in theirs.named_modules() if n.endswith(("k_proj", "up_proj")))
    assert {n: p for n, p in theirs.named_parameters() if "lora_" in n} == adapters  # the same Parameters
    assert all(p.requires_grad for p in adapters.values())
    assert all(same_bnb_entry(k, v, bnb_state[k]) for k, v in theirs.state_dict().items() if "lora_" not in k)
    assert close(theirs(ids).logits, expect)


def test_bitsandbytes_model_converts_reusing_its_bytes(tiny32, ids):
    model = load_bnb(tiny32)
    before = model.state_dict()
    pointers = {k: v.data_ptr() for k, v in before.items()}
    model.train()
    expect = model(ids).logits
    apply_lora(model, r=4, lora_alpha=8)
    converted = [n for n, m in model.named_modules() if isinstance(m, LinearNF4)]
    assert len(converted) == 14 and type(model.lm_head) is nn.Linear
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before) and all(same_bnb_entry(k, after[k], before[k]) for k in before)
    assert all(after[k].data_ptr() == pointers[k] for k in before if k.endswith(("proj.weight", "absmax")))
    assert close(model(ids).logits, expect)  # lora_B starts at zero


def test_fp4_bitsandbytes_layers_are_refused_by_name(tiny32):
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: .*FP4"):
        quantize_model(load_bnb(tiny32, quant_type="fp4"))


# -- the training stack --------------------------------------------------------------------------


def _grads(tiny32, ids, checkpointing=None, dropout=0.1):
    torch.manual_seed(5)
    model = load_nf4(tiny32)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    pm = adapted(model, lora_dropout=dropout)
    pm.train()
    torch.manual_seed(6)
    pm(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny32, ids, reentrant):
    plain = _grads(tiny32, ids)
    checkpointed = _grads(tiny32, ids, checkpointing=reentrant)
    assert plain.keys() == checkpointed.keys() and all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_prepare_model_for_kbit_training_leaves_the_nf4_bytes_alone(tiny32):
    model = load_nf4(tiny32, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items() if "proj" in k}
    model = peft.prepare_model_for_kbit_training(model)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert model.model.norm.weight.dtype == torch.float32  # what it does to the rest


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.randint(1, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def test_hf_trainer_trains_the_adapters_only(tmp_path, tiny32):
    model = peft.prepare_model_for_kbit_training(load_nf4(tiny32, torch.bfloat16))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    frozen = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" not in k}
    lora_B = {n: p.clone() for n, p in pm.named_parameters() if "lora_B" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, gradient_checkpointing=True,
    )  # fmt: skip
    result = Trainer(model=pm, args=args, train_dataset=_Tokens()).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(p, lora_B[n]) for n, p in pm.named_parameters() if "lora_B" in n)
    assert all(torch.equal(v, frozen[k]) for k, v in pm.state_dict().items() if "lora_" not in k)


def test_trl_sft_trainer_runs_with_nf4(tmp_path, tiny32):
    trl = pytest.importorskip("trl", reason="TRL is in the test extra")
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    texts = [" ".join(f"w{4 + (7 * i + j) % 124}" for j in range(20)) for i in range(8)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", max_length=32, gradient_checkpointing=True,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=load_nf4(tiny32, torch.bfloat16), args=args, train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer, peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )  # fmt: skip
    assert len(lora_layers(trainer.model)) == 14
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_all_linear_on_a_model_built_in_memory():
    model = LlamaForCausalLM(tiny_config())
    quantize_model(model, target_modules=TARGETS)
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", r=2))
    assert sorted(lora_layers(pm)) == sorted(
        f"base_model.model.model.layers.{i}.{p}.{t}" for i in range(2) for p, t in ATTN_MLP
    )


def test_lora_dropout_applies_in_training_mode_only(tiny32, ids):
    pm = adapted(load_nf4(tiny32), lora_dropout=0.5)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 64)
    with torch.no_grad():
        pm.eval()
        clean = layer(x)
        pm.train()
        dropped = [layer(x) for _ in range(2)]
    assert not torch.equal(dropped[0], clean) and not torch.equal(dropped[0], dropped[1])


# -- PEFT's and transformers' stock calls on nf4 models (nf4/hf/compat.py) -------------------------


def test_all_linear_targets_the_layers_it_targets_on_bitsandbytes(tiny32):
    ours = peft.get_peft_model(load_nf4(tiny32), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = peft.get_peft_model(load_bnb(tiny32), peft.LoraConfig(r=2, target_modules="all-linear"))
    assert len(lora_layers(ours)) == 14
    assert sorted(ours.base_model.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules


def test_stock_adapter_loaders_give_nf4_layers_and_the_same_outputs(tmp_path, tiny32, ids):
    pm = adapted(load_nf4(tiny32), target_modules="all-linear")
    pm.eval()
    expect = pm(ids).logits
    path = tmp_path / "adapter"
    pm.save_pretrained(path)

    def transformers_load_adapter():
        model = load_nf4(tiny32)
        model.load_adapter(str(path))
        return model

    def peft_load_adapter():  # a second adapter on a PeftModel
        model = peft.get_peft_model(load_nf4(tiny32), peft.LoraConfig(r=2, target_modules=["q_proj"]))
        model.load_adapter(str(path), adapter_name="loaded")
        model.set_adapter("loaded")
        return model

    loaders = {
        "PeftModel.from_pretrained": lambda: peft.PeftModel.from_pretrained(load_nf4(tiny32), path),
        "AutoPeftModelForCausalLM": lambda: peft.AutoPeftModelForCausalLM.from_pretrained(
            path, quantization_config=nf4.hf.NF4Config(), dtype=torch.float32
        ),  # the adapter records the 16-bit base (tiny32); NF4Config quantizes it as it loads
        "model.load_adapter": transformers_load_adapter,
        "PeftModel.load_adapter": peft_load_adapter,
        "nf4.hf.load_adapter": lambda: nf4.hf.load_adapter(load_nf4(tiny32), path),
    }
    for name, load in loaders.items():
        model = load()
        model.eval()
        assert len([m for m in lora_layers(model).values() if "default" in m.lora_A or "loaded" in m.lora_A]) == 14
        assert torch.equal(model(ids).logits, expect), name


def test_parameter_counts_equal_bitsandbytes(tiny32, capsys):
    """num_parameters, PEFT's counts and printout as bitsandbytes gives them (the 16-bit model's count);
    get_memory_footprint is bitsandbytes' plus the quantization constants it keeps outside parameters
    and buffers (absmax, nested absmax and offset, the two code tables)."""
    ours, theirs = load_nf4(tiny32), load_bnb(tiny32)
    plain = LlamaForCausalLM.from_pretrained(tiny32)
    assert ours.num_parameters() == theirs.num_parameters() == plain.num_parameters()
    for kwargs in ({"only_trainable": True}, {"exclude_embeddings": True}):
        assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    constants = absmax = 0
    for m in theirs.modules():
        if type(m).__name__ == "Linear4bit":
            qs = m.weight.quant_state
            pieces = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            constants += sum(t.numel() * t.element_size() for t in pieces)
            absmax += qs.absmax.numel()  # uint8 codes: our only constants held as a parameter
    assert ours.get_memory_footprint() == theirs.get_memory_footprint() + constants
    assert ours.get_memory_footprint(return_buffers=False) == theirs.get_memory_footprint(False) + absmax
    ours, theirs = (peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=TARGETS)) for m in (ours, theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    capsys.readouterr()
    ours.print_trainable_parameters()
    printed = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert printed == capsys.readouterr().out and "trainable%" in printed


def test_the_wrappers_leave_models_without_nf4_layers_to_the_original_code(tiny32):
    from transformers import PreTrainedModel

    from nf4.hf import compat

    theirs = load_bnb(tiny32)
    assert PreTrainedModel.num_parameters.__wrapped__(theirs, exclude_embeddings=True) == theirs.num_parameters(
        exclude_embeddings=True
    )
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=TARGETS))
    assert peft.PeftModel.get_nb_trainable_parameters.__wrapped__(pm) == pm.get_nb_trainable_parameters()
    compat.install()  # idempotent: the wrappers are not wrapped again
    assert not hasattr(PreTrainedModel.num_parameters.__wrapped__, "__wrapped__")


# -- without bitsandbytes: the README recipe in a fresh interpreter ------------------------------

RECIPE = r"""
import json, sys
sys.modules["bitsandbytes"] = None  # as if not installed: `import bitsandbytes` fails, find_spec gives None
readme, model_dir = sys.argv[1:3]

# the README's recipe ("Fine-tune a causal LM") as written, but for the model, the data and the arguments
code = open(readme).read().split("## Fine-tune a causal LM", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
ours = {
    "model_dir = ": f"model_dir = {model_dir!r}",
    "texts = ": "texts = ['w5 w6 w7 w8 w9 w10', 'w11 w12 w13 w14']",
    "args = ": "args = TrainingArguments('qlora-out', max_steps=2, per_device_train_batch_size=2, learning_rate=2e-4, "
               "use_cpu=True, report_to=[], save_strategy='no')",
}
lines = code.splitlines()
for i, line in enumerate(lines):
    for start, replacement in ours.items():
        if line.startswith(start):
            lines[i] = replacement
            ours[start] = None
assert not any(ours.values()), f"the README recipe has no line starting with {ours}"
recipe = {}
exec("\n".join(lines), recipe)

import peft, torch
from transformers import AutoModelForCausalLM
import nf4.hf

model = recipe["model"]
counts = [model.get_base_model().num_parameters(), model.get_base_model().num_parameters(exclude_embeddings=True)]
base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4.hf.NF4Config(), dtype=torch.bfloat16)
base = peft.prepare_model_for_kbit_training(base)  # float32 norms, as in the trained model
back = peft.PeftModel.from_pretrained(base, "qlora-out/adapter")
ids = torch.tensor([[2, 5, 6, 7, 8]])
model.eval()
with torch.no_grad():
    same = torch.equal(model(ids).logits, back(ids).logits)
# TRL's SFTTrainer with a stock LoraConfig, one step (TRL is in the test extra)
import trl
from datasets import Dataset

sft = trl.SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4.hf.NF4Config(), dtype=torch.bfloat16),
    args=trl.SFTConfig(output_dir="trl-out", max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                       save_strategy="no", max_length=16),
    train_dataset=Dataset.from_dict({"text": ["w5 w6 w7 w8 w9", "w10 w11 w12 w13"]}),
    processing_class=recipe["tokenizer"],
    peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
)
print(json.dumps({
    "trl": [sft.train().global_step, sum(type(m).__name__ == "PeftLinearNF4" for m in sft.model.modules())],
    "counts": counts,
    "peft_counts": list(model.get_nb_trainable_parameters()),
    "fused": sum(type(m).__name__ == "PeftLinearNF4" for m in model.modules()),
    "fused_back": sum(type(m).__name__ == "PeftLinearNF4" for m in back.modules()),
    "lora_B_trained": all(p.abs().sum().item() > 0 for n, p in model.named_parameters() if "lora_B" in n),
    "same_outputs": same,
    "bitsandbytes": sys.modules["bitsandbytes"] is None,
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is in the test extra")
def test_readme_recipe_trains_without_bitsandbytes(tmp_path, tiny32):
    """The README's recipe, read from README.md, in a fresh interpreter where bitsandbytes cannot be
    imported: it trains (every lora_B moved off zero), counts as bitsandbytes does, and its saved adapter
    loads back with PeftModel.from_pretrained to the same outputs; TRL's SFTTrainer trains there too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny_tokenizer().save_pretrained(tiny32)
    readme = Path(__file__).resolve().parents[1] / "README.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch path on the CPU
    # not from the repository root, where the folder kernels/ would shadow Hugging Face's `kernels`
    run = subprocess.run([sys.executable, "-c", RECIPE, str(readme), str(tiny32)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    theirs = peft.get_peft_model(
        peft.prepare_model_for_kbit_training(load_bnb(tiny32, torch.bfloat16)),
        peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"),
    )  # the same recipe on bitsandbytes
    base = theirs.get_base_model()
    assert got["counts"] == [base.num_parameters(), base.num_parameters(exclude_embeddings=True)]
    assert got["peft_counts"] == list(theirs.get_nb_trainable_parameters())
    assert got["lora_B_trained"] and got["fused"] == got["fused_back"] == 14
    assert got["same_outputs"] and got["bitsandbytes"] and got["trl"] == [1, 14]
    assert (tmp_path / "qlora-out" / "adapter" / "adapter_model.safetensors").exists()


# -- the exact 16-bit merge: a clean model, a checkpoint stock transformers loads as 16-bit ------


def test_merge_and_unload_gives_a_clean_16_bit_model(tmp_path, tiny32, ids):
    from transformers import AutoModelForCausalLM

    pm = adapted(load_nf4(tiny32), target_modules="all-linear")
    pm.eval()
    expect = pm(ids).logits
    merged = nf4.hf.merge_and_unload(pm)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, (LinearNF4, peft.tuners.tuners_utils.BaseTunerLayer)) for m in merged.modules())
    for name in ("is_loaded_in_4bit", "hf_quantizer", "quantization_method"):
        assert getattr(merged, name, None) is None, name
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_quantized
    assert close(merged(ids).logits, expect)
    assert merged.num_parameters() == LlamaForCausalLM.from_pretrained(tiny32).num_parameters()
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # stock: no quantizer, no nf4 layer
    assert getattr(back, "hf_quantizer", None) is None
    assert {type(m) for n, m in back.named_modules() if n.endswith(tuple(TARGETS))} == {nn.Linear}
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert torch.equal(back(ids).logits, merged(ids).logits)


def test_dequantize_drops_the_4_bit_markers_too(tiny32):
    model = load_nf4(tiny32)
    model.dequantize()
    assert getattr(model, "is_loaded_in_4bit", None) is None and getattr(model, "hf_quantizer", None) is None
    assert model.num_parameters() == LlamaForCausalLM.from_pretrained(tiny32).num_parameters()


def two_adapters(model, seed=2):
    """`adapted(model)` plus "other" (r 2, rsLoRA) on q_proj and down_proj, non-zero B everywhere."""
    pm = adapted(model)
    other = peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"])
    pm.add_adapter("other", other)
    randomize(pm, seed)
    return pm.eval()


def test_a_mixed_batch_equals_peft_on_bitsandbytes_in_one_call_per_layer(monkeypatch, tiny32, ids):
    import bitsandbytes as bnb

    from nf4.lora import ops

    ours = two_adapters(load_nf4(tiny32, double_quant=False))
    theirs = two_adapters(load_bnb(tiny32, double_quant=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(ours.get_parameter(name))
    for layer in theirs.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False  # bitsandbytes' generic path: dequantize, then matmul
    calls = count_calls(monkeypatch, ops, ["matmul", "matmul_adapters"])
    ids3 = torch.cat([ids, ids[:1].flip(1)])
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        a = ours(ids3, adapter_names=names).logits
        assert calls == {"matmul": 8, "matmul_adapters": 6}  # 6 adapted layers: one fused call each
        b = theirs(ids3, adapter_names=names).logits
        assert close(a, b)
        for row, name in enumerate(names):  # and each row as that adapter alone
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(ids3[row : row + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(ids3[row : row + 1]).logits
            assert close(a[row], alone[0]), name


def test_generate_with_adapter_names_gives_each_adapter_s_own_tokens(tiny32, ids):
    pm = two_adapters(load_nf4(tiny32))
    prompts = torch.cat([ids, ids[:1].flip(1), ids[1:]])
    names = ["other", "__base__", "default", "other"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = pm.generate(input_ids=prompts, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                alone = pm.generate(input_ids=prompts[row : row + 1], **kwargs)
        else:
            pm.set_adapter(name)
            alone = pm.generate(input_ids=prompts[row : row + 1], **kwargs)
        assert torch.equal(mixed[row], alone[0]), (row, name)
    assert len({tuple(t) for t in mixed[:3, prompts.shape[1] :].tolist()}) == 3  # the adapters change the tokens


def test_readme_many_adapters_example_runs_each_row_with_its_adapter(tmp_path, tiny32):
    """The README's "Many adapters on one base" code, read from README.md, on the tiny model with two
    adapters saved by PEFT: each generated row equals that prompt generated alone with its adapter."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Many adapters on one base", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    tiny_tokenizer().save_pretrained(tiny32)
    for i, name in enumerate(("support", "legal")):
        pm = peft.get_peft_model(load_nf4(tiny32), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize(pm, 10 + i)
        pm.save_pretrained(tmp_path / "adapters" / name)
    code = code.replace('"meta-llama/Llama-3.2-1B"', repr(str(tiny32))).replace('"adapters/', f'"{tmp_path}/adapters/')
    code = code.replace("max_new_tokens=32", "max_new_tokens=5, do_sample=False")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, batch, out = scope["model"], scope["batch"], scope["out"]
    assert out.shape == (3, batch["input_ids"].shape[1] + 5)
    for row, name in enumerate(["support", "legal", "__base__"]):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**one, max_new_tokens=5, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(**one, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[row], alone[0]), name
    assert not torch.equal(out[0, -5:], out[1, -5:])
