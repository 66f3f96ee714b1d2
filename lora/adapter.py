"""Adapters in PEFT's on-disk format (`adapter_model.safetensors`, `adapter_config.json`), both ways.

Files are read with safetensors or `torch.load(weights_only=True)`: nothing runs code. Everything is
checked before the model is touched: a bad file never half-loads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from nf4.lora.distributed import is_main_process
from nf4.lora.modules import LinearNF4, LoRALinearNF4

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<part>lora_magnitude_vector)(?:\.[^.]+\.weight)?$")
"""DoRA's magnitude as PEFT writes it (`<module>.lora_magnitude_vector`)."""


def lora_layers(model: nn.Module) -> dict[str, LoRALinearNF4]:
    """The model's LoRALinearNF4 layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinearNF4)}


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in PEFT's format (what `PeftModel.from_pretrained` loads); returns `directory`.

    ValueError with no LoRALinearNF4 or mixed `use_rslora`. Under FSDP2 every rank calls it. A PEFT model
    is written by its own `save_pretrained`.
    """
    if hasattr(model, "peft_config"):
        return _save_peft_model(model, directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinearNF4 layers: nothing to save (use nf4.lora.apply_lora first)")
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT stores one use_rslora flag per adapter, but these layers mix both settings")
    dora = {m.use_dora for m in layers.values()}
    if len(dora) > 1:
        raise ValueError("PEFT stores one use_dora flag per adapter, but these layers mix DoRA and plain LoRA")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    dropout = Counter(m.lora_dropout for m in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "rank_pattern": {name: m.r for name, m in layers.items() if m.r != r},
        "alpha_pattern": {name: m.lora_alpha for name, m in layers.items() if m.lora_alpha != alpha},
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": dora.pop(),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _full(m.lora_A).to("cpu").contiguous().clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _full(m.lora_B).to("cpu").contiguous().clone()
        if m.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = _full(m.lora_magnitude).to("cpu").contiguous().clone()
    directory = Path(directory)
    if not is_main_process():
        return directory  # every rank gathered the adapter above (FSDP2); rank 0 writes it
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _full(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a DTensor shard is gathered (a collective: every rank runs it)."""
    t = t.detach()
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: expected a LoRA adapter (peft_type 'LORA'), got {config.get('peft_type')!r}")
    unsupported = {
        "fan_in_fan_out": False,
        "lora_bias": False,
        "modules_to_save": None,
        "trainable_token_indices": None,
    }
    bad = [f"{k}={config[k]!r}" for k, ok in unsupported.items() if config.get(k) not in (ok, None, [], {})]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r}")
    if bad:
        raise ValueError(f"{path}: adapter options not supported here: {', '.join(bad)}")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool):
            raise ValueError(f"{path}: '{field}' must be a number, got {config.get(field)!r}")
    return config


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
    if safetensors_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{safetensors_path} is not a readable safetensors file (truncated or corrupted?): {e}"
            ) from None
    if bin_path.is_file():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure: refuse the file
            raise ValueError(f"{bin_path} could not be loaded safely (weights_only=True): {e}") from None
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def _pattern(patterns: dict, path: str, default):
    """PEFT's rank/alpha pattern lookup."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter into `model` in place; returns `model`. nn.Linear layers are quantized
    (blocksize 64, double quant). ValueError lists every mismatch; FileNotFoundError without the files."""
    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_weights(directory)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    errors = []
    dora = bool(config.get("use_dora"))
    for key, value in tensors.items():
        m = _KEY.match(key) or (_MAGNITUDE_KEY.match(key) if dora else None)
        if m is None:
            errors.append(f"{key}: not a LoRA weight key (expected {PREFIX}<module>.lora_A.weight / lora_B.weight"
                          + (" / lora_magnitude_vector)" if dora else ")"))  # fmt: skip
            continue
        pairs.setdefault(m.group("path"), {})[m.group("part")] = value
    modules = dict(model.named_modules())
    plan = []
    needed = {"lora_A", "lora_B", "lora_magnitude_vector"} if dora else {"lora_A", "lora_B"}
    for path, parts in sorted(pairs.items()):
        if set(parts) != needed:
            errors.append(f"{path}: has {sorted(parts)} but needs {' and '.join(sorted(needed))}")
            continue
        module = modules.get(path)
        if module is None:
            errors.append(f"{path}: no such module in the model")
            continue
        if not isinstance(module, (nn.Linear, LinearNF4)):
            errors.append(f"{path}: is a {type(module).__name__}, not a Linear layer")
            continue
        r = int(_pattern(config.get("rank_pattern"), path, config["r"]))
        a, b = parts["lora_A"], parts["lora_B"]
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and tuple(magnitude.shape) != (module.out_features,):
            errors.append(f"{path}: lora_magnitude_vector {list(magnitude.shape)} does not fit [{module.out_features}]")
            continue
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            errors.append(
                f"{path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit this layer "
                f"(expected {list(want_a)} / {list(want_b)} for r={r})"
            )
            continue
        plan.append(
            (path, module, r, _pattern(config.get("alpha_pattern"), path, config["lora_alpha"]), a, b, magnitude)
        )
    if errors:
        raise ValueError(f"the adapter in {directory} does not fit this model:\n  " + "\n  ".join(errors))
    if not plan:
        raise ValueError(f"the adapter in {directory} holds no LoRA weights")

    for path, module, r, alpha, a, b, magnitude in plan:
        layer = _with_adapter(
            module, r, alpha, float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora")), dora
        )
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if dora:
                layer.lora_magnitude.copy_(magnitude)
                layer._fresh_magnitude = False
        if layer is not module:
            model.set_submodule(path, layer)
    return model


def _with_adapter(module: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, dora: bool = False
                  ) -> LoRALinearNF4:  # fmt: skip
    """`module` as a LoRALinearNF4 with a rank-r adapter (DoRA's magnitude with `dora`)."""
    if type(module) is nn.Linear:
        return LoRALinearNF4.from_linear(module, r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                                         use_dora=dora)  # fmt: skip
    q = module.nf4_weight
    layer = LoRALinearNF4(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        use_dora=dora,
        blocksize=q.blocksize,
        double_quant=q.double_quant,
        dtype=q.dtype,
        device=q.device,
        adapter_dtype=getattr(module, "lora_A", torch.empty(0)).dtype,
    )
    layer.set_weight(q)
    if module.bias is not None:
        layer.bias = module.bias
    layer.train(module.training)
    return layer


def adapter_state_dict(model: nn.Module) -> dict:
    """A PEFT model's adapter parameters, whole, on the CPU. Every rank calls it (collectives)."""
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name or param.requires_grad:
            t = param.detach()
            full = getattr(t, "full_tensor", None)
            state[name] = (full() if full is not None else t).cpu()
    return state


def _save_peft_model(model: nn.Module, directory: str | Path) -> Path:
    """PEFT's `save_pretrained` on every rank: under FSDP2 it gathers, so rank 0 alone would hang."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"{type(model).__name__} has a peft_config but no save_pretrained: not a PEFT model")
    model.save_pretrained(str(directory), state_dict=adapter_state_dict(model), is_main_process=is_main_process())
    return Path(directory)
