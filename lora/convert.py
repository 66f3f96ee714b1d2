"""Model conversion: replace nn.Linear modules by NF4 layers, in place.

`target_modules` selects layers by qualified name: None means every nn.Linear; otherwise a layer matches
when its name equals an entry or ends with "." + entry (PEFT's suffix rule: "query" matches
"encoder.layer.0.attention.self.query").
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from nf4.lora.modules import LinearNF4, LoRALinearNF4
from nf4.progress import Progress


def _matches(name: str, targets: Iterable[str] | None) -> bool:
    if targets is None:
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (a dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and _matches(name, target_modules)
    ]
    if not found:
        raise ValueError(
            f"no nn.Linear matches target_modules={target_modules!r}; "
            f"linear layers here: {[n for n, m in model.named_modules() if type(m) is nn.Linear][:20]}"
        )
    return found


def _replace(model: nn.Module, target_modules, make, label: str, progress: bool | None) -> nn.Module:
    targets = _targets(model, target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    bar = Progress(len(targets), label, progress)
    for name, linear in targets:
        replace_module(model, name, make(linear))
        bar.step(name)
    return model


def apply_lora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] | str | None = None,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Replace the matching nn.Linear layers of `model` by `LoRALinearNF4`, in place, and freeze
    every other parameter: afterwards only `lora_A` / `lora_B` require grad. Returns `model`."""
    return _replace(
        model,
        target_modules,
        lambda linear: LoRALinearNF4.from_linear(
            linear,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            blocksize=blocksize,
            double_quant=double_quant,
        ),
        "apply_lora",
        progress,
    )


def quantize_model(
    model: nn.Module,
    target_modules: Iterable[str] | str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Replace the matching nn.Linear layers of `model` by `LinearNF4` (inference), in place; every
    parameter is frozen. Returns `model`."""
    return _replace(
        model,
        target_modules,
        lambda linear: LinearNF4.from_linear(linear, blocksize=blocksize, double_quant=double_quant),
        "quantize_model",
        progress,
    )
