"""`nf4 quantize IN OUT`: a safetensors checkpoint's weights into bitsandbytes' serialized NF4 pieces
(`<name>`, `<name>.absmax`, ..., `<name>.quant_state.bitsandbytes__nf4`); other tensors copied as they are.

Which weights: those matching `pattern` (a regex, searched); else, with a config.json transformers
understands (in IN or beside it), its nn.Linear weights but the head, as transformers' 4-bit loading
picks; else every 2-D float weight. `Summary.selection` says which rule applied.

A directory OUT gets IN's other files (config, tokenizer, subfolders; not hidden folders or other weight
files), and config.json the `quantization_config` that loads it in 4 bits. Files are read with
safetensors only. Bad input is refused before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nf4 import BLOCKSIZES
from nf4.api import quantize
from nf4.progress import Progress

WEIGHTS = "model.safetensors"
# Top-level files of a model directory that hold its weights in some format: replaced by OUT's
# model.safetensors, so not copied (a full-precision copy would defeat the quantization).
_WEIGHT_FILES = re.compile(
    r"(.*\.safetensors|pytorch_model.*\.bin|tf_model.*\.h5|flax_model.*\.msgpack)(\.index\.json)?"
)


@dataclass
class Summary:
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    kept_weights: list[str] = field(default_factory=list)  # the 2-D float tensors among `kept`
    bytes_before: int = 0  # of the quantized tensors, as stored in IN
    bytes_after: int = 0  # of their NF4 pieces
    output: Path | None = None
    selection: str = ""  # which weights were quantized, and why
    copied: list[str] = field(default_factory=list)  # other files and folders of a directory IN
    left_out: list[str] = field(default_factory=list)  # its other weight files and hidden folders


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _linear_weights(config_dir: Path) -> tuple[set[str] | None, str]:
    """(weights transformers' 4-bit loading would quantize, how found), or (None, why not)."""
    config_path = config_dir / "config.json"
    if not config_path.is_file():
        return None, f"no config.json in {config_dir} to tell nn.Linear layers from embeddings"
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        return None, f"transformers, needed to read {config_path}, is not installed"
    try:
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - an architecture transformers does not know: fall back
        return None, f"transformers cannot build the model in {config_path} ({type(e).__name__})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    # checkpoints of a task model may prefix the base model's names (e.g. "bert.")
    prefix = getattr(model, "base_model_prefix", "")
    how = (
        f"the nn.Linear weights of the {type(model).__name__} in {config_path}, except the output head "
        "(what transformers' 4-bit loading quantizes)"
    )
    return (names | {f"{prefix}.{n}" for n in names} if prefix else names), how


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse IN/OUT combinations that cannot work, before anything is read or written."""
    if not src.exists():
        raise FileNotFoundError(f"IN {src} does not exist; pass a .safetensors file or a model directory")
    if src.is_dir() and not (src / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"IN {src} is a directory without {WEIGHTS}; pass a model saved with safetensors in one file "
            "(sharded checkpoints are not supported), or the .safetensors file itself"
        )
    if dst.resolve() == src.resolve():
        raise ValueError(f"OUT {dst} is IN; pass another path: the input is read while the output is written")
    if src.is_dir():
        if dst.resolve().is_relative_to(src.resolve()):
            raise ValueError(f"OUT {dst} is inside IN {src}; pass a directory outside it")
        if dst.exists() and not dst.is_dir():
            raise ValueError(
                f"OUT {dst} is a file, but a model directory IN is written to a directory; pass a directory path"
            )
    elif dst.is_dir():
        raise ValueError(
            f"OUT {dst} is a directory, but a .safetensors file IN is written to a file; "
            f"pass a file path such as {dst / src.name}"
        )
    if dst.exists() and not overwrite and not (dst.is_dir() and not any(dst.iterdir())):
        raise ValueError(f"OUT {dst} already exists; pass --overwrite to replace it, or choose another path")


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    pattern: str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool | None = None,
    overwrite: bool = False,
) -> Summary:
    """Quantize `src` (a .safetensors file, or a directory with model.safetensors) into `dst` (of the same
    kind); returns the `Summary`. `pattern`: module docstring; `blocksize`, `double_quant`: as
    `nf4.quantize`. ValueError for an existing `dst` (unless `overwrite`), a wrong kind, a bad pattern,
    blocksize or file; FileNotFoundError for a missing `src`."""
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise ValueError(
            f"--pattern {pattern!r} is not a regular expression ({e}); "
            r"escape literal characters, e.g. --pattern 'q_proj|v_proj' or 'layers\.0\.'"
        ) from None
    directory = src if src.is_dir() else None
    file = src / WEIGHTS if directory else src
    if regex:
        linear, selection = None, f"the 2-D weights whose names match {pattern!r} (--pattern)"
    else:
        linear, how = _linear_weights(file.parent)
        selection = how if linear is not None else f"every 2-D floating point weight, embeddings included: {how}"
    summary = Summary(selection=selection)
    out: dict[str, torch.Tensor] = {}
    with _open(file) as f:
        names = list(f.keys())
        bar = Progress(len(names), "nf4 quantize", progress)
        for name in names:
            tensor = f.get_tensor(name)
            weight = tensor.dim() == 2 and tensor.is_floating_point() and tensor.numel() > 0
            if regex:
                selected = weight and regex.search(name) is not None
            else:
                selected = weight and (linear is None or name in linear)
            if selected:
                q = quantize(tensor.float() if tensor.dtype == torch.float64 else tensor, blocksize, double_quant)
                out.update(q.to_bnb_state_dict(name))
                summary.quantized.append(name)
                summary.bytes_before += tensor.numel() * tensor.element_size()
                summary.bytes_after += q.nbytes
            else:
                out[name] = tensor
                summary.kept.append(name)
                if weight:
                    summary.kept_weights.append(name)
            bar.step(name)
    if not summary.quantized:
        raise ValueError(
            f"no weight in {file} was selected ({summary.selection}); pass --pattern REGEX to choose the weights"
        )

    from safetensors.torch import save_file

    if directory is None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(dst), metadata={"format": "pt"})
        summary.output = dst
        return summary
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(directory.iterdir()):
        if item.name == WEIGHTS:
            continue  # written below, quantized
        if (item.is_dir() and item.name.startswith(".")) or (item.is_file() and _WEIGHT_FILES.fullmatch(item.name)):
            summary.left_out.append(item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
            summary.copied.append(item.name + "/")
        else:
            shutil.copy2(item, dst / item.name)
            summary.copied.append(item.name)
    save_file(out, str(dst / WEIGHTS), metadata={"format": "pt"})
    config_path = dst / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["quantization_config"] = _transformers_config(blocksize, double_quant)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    summary.output = dst
    return summary


def _transformers_config(blocksize: int, double_quant: bool) -> dict:
    """What transformers reads to load bitsandbytes 4-bit weights (blocksize: in each quant state)."""
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
