"""nf4.hf's quantizer: transformers' `from_pretrained` loads 16-bit checkpoints straight into NF4, reads
bitsandbytes' serialized 4-bit checkpoints as they are, and saves what stock transformers + bitsandbytes
load. Tiny random Llama checkpoints (tests/hf_helpers.py), compared bit for bit with `nf4.quantize` and with
bitsandbytes' own loads."""

import json
import weakref

import pytest
import torch
from hf_helpers import TARGETS, load_bnb, load_nf4, save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import nf4
import nf4.hf
from helpers import same_bnb_entry
from nf4.checkpoint import quantize_checkpoint
from nf4.hf import quantizer as hf_quantizer
from nf4.lora import LinearNF4


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole models on the CPU: the torch path, not the kernel interpreter (tests/test_kernels.py holds the
    kernels to the same bytes)."""


ATTN_MLP = [("self_attn", t) for t in TARGETS[:4]] + [("mlp", t) for t in TARGETS[4:]]


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearNF4)}


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_from_pretrained_quantizes_each_weight_as_nf4_quantize_does(tiny16, double_quant):
    model = load_nf4(tiny16, torch.bfloat16, double_quant=double_quant)
    original = load_file(tiny16 / "model.safetensors")
    converted = layers(model)
    assert len(converted) == 14 and all(n.rsplit(".", 1)[1] in TARGETS for n in converted)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays 16-bit, as bitsandbytes leaves it
    for name, layer in converted.items():
        expect = nf4.quantize(original[name + ".weight"], 64, double_quant)
        got = layer.nf4_weight
        assert got.dtype == torch.bfloat16 and got.double_quant == double_quant
        for key, value in expect.to_bnb_state_dict("w").items():
            assert torch.equal(got.to_bnb_state_dict("w")[key], value), (name, key)
    assert model.is_loaded_in_4bit and model.hf_quantizer.is_trainable


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bytes_equal_bitsandbytes_own_on_the_fly_quantization(tmp_path, dtype, double_quant):
    """Bit for bit without double quantization. With it, the packed codes are still bit for bit; the
    nested pieces differ where the format lets them (nf4-format.md, section 3): ours is the exact mean of
    the absmax (the same on every device), bitsandbytes' a float32 mean, and its CPU picks nested codes
    through an approximate table (off by one on ~0.2%)."""
    path = save_tiny(tmp_path, dtype=dtype)
    ours = load_nf4(path, dtype, double_quant=double_quant).state_dict()
    theirs = load_bnb(path, dtype, double_quant=double_quant).state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if double_quant and key.endswith("weight.absmax"):
            assert (ours[key].int() - value.int()).abs().max() <= 1, key
        elif double_quant and key.endswith("nested_absmax"):
            assert torch.allclose(ours[key], value, rtol=1e-6, atol=0), key
        elif double_quant and key.endswith("bitsandbytes__nf4"):  # the JSON: the same but for the offset
            a, b = (json.loads(bytes(t.tolist())) for t in (ours[key], value))
            assert a.pop("nested_offset") == pytest.approx(b.pop("nested_offset"), rel=1e-6) and a == b, key
        else:
            assert torch.equal(ours[key], value), key


def test_the_16_bit_weights_are_dropped_one_by_one(monkeypatch, tiny16):
    """Never the whole 16-bit model in memory: when a weight is quantized, no 16-bit weight quantized
    before it is alive any more (nothing, ours or transformers', keeps a reference)."""
    seen, alive = [], []
    real = hf_quantizer.quantize

    def spy(tensor, *args):
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(tensor))
        return real(tensor, *args)

    monkeypatch.setattr(hf_quantizer, "quantize", spy)
    load_nf4(tiny16, torch.bfloat16)
    assert len(seen) == 14 and alive == [0] * 14


def test_save_pretrained_writes_what_stock_bitsandbytes_loads(tmp_path, tiny32, ids):
    model = load_nf4(tiny32)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["load_in_4bit"] and config["bnb_4bit_use_double_quant"]
    saved = load_file(tmp_path / "out" / "model.safetensors")
    expect = model.state_dict()
    assert set(saved) == set(expect) and all(torch.equal(saved[k], expect[k]) for k in saved)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # bitsandbytes' layers
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    # float32, before any no_grad call (bitsandbytes' CPU inference path repacks and rounds)
    assert torch.allclose(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_reloads_its_own_checkpoint_bit_for_bit(tmp_path, tiny16, ids):
    model = load_nf4(tiny16, torch.bfloat16)
    model.save_pretrained(tmp_path / "out")
    back = nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "out", dtype=torch.bfloat16)
    assert len(layers(back)) == 14
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_reads_transformers_bitsandbytes_checkpoints_without_requantizing(monkeypatch, tmp_path, tiny32):
    load_bnb(tiny32).save_pretrained(tmp_path / "bnb")
    monkeypatch.setattr(hf_quantizer, "quantize", None)  # any requantization would fail
    ours = nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "bnb", dtype=torch.float32)
    saved = load_file(tmp_path / "bnb" / "model.safetensors")
    mine = ours.state_dict()
    assert set(saved) == set(mine) and all(same_bnb_entry(k, saved[k], mine[k]) for k in saved)


def test_reads_the_cli_output_with_its_blocksize(tmp_path, tiny32):
    quantize_checkpoint(tiny32, tmp_path / "q", blocksize=128, progress=False)
    model = nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q", dtype=torch.float32)
    assert {m.nf4_meta.blocksize for m in layers(model).values()} == {128}
    original = load_file(tiny32 / "model.safetensors")
    w = model.model.layers[1].mlp.down_proj.nf4_weight
    assert torch.equal(w.packed, nf4.quantize(original["model.layers.1.mlp.down_proj.weight"], 128).packed)


def test_nf4_config_validates_and_round_trips():
    config = nf4.hf.NF4Config(blocksize=128, double_quant=False, modules_to_not_convert="lm_head")
    assert nf4.hf.NF4Config.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.hf.NF4Config(blocksize=100)
    with pytest.raises(TypeError, match="unexpected arguments \\['bnb_4bit_quant_type'\\]"):
        nf4.hf.NF4Config(bnb_4bit_quant_type="nf4")


def test_modules_to_not_convert(tiny32):
    model = load_nf4(tiny32, modules_to_not_convert=["model.layers.1"])  # replaces the default list, like bitsandbytes
    assert sorted(layers(model)) == sorted(["lm_head"] + [f"model.layers.0.{p}.{t}" for p, t in ATTN_MLP])
    with pytest.raises(ValueError, match="converted no layer"):
        load_nf4(tiny32, modules_to_not_convert=["model", "lm_head"])


def test_dequantize_gives_16_bit_layers_with_the_same_outputs(tiny32, ids):
    model = load_nf4(tiny32)
    before = model(ids).logits
    model.dequantize()
    assert not layers(model) and torch.allclose(model(ids).logits, before, rtol=1e-5, atol=1e-5)


# -- bad checkpoints: a clear error naming the layer, what was expected and what was found -----------


def _quantized(tmp_path, tiny32, **kwargs):
    out = tmp_path / "q"
    load_nf4(tiny32, **kwargs).save_pretrained(out)
    return out


def _edit(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


LAYER = "model.layers.0.self_attn.q_proj"


def test_refuses_fp4_and_8_bit_checkpoints(tmp_path, tiny32):
    load_bnb(tiny32, quant_type="fp4").save_pretrained(tmp_path / "fp4")
    with pytest.raises(ValueError, match="bitsandbytes' 4-bit 'fp4'.*reads only 'nf4'"):
        nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "fp4")
    # the config says nf4 but one layer is fp4
    out = _quantized(tmp_path, tiny32)
    fp4 = load_file(tmp_path / "fp4" / "model.safetensors")

    def swap(tensors):
        for key in [k for k in tensors if k.startswith(LAYER + ".weight")]:
            del tensors[key]
        tensors.update({k: v for k, v in fp4.items() if k.startswith(LAYER + ".weight")})

    _edit(out, swap)
    with pytest.raises(ValueError, match=rf"{LAYER}: expected NF4, the checkpoint's quant state is bitsandbytes' FP4"):
        nf4.hf.from_pretrained(AutoModelForCausalLM, out)
    with pytest.raises(ValueError, match="quantized to 8 bits"):
        nf4.hf.NF4Config.from_bitsandbytes({"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_refuses_another_blocksize_than_the_config(tmp_path, tiny32):
    quantize_checkpoint(tiny32, tmp_path / "q", blocksize=128, progress=False)
    with pytest.raises(ValueError, match=r"(?s)nf4 could not load 14 layer\(s\).*expected blocksize 64 .* has 128"):
        nf4.hf.from_pretrained(AutoModelForCausalLM, tmp_path / "q", quantization_config=nf4.hf.NF4Config(blocksize=64))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t.update({f"{LAYER}.weight.absmax": t[f"{LAYER}.weight.absmax"][:-1]}),
         r"weight.absmax: expected uint8 \[64\] \(one 8-bit code per 64-element block\), got uint8 \[63\]"),
        (lambda t: t.update({f"{LAYER}.weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34, 113]).byte()}),
         "bitsandbytes__nf4: not valid UTF-8 JSON"),
        (lambda t: t.pop(f"{LAYER}.weight.quant_map"), rf"missing \['{LAYER}.weight.quant_map'\]"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith(LAYER + ".")], "its weight is not in the checkpoint"),
        (lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-2]}), r"expected uint8 \[2048, 1\]"),
    ],
    ids=["absmax-truncated", "json-corrupted", "quant-map-missing", "layer-missing", "codes-truncated"],
)  # fmt: skip
def test_refuses_corrupted_or_truncated_quant_states(tmp_path, tiny32, damage, message):
    out = _quantized(tmp_path, tiny32)
    _edit(out, damage)
    with pytest.raises(ValueError, match=rf"nf4 could not load 1 layer\(s\):\n  {LAYER}: .*{message}"):
        nf4.hf.from_pretrained(AutoModelForCausalLM, out)


def test_gpt2_conv1d_layers_quantize_as_bitsandbytes_does(tmp_path, ids):
    """GPT-2's Linear is transformers' Conv1D, its weight stored [in, out]: quantized transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32)).save_pretrained(
        tmp_path
    )
    ours = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=nf4.hf.NF4Config(double_quant=False), dtype=torch.float32
    )
    theirs = load_bnb(tmp_path, double_quant=False)
    assert sorted(layers(ours)) == [
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_from_pretrained_on_cuda_quantizes_with_the_kernel_to_the_same_bytes(tiny16, ids):
    gpu = AutoModelForCausalLM.from_pretrained(
        tiny16, quantization_config=nf4.hf.NF4Config(), dtype=torch.bfloat16, device_map="cuda"
    )
    assert gpu.model.layers[0].mlp.up_proj.weight.is_cuda
    cpu = load_nf4(tiny16, torch.bfloat16)
    a, b = gpu.state_dict(), cpu.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k]) for k in a)
    assert torch.allclose(gpu(ids.cuda()).logits.cpu().float(), cpu(ids).logits.float(), rtol=0.05, atol=0.05)


# -- nf4.hf.from_pretrained with bitsandbytes' config: NF4 read as NF4Config, the rest refused -------


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_from_pretrained_reads_an_nf4_bitsandbytes_config_as_nf4_config(tiny16, double_quant):
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = nf4.hf.from_pretrained(AutoModelForCausalLM, tiny16, quantization_config=bnb, dtype=torch.bfloat16)
    assert len(layers(model)) == 14 and not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    expect = load_nf4(tiny16, torch.bfloat16, double_quant=double_quant).state_dict()
    got = model.state_dict()
    assert set(got) == set(expect) and all(torch.equal(got[k], expect[k]) for k in got)


def test_from_pretrained_refuses_bitsandbytes_configs_nf4_cannot_honour(tiny16):
    from transformers import BitsAndBytesConfig, GPTQConfig

    cases = [
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"), ValueError,
         r"bnb_4bit_quant_type='fp4'\) asks for bitsandbytes' FP4.*pass quantization_config=nf4.hf.NF4Config\(\)"),
        (BitsAndBytesConfig(load_in_8bit=True), ValueError,
         r"load_in_8bit=True\) asks for bitsandbytes' 8-bit LLM.int8.*pass quantization_config=nf4.hf.NF4Config\(\)"),
        (GPTQConfig(bits=4), TypeError, r"must be nf4.hf.NF4Config .* got GPTQConfig; pass quantization_config="),
    ]  # fmt: skip
    for config, error, message in cases:
        with pytest.raises(error, match=message):
            nf4.hf.from_pretrained(AutoModelForCausalLM, tiny16, quantization_config=config)


def test_gpt2_dequantizes_to_conv1d_and_stock_transformers_loads_it(tmp_path, ids):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32)).save_pretrained(
        tmp_path / "16"
    )
    model = load_nf4(tmp_path / "16")
    expect = model(ids).logits
    model.dequantize()
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and getattr(model, "is_loaded_in_4bit", None) is None
    assert torch.allclose(model(ids).logits, expect, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "dense")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(back(ids).logits, model(ids).logits)
