"""`nf4 quantize` (nf4/checkpoint.py, through nf4/cli.py): which weights it selects, the bytes it writes,
what a directory output holds, and every refusal (nothing written, no data lost)."""

import json

import pytest
import torch
from hf_helpers import save_tiny
from safetensors.torch import load_file, save_file

import nf4
from nf4.checkpoint import quantize_checkpoint
from nf4.cli import main


@pytest.fixture(autouse=True)
def _reference(reference_path):
    """Whole checkpoints on the CPU: the torch path, not the kernel interpreter."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def mixed_file(path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "emb.weight": torch.randn(32, 64, generator=g),
        "proj.weight": torch.randn(48, 64, generator=g, dtype=torch.float64),
        "proj.bias": torch.randn(48, generator=g),
        "head.weight": torch.randn(16, 64, generator=g).bfloat16(),
        "ids": torch.arange(128).reshape(2, 64),
        "empty": torch.zeros(0, 64),
    }
    save_file(tensors, path)
    return tensors


def assert_quantized_as_nf4(out: dict, name: str, tensor: torch.Tensor, blocksize=64, double_quant=True):
    source = tensor.float() if tensor.dtype == torch.float64 else tensor
    want = nf4.quantize(source, blocksize, double_quant).to_bnb_state_dict(name)
    pieces = {k: v for k, v in out.items() if k == name or k.startswith(name + ".")}
    assert set(pieces) == set(want), name
    assert all(torch.equal(pieces[k], want[k]) for k in want), name


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_without_config_every_2d_float_weight_is_quantized_others_copied(tmp_path, blocksize, double_quant):
    tensors = mixed_file(tmp_path / "in.safetensors")
    s = quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", blocksize=blocksize,
                            double_quant=double_quant, progress=False)  # fmt: skip
    assert s.quantized == ["emb.weight", "head.weight", "proj.weight"]
    assert sorted(s.kept) == ["empty", "ids", "proj.bias"] and s.kept_weights == []
    assert s.selection.startswith("every 2-D floating point weight, embeddings included: no config.json")
    out = load_file(tmp_path / "out.safetensors")
    for name in s.quantized:
        assert_quantized_as_nf4(out, name, tensors[name], blocksize, double_quant)
    assert all(torch.equal(out[k], tensors[k]) for k in s.kept)
    assert s.bytes_before == sum(tensors[n].numel() * tensors[n].element_size() for n in s.quantized)
    source = {n: tensors[n].float() if tensors[n].dtype == torch.float64 else tensors[n] for n in s.quantized}
    assert s.bytes_after == sum(nf4.quantize(t, blocksize, double_quant).nbytes for t in source.values())
    assert s.output == tmp_path / "out.safetensors"


def test_pattern_selects_by_search_and_lists_the_2d_weights_it_kept(tmp_path):
    tensors = mixed_file(tmp_path / "in.safetensors")
    s = quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "sub" / "out.safetensors", pattern="proj|ids",
                            progress=False)  # fmt: skip
    assert s.quantized == ["proj.weight"]  # "ids" matches but is not floating point
    assert s.kept_weights == ["emb.weight", "head.weight"]
    assert "'proj|ids' (--pattern)" in s.selection
    assert_quantized_as_nf4(load_file(tmp_path / "sub" / "out.safetensors"), "proj.weight", tensors["proj.weight"])


def test_config_selects_the_linear_weights_but_the_head_for_a_file_and_a_directory(tmp_path, tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    linear = sorted(k for k in state if k.endswith("_proj.weight"))
    assert len(linear) == 14 and "lm_head.weight" in state
    from_dir = quantize_checkpoint(tiny_dir, tmp_path / "d", progress=False)
    from_file = quantize_checkpoint(tiny_dir / "model.safetensors", tmp_path / "f.safetensors", progress=False)
    for s in (from_dir, from_file):
        assert sorted(s.quantized) == linear
        assert sorted(s.kept_weights) == ["lm_head.weight", "model.embed_tokens.weight"]
        assert "nn.Linear weights of the LlamaModel" in s.selection and "except the output head" in s.selection
    assert load_file(tmp_path / "d" / "model.safetensors").keys() == load_file(tmp_path / "f.safetensors").keys()


def test_directory_output_copies_the_rest_and_records_the_4bit_config(tmp_path, tiny_dir):
    src = tmp_path / "src"
    src.mkdir()
    for item in tiny_dir.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / "pytorch_model.bin").write_bytes(b"a 16-bit copy")
    (src / "tokenizer.json").write_text("{}")
    s = quantize_checkpoint(src, tmp_path / "out", pattern="q_proj", double_quant=False, progress=False)
    out = tmp_path / "out"
    assert sorted(s.copied) == ["1_Pooling/", "config.json", "generation_config.json", "tokenizer.json"]
    assert sorted(s.left_out) == [".git", "pytorch_model.bin"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["1_Pooling", "config.json", "generation_config.json",
                                                            "tokenizer.json", "model.safetensors"])  # fmt: skip
    assert (out / "1_Pooling" / "config.json").read_text() == '{"pooling": "mean"}'
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
    }  # fmt: skip
    assert json.loads((src / "config.json").read_text()).get("quantization_config") is None  # IN untouched
    assert s.output == out


def test_a_non_empty_output_directory_needs_overwrite(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    argv = ["quantize", str(tiny_dir), str(out), "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"nf4: error: OUT {out} already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").is_file()


def test_an_empty_output_directory_is_used_without_overwrite(tmp_path, tiny_dir):
    (tmp_path / "out").mkdir()
    s = quantize_checkpoint(tiny_dir, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file() and len(s.quantized) == 14


def test_an_existing_output_file_needs_overwrite(tmp_path):
    mixed_file(tmp_path / "in.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"
    quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", overwrite=True, progress=False)
    assert "proj.weight.absmax" in load_file(tmp_path / "out.safetensors")


def test_refusals_name_the_argument(tmp_path, tiny_dir):
    mixed_file(tmp_path / "in.safetensors")
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without model.safetensors"):
        quantize_checkpoint(tmp_path / "nomodel", tmp_path / "o")
    with pytest.raises(ValueError, match="is IN; pass another path"):
        quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "in.safetensors", overwrite=True)
    with pytest.raises(ValueError, match="is inside IN"):
        quantize_checkpoint(tiny_dir, tiny_dir / "sub")
    with pytest.raises(ValueError, match=r"--blocksize must be one of 32, 64, .*got 100"):
        quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", blocksize=100)
    with pytest.raises(ValueError, match=r"no weight in .* was selected"):
        quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", pattern="nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "nomodel"]


def test_cli_passes_blocksize_double_quant_and_pattern_and_reports_them(tmp_path, capsys):
    tensors = mixed_file(tmp_path / "in.safetensors")
    argv = ["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors"), "--pattern", "weight",
            "--blocksize", "128", "--no-double-quant", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = load_file(tmp_path / "o.safetensors")
    for name in ("emb.weight", "head.weight", "proj.weight"):
        assert_quantized_as_nf4(out, name, tensors[name], 128, False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quantized 3 weights: the 2-D weights whose names match 'weight'")
    assert "3 tensors copied unchanged" in lines
    assert any("(NF4, blocksize 128, double quantization off)" in line for line in lines)
    assert lines[-1] == f"written to {tmp_path / 'o.safetensors'} in bitsandbytes' serialized form"


def test_outputs_in_new_nested_folders_carry_safetensors_pt_metadata(tmp_path, tiny_dir):
    from safetensors import safe_open

    mixed_file(tmp_path / "in.safetensors")
    file_out, dir_out = tmp_path / "a" / "b" / "o.safetensors", tmp_path / "c" / "d"
    quantize_checkpoint(tmp_path / "in.safetensors", file_out, progress=False)
    quantize_checkpoint(tiny_dir, dir_out, pattern="v_proj", progress=False)
    for path in (file_out, dir_out / "model.safetensors"):
        with safe_open(str(path), framework="pt") as f:  # transformers refuses files without format "pt"
            assert f.metadata() == {"format": "pt"}


def test_overwriting_a_directory_output_replaces_its_subfolders(tmp_path, tiny_dir):
    src = tmp_path / "src"
    src.mkdir()
    for item in tiny_dir.iterdir():
        (src / item.name).write_bytes(item.read_bytes())
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("first")
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    (src / "1_Pooling" / "config.json").write_text("second")
    s = quantize_checkpoint(src, tmp_path / "out", overwrite=True, progress=False)
    assert "1_Pooling/" in s.copied and (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == "second"


def test_a_one_element_2d_weight_is_a_weight(tmp_path):
    save_file({"w": torch.full((1, 1), 3.0), "v": torch.zeros(0, 4)}, tmp_path / "in.safetensors")
    s = quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", progress=False)
    assert s.quantized == ["w"] and s.kept == ["v"] and s.kept_weights == []


@pytest.mark.parametrize("why", ["not-installed", "unknown-architecture"])
def test_selection_falls_back_to_every_2d_weight_when_the_config_cannot_be_read(tmp_path, monkeypatch, why):
    import sys

    mixed_file(tmp_path / "in.safetensors")
    if why == "not-installed":
        (tmp_path / "config.json").write_text('{"model_type": "llama"}')
        monkeypatch.setitem(sys.modules, "transformers", None)
        says = f"transformers, needed to read {tmp_path / 'config.json'}, is not installed"
    else:
        (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
        says = f"transformers cannot build the model in {tmp_path / 'config.json'} (ValueError)"
    s = quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", progress=False)
    assert s.selection == f"every 2-D floating point weight, embeddings included: {says}"
    assert s.quantized == ["emb.weight", "head.weight", "proj.weight"]


def test_progress_bar_counts_every_tensor(tmp_path, capsys):
    mixed_file(tmp_path / "in.safetensors")
    quantize_checkpoint(tmp_path / "in.safetensors", tmp_path / "o.safetensors", progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("nf4 quantize [" + "#" * 30 + "] 6/6 ")
