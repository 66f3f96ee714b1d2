"""The command line: `nf4 quantize` (bitsandbytes loads the result) and `nf4 demo` (end to end)."""

import json
import os
import subprocess
import sys

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import nf4
from nf4.cli import main
from nf4.tensor import NF4Tensor


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole models on the CPU: the fast torch path, not the kernel interpreter."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    # intermediate 128, not 96: bitsandbytes' CPU inference path (under no_grad) cannot run a Linear4bit
    # whose in_features is not a multiple of the blocksize; ours can (tests/test_models.py)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_quantize_directory_loads_in_transformers_4bit(tmp_path, tiny_dir, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_dir), str(out), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "quantized 14 weights (nn.Linear weights)" in report
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" in sd and sd["lm_head.weight"].dtype == torch.float32  # the head stays as it was
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    )  # fmt: skip
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        # the same bytes except bitsandbytes' approximate nested codes (nf4-format.md section 3)
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-3, rtol=1e-3)
    original = load_file(tiny_dir / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        pieces = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
        state = QuantState.from_dict(pieces, device="cpu")
        got = bnbf.dequantize_4bit(sd[name], state, quant_type="nf4")
        assert torch.equal(got, nf4.dequantize(nf4.quantize(original[name])))


def test_quantize_single_file_with_pattern(tmp_path):
    tensors = {"a.weight": torch.randn(32, 64), "b.weight": torch.randn(16, 64), "b.bias": torch.randn(16)}
    save_file(tensors, tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--pattern", r"^b\.", "--blocksize", "32", "--no-progress"]) == 0  # fmt: skip
    sd = load_file(tmp_path / "out.safetensors")
    assert torch.equal(sd["a.weight"], tensors["a.weight"]) and torch.equal(sd["b.bias"], tensors["b.bias"])
    q = NF4Tensor.from_bnb_state_dict(sd, "b.weight")
    assert q.blocksize == 32 and torch.equal(nf4.dequantize(q), nf4.dequantize(nf4.quantize(tensors["b.weight"], 32)))


def test_quantize_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    assert main(["quantize", str(tmp_path / "broken.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    save_file({"w": torch.randn(4, 4)}, tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"), "--pattern", "zz"]) == 2
    assert "no weight" in capsys.readouterr().err


def test_python_dash_m_and_console_script_help():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "nf4", "--help"], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0 and "demo" in out.stdout and "quantize" in out.stdout


def test_demo_end_to_end_small(tmp_path):
    from nf4.lora.demo import run

    lines = []
    result = run(steps=12, batch=8, heldout=32, train_pool=96, out=tmp_path, progress=False, log=lines.append)
    text = "\n".join(lines)
    assert result.ok, text
    assert result.fidelity_after > result.fidelity_before > 0.9
    assert result.reload_identical and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert abs(result.fidelity_merged_16bit - result.fidelity_after) < 1e-4
    for needle in ("Linear layers", "bits/param", "NF4, before training", "merged into NF4", "outputs identical"):
        assert needle in text
