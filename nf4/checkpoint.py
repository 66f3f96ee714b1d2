"""`nf4 quantize IN OUT`: quantize a safetensors checkpoint's weights into bitsandbytes' NF4 form.

Every selected weight `<name>` (2-D, floating point) is replaced by bitsandbytes' serialized pieces
(`<name>`, `<name>.absmax`, `<name>.quant_map`, `<name>.nested_absmax`, `<name>.nested_quant_map`,
`<name>.quant_state.bitsandbytes__nf4`); other tensors are copied unchanged.

Which weights: those whose names match `pattern` (a regular expression, searched) when given; else,
for a model directory with a config.json that transformers understands, the weights of its nn.Linear
layers except the output head (what transformers' 4-bit loading quantizes); else every 2-D floating
point weight. For a directory, OUT is a directory too: the other files (config, tokenizer) are copied
and config.json gets the `quantization_config` transformers needs to load the result in 4 bits.

Files are read with safetensors only; a truncated or corrupted file is refused with a clear error.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nf4.api import quantize
from nf4.progress import Progress

WEIGHTS = "model.safetensors"


@dataclass
class Summary:
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0  # of the quantized tensors, as stored in IN
    bytes_after: int = 0  # of their NF4 pieces
    output: Path | None = None
    selection: str = ""


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _linear_weights(directory: Path) -> set[str] | None:
    """Names of the weights transformers' 4-bit loading would quantize, or None if unknown here."""
    if not (directory / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        return None
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture transformers does not know: fall back
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    # checkpoints of a task model may prefix the base model's names (e.g. "bert.")
    prefix = getattr(model, "base_model_prefix", "")
    return names | {f"{prefix}.{n}" for n in names} if prefix else names


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    pattern: str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool | None = None,
) -> Summary:
    """Quantize the checkpoint at `src` (a .safetensors file, or a directory holding model.safetensors)
    into `dst` (a file, or a directory for a directory); see the module docstring."""
    src, dst = Path(src), Path(dst)
    directory = src if src.is_dir() else None
    file = src / WEIGHTS if directory else src
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    if dst.resolve() == src.resolve():
        raise ValueError("OUT must differ from IN: the input is read while the output is written")
    regex = re.compile(pattern) if pattern else None
    linear = None if regex or directory is None else _linear_weights(directory)
    summary = Summary(
        selection=f"names matching {pattern!r}" if regex else "nn.Linear weights" if linear else "2-D weights"
    )
    out: dict[str, torch.Tensor] = {}
    with _open(file) as f:
        names = list(f.keys())
        bar = Progress(len(names), "nf4 quantize", progress)
        for name in names:
            tensor = f.get_tensor(name)
            selected = tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() > 0
            if regex:
                selected = selected and regex.search(name) is not None
            elif linear is not None:
                selected = selected and name in linear
            if selected:
                weight = tensor.float() if tensor.dtype == torch.float64 else tensor
                q = quantize(weight, blocksize, double_quant)
                out.update(q.to_bnb_state_dict(name))
                summary.quantized.append(name)
                summary.bytes_before += tensor.numel() * tensor.element_size()
                summary.bytes_after += q.nbytes
            else:
                out[name] = tensor
                summary.kept.append(name)
            bar.step(name)
    if not summary.quantized:
        raise ValueError(f"no weight in {file} was selected ({summary.selection}); nothing to quantize")

    from safetensors.torch import save_file

    if directory is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(dst), metadata={"format": "pt"})
        summary.output = dst
        return summary
    dst.mkdir(parents=True, exist_ok=True)
    for item in directory.iterdir():
        if item.is_file() and item.name != WEIGHTS and not item.name.endswith(".safetensors"):
            shutil.copy2(item, dst / item.name)
    save_file(out, str(dst / WEIGHTS), metadata={"format": "pt"})
    config_path = dst / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["quantization_config"] = _transformers_config(blocksize, double_quant)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    summary.output = dst
    return summary


def _transformers_config(blocksize: int, double_quant: bool) -> dict:
    """What transformers reads to load bitsandbytes 4-bit weights (each weight's quant state carries
    its own blocksize)."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
    }
