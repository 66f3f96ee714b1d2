"""transformers' quantizer for nf4 (nf4/hf/quantizer.py): NF4Config's defaults and conversions, the
quantizer's device-map and parameter hooks, what a load stores (bytes against `nf4.quantize` at the
config's blocksize), what it records for saving, and the errors it collects."""

import copy
import json

import pytest
import torch
from hf_helpers import TARGETS, load_bnb, load_nf4
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import nf4
import nf4.hf
from nf4.checkpoint import quantize_checkpoint
from nf4.hf.quantizer import (
    SERIALIZED_NAMES,
    NF4Config,
    NF4Deserialize,
    NF4HfQuantizer,
    as_nf4_config,
    nf4_config_for,
)
from nf4.lora import LinearNF4


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole models on the CPU: the torch path, not the kernel interpreter."""


def nf4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearNF4)}


def same_bytes(q, r):
    a, b = q.to_bnb_state_dict(), r.to_bnb_state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_config_defaults_and_arguments():
    config = NF4Config()
    assert config.to_dict() == {"quant_method": "nf4", "blocksize": 64, "double_quant": True,
                                "modules_to_not_convert": None}  # fmt: skip
    assert config.quant_method == "nf4"
    assert NF4Config(blocksize=None).blocksize is None
    assert NF4Config(modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    assert NF4Config(modules_to_not_convert=("a", "b")).modules_to_not_convert == ["a", "b"]
    assert NF4Config(quant_method="nf4", blocksize=256).blocksize == 256  # from_dict passes quant_method
    with pytest.raises(TypeError, match="double_quant must be a bool, got 1"):
        NF4Config(double_quant=1)
    with pytest.raises(TypeError, match=r"unexpected arguments \['a', 'z'\]; it takes blocksize"):
        NF4Config(z=1, a=2)


def test_bitsandbytes_dict_is_what_stock_transformers_reads():
    config = NF4Config(double_quant=False)
    assert config.bitsandbytes_dict(torch.bfloat16, ["lm_head"]) == {
        "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }  # fmt: skip


def test_from_bitsandbytes_reads_nf4_and_refuses_the_rest():
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
           "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["lm_head"]}  # fmt: skip
    assert NF4Config.from_bitsandbytes(bnb, blocksize=128).to_dict() == {
        "quant_method": "nf4", "blocksize": 128, "double_quant": True, "modules_to_not_convert": ["lm_head"]
    }  # fmt: skip
    plain = NF4Config.from_bitsandbytes({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    assert plain.to_dict() == {"quant_method": "nf4", "blocksize": None, "double_quant": False,
                               "modules_to_not_convert": None}  # fmt: skip
    with pytest.raises(ValueError, match=r"4-bit 'fp4' \(bnb_4bit_quant_type\); nf4 reads only 'nf4'"):
        NF4Config.from_bitsandbytes({"quant_method": "bitsandbytes", "load_in_4bit": True})  # fp4 by default
    eights = (
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        {"quant_method": "bitsandbytes"},
        {"load_in_8bit": True},
        {"load_in_8bit": True, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    )
    for eight in eights:
        with pytest.raises(ValueError, match="quantized to 8 bits"):
            NF4Config.from_bitsandbytes(eight)
    with pytest.raises(ValueError, match="not a bitsandbytes quantization_config"):
        NF4Config.from_bitsandbytes({"quant_method": "gptq", "bits": 4})


def test_as_nf4_config_reads_bitsandbytes_nf4_and_refuses_the_rest():
    """`nf4.hf.from_pretrained(..., quantization_config=)`: bitsandbytes' NF4 config becomes the NF4Config
    with the same bytes (blocksize 64, its double-quant flag and skipped modules); anything else is refused."""
    from transformers import GPTQConfig

    mine = NF4Config(blocksize=128)
    assert as_nf4_config(None) is None and as_nf4_config(mine) is mine
    for double_quant in (True, False):
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                 llm_int8_skip_modules=["lm_head", "q_proj"])  # fmt: skip
        assert as_nf4_config(bnb).to_dict() == {"quant_method": "nf4", "blocksize": 64, "double_quant": double_quant,
                                                "modules_to_not_convert": ["lm_head", "q_proj"]}  # fmt: skip
    eight_bit = r"asks for bitsandbytes' 8-bit LLM.int8, which nf4 does not .*=nf4.hf.NF4Config\(\)"
    cases = [
        (BitsAndBytesConfig(load_in_8bit=True), ValueError, eight_bit),
        (BitsAndBytesConfig(), ValueError, eight_bit),  # neither 4 nor 8 bits: no NF4 asked for either
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"), ValueError,
         r"bnb_4bit_quant_type='fp4'\) asks for bitsandbytes' FP4.*pass quantization_config=nf4.hf.NF4Config\(\)"),
        (GPTQConfig(bits=4), TypeError, r"must be nf4.hf.NF4Config .* got GPTQConfig; pass quantization_config="),
    ]  # fmt: skip
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            as_nf4_config(config)


def test_nf4_config_for_each_recorded_config():
    assert nf4_config_for(None, 64) is None
    ours = nf4_config_for({"quant_method": "nf4", "blocksize": 128, "double_quant": False,
                           "modules_to_not_convert": None}, blocksize=64)  # fmt: skip
    assert (ours.blocksize, ours.double_quant) == (128, False)  # its own record wins
    theirs = nf4_config_for(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True), blocksize=256)  # fmt: skip
    assert isinstance(theirs, NF4Config) and (theirs.blocksize, theirs.double_quant) == (256, True)


def test_device_map_checks():
    quantizer = NF4HfQuantizer(NF4Config())
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        quantizer.validate_environment(device_map={"model": "cpu", "lm_head": "disk"})
    quantizer.validate_environment(device_map={"": "cpu"})
    quantizer.validate_environment(device_map="auto")
    here = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    assert quantizer.update_device_map(None) == {"": here}
    given = {"": "cpu"}
    assert quantizer.update_device_map(given) is given


def test_hooks_and_flags():
    quantizer = NF4HfQuantizer(NF4Config())
    model = nn.Module()
    model.proj, model.norm = LinearNF4(64, 8), nn.LayerNorm(8)
    assert quantizer.param_needs_quantization(model, "proj.weight")
    assert not quantizer.param_needs_quantization(model, "proj.bias")
    assert not quantizer.param_needs_quantization(model, "norm.weight")
    assert quantizer.is_serializable() is True and quantizer.is_trainable is True and quantizer.is_compileable
    assert quantizer.requires_calibration is False
    assert quantizer.get_quantize_ops().hf_quantizer is quantizer
    assert NF4HfQuantizer(NF4Config(), pre_quantized=False).get_weight_conversions() == []  # NF4Quantize instead
    (converter,) = quantizer.get_weight_conversions()  # a pre-quantized checkpoint: every serialized piece
    assert converter.source_patterns == list(SERIALIZED_NAMES) and converter.target_patterns == ["weight"]
    (op,) = converter.operations
    assert isinstance(op, NF4Deserialize) and op.hf_quantizer is quantizer
    assert copy.deepcopy(op) is op  # transformers copies the op per weight; all copies report to one quantizer


@pytest.mark.parametrize("blocksize,double_quant", [(128, False), (None, True)])
def test_a_16_bit_load_quantizes_at_the_configs_blocksize(tiny16, blocksize, double_quant):
    model, info = AutoModelForCausalLM.from_pretrained(
        tiny16, quantization_config=NF4Config(blocksize, double_quant), dtype=torch.bfloat16, output_loading_info=True
    )
    assert info["missing_keys"] == set() or info["missing_keys"] == []  # each layer's weight was stored by nf4
    original = load_file(tiny16 / "model.safetensors")
    found = nf4_layers(model)
    assert len(found) == 14 and type(model.lm_head) is nn.Linear
    for name, layer in found.items():
        want = nf4.quantize(original[name + ".weight"], blocksize or 64, double_quant)
        assert same_bytes(layer.nf4_weight, want), name
        assert layer.nf4_meta.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in layer.parameters())  # the bias too
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])
    assert model.is_loaded_in_4bit
    recorded = model.config.quantization_config
    assert isinstance(recorded, BitsAndBytesConfig) and recorded.load_in_4bit
    assert recorded.bnb_4bit_quant_type == "nf4" and recorded.bnb_4bit_use_double_quant == double_quant
    assert recorded.bnb_4bit_compute_dtype == torch.bfloat16 and recorded.llm_int8_skip_modules is None


def test_modules_to_not_convert_stay_16_bit_and_are_recorded(tiny32):
    model = load_nf4(tiny32, modules_to_not_convert=["q_proj", "lm_head"])
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(kept) == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    original = load_file(tiny32 / "model.safetensors")
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(model.get_parameter(q_proj), original[q_proj])
    assert model.config.quantization_config.llm_int8_skip_modules == ["q_proj", "lm_head"]


def test_a_partly_quantized_checkpoint_keeps_its_bytes_and_quantizes_the_rest(tmp_path, tiny32):
    quantize_checkpoint(tiny32, tmp_path / "q", pattern="q_proj", progress=False)
    model = nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q", dtype=torch.float32)
    stored, original = load_file(tmp_path / "q" / "model.safetensors"), load_file(tiny32 / "model.safetensors")
    found = nf4_layers(model)
    assert len(found) == 14
    assert torch.equal(model.model.norm.weight, stored["model.norm.weight"])  # other weights: not ours, loaded
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    for name, layer in found.items():
        if name.endswith("q_proj"):
            want = nf4.NF4Tensor.from_bnb_state_dict(stored, prefix=name + ".weight")
        else:  # 16-bit in the checkpoint: quantized on the fly with the defaults
            want = nf4.quantize(original[name + ".weight"], 64, True)
        assert same_bytes(layer.nf4_weight, want), name


def test_errors_are_collected_and_raised_together(tmp_path, tiny32):
    out = tmp_path / "broken"
    out.mkdir()
    for f in tiny32.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        del tensors[name]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_nf4(out)
    assert str(error.value) == (
        "nf4 could not load 2 layer(s):\n"
        "  model.layers.0.self_attn.o_proj: its weight is not in the checkpoint\n"
        "  model.layers.1.mlp.up_proj: its weight is not in the checkpoint"
    )


def test_a_model_without_linear_layers_to_convert_is_refused(tiny32):
    with pytest.raises(ValueError, match=r"NF4Config converted no layer of this LlamaForCausalLM.*check modules_"):
        load_nf4(tiny32, modules_to_not_convert=["model", "lm_head"])


def test_dequantize_gives_the_dequantized_weights_exactly(tiny32):
    model = load_nf4(tiny32)
    weights = {n: m.dequantize_weight() for n, m in nf4_layers(model).items()}
    model.dequantize()
    assert not nf4_layers(model)
    modules = dict(model.named_modules())
    for name, w in weights.items():
        assert type(modules[name]) is nn.Linear and torch.equal(modules[name].weight, w), name
    assert sorted(weights) == sorted(f"model.layers.{i}.{p}.{t}" for i in range(2) for t in TARGETS
                                     for p in ("self_attn" if t in TARGETS[:4] else "mlp",))  # fmt: skip


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_pre_quantized_layer_problems_name_the_layer(tmp_path, tiny32):
    quantize_checkpoint(tiny32, tmp_path / "q", progress=False)
    layer = "model.layers.0.self_attn.k_proj"
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    tensors[f"{layer}.weight.quant_state.bitsandbytes__fp4"] = tensors.pop(
        f"{layer}.weight.quant_state.bitsandbytes__nf4"
    )
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"could not load 1 layer\(s\):\n  {layer}: expected NF4, the checkpoint's "
                                         r"quant state is bitsandbytes' FP4"):  # fmt: skip
        nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q")
    # the packed bytes alone, their quant state lost: refused as such, never quantized again
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{layer}.weight.")}
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    missing = rf"\['{layer}.weight.absmax', '{layer}.weight.quant_map'"
    with pytest.raises(ValueError, match=rf"could not load 1 layer\(s\):\n  {layer}: not a bitsandbytes NF4 state "
                                         rf"dict: missing {missing}"):  # fmt: skip
        nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q")
    quantize_checkpoint(tiny32, tmp_path / "q128", blocksize=128, progress=False)
    with pytest.raises(ValueError, match=r"(?s)could not load 14 layer\(s\).*expected blocksize 64 \(the quantization_"
                                         r"config's\), the checkpoint's quant state has 128; load it with "
                                         r"NF4Config\(blocksize=128\) or blocksize=None"):  # fmt: skip
        nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q128", quantization_config=NF4Config(blocksize=64))


def test_a_16_bit_weight_of_another_shape_is_refused_by_name(tmp_path, tiny32):
    out = copy_dir(tiny32, tmp_path / "bad")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.gate_proj: expected a weight of shape \[128, 64\], "
                                         r"the checkpoint has \[128, 32\]"):  # fmt: skip
        load_nf4(out)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 saved in float32: Conv1D layers, each with a bias."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=1, n_head=2)).save_pretrained(path)
    return path


def test_gpt2_conv1d_weights_are_transposed_before_quantizing(gpt2):
    model = AutoModelForCausalLM.from_pretrained(gpt2, quantization_config=NF4Config(), dtype=torch.float32)
    original = load_file(gpt2 / "model.safetensors")
    found = nf4_layers(model)
    assert sorted(found) == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name, layer in found.items():
        w = original[name + ".weight"]  # Conv1D: [in, out]
        assert layer.transposed_checkpoint and (layer.out_features, layer.in_features) == (w.shape[1], w.shape[0])
        assert same_bytes(layer.nf4_weight, nf4.quantize(w.t(), 64, True)), name


def test_the_16_bit_conv1d_weights_of_a_pre_quantized_checkpoint_are_transposed_too(tmp_path, gpt2):
    """A pre-quantized GPT-2 checkpoint whose c_fc and attn.c_proj were saved in 16 bits (both shapes: a
    wide one and a square one, which would load untransposed without an error): loaded with them converted,
    they are quantized from the transposed Conv1D weight, as an on-the-fly load does."""
    kept = ["transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_proj"]
    config = NF4Config(modules_to_not_convert=["c_fc", "attn.c_proj", "lm_head"])
    partly = AutoModelForCausalLM.from_pretrained(gpt2, quantization_config=config, dtype=torch.float32)
    partly.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert [n for n in kept if stored[n + ".weight"].dtype == torch.float32] == kept
    recorded = json.loads((tmp_path / "config.json").read_text())
    recorded["quantization_config"]["llm_int8_skip_modules"] = ["lm_head"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    model = nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path, dtype=torch.float32)
    original = load_file(gpt2 / "model.safetensors")
    found = nf4_layers(model)
    assert len(found) == 4
    for name, layer in found.items():
        assert same_bytes(layer.nf4_weight, nf4.quantize(original[name + ".weight"].t(), 64, True)), name


def test_the_trainable_parameters_after_a_load_are_bitsandbytes_own(gpt2):
    """What a load leaves trainable (before PEFT freezes the base model; training the biases alone needs them):
    the checkpoint's float tensors, the NF4 layers' biases among them, as with bitsandbytes; no NF4 piece."""
    ours = AutoModelForCausalLM.from_pretrained(gpt2, quantization_config=NF4Config(), dtype=torch.float32)
    theirs = load_bnb(gpt2)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    for name, layer in nf4_layers(ours).items():
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"bias"}, name
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
