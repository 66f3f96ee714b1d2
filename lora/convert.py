"""Model conversion, in place: nn.Linear is quantized; bitsandbytes' NF4 `Linear4bit` keeps its bytes;
a PEFT LoRA layer gets a `LinearNF4` base and becomes nf4's PEFT layer with the same adapters. That layer
lives in `nf4.hf`, which registers its converter here on import: `import nf4.hf` first.

`target_modules` matches names equal to an entry or ending in "." + entry (PEFT's rule). None means every
nn.Linear, or in a bitsandbytes or PEFT model its 4-bit and PEFT layers (the head stays 16-bit). In a PEFT
model adapters come from PEFT only: its nn.Linear layers never convert.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

from nf4.api import quantize
from nf4.lora.modules import LinearNF4, LoRALinearNF4
from nf4.progress import Progress
from nf4.tensor import NF4Tensor


def _matches(name: str, targets: Iterable[str] | None) -> bool:
    if targets is None:
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


_peft_converter: Callable[[nn.Module, LinearNF4], nn.Module] | None = None


def register_peft_converter(convert: Callable[[nn.Module, LinearNF4], nn.Module]) -> None:
    """Install `convert(peft_layer, base) -> replacement` (`nf4.hf` calls it)."""
    global _peft_converter
    _peft_converter = convert


def _is_bnb_4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (bitsandbytes never imported here)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_peft_lora(module: nn.Module) -> bool:
    """PEFT's LoRA layer, duck-typed."""
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "base_layer", None), nn.Module
    )


def _convertible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear or _is_bnb_4bit(module) or (_is_peft_lora(module) and _convertible(module.base_layer))
    )


def bnb_weight(module: nn.Module, name: str = "") -> NF4Tensor:
    """A Linear4bit's NF4 weight, its own tensors (quantized first if still 16-bit); ValueError for FP4."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        quant_type = getattr(weight, "quant_type", "fp4")
        if quant_type != "nf4":
            raise ValueError(f"{name or 'layer'}: bitsandbytes' Linear4bit with quant_type={quant_type!r}; nf4 "
                             "converts only NF4 layers (quant_type='nf4')")  # fmt: skip
        blocksize = getattr(weight, "blocksize", 64)
        return quantize(weight.data, blocksize, bool(getattr(weight, "compress_statistics", True)))
    # bitsandbytes' own serialized form: the same tensors (its state_dict also undoes the repacking its CPU
    # inference kernel applies in place on a first no-grad call)
    pieces = {k: v for k, v in module.state_dict().items() if k == "weight" or k.startswith("weight.")}
    try:
        return NF4Tensor.from_bnb_state_dict(pieces, "weight")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name or 'layer'}: {e}") from None


def from_bnb(module: nn.Module, name: str = "", cls: type[LinearNF4] = LinearNF4, **kwargs) -> LinearNF4:
    """A Linear4bit as a `cls(**kwargs)` on the same tensors."""
    q = bnb_weight(module, name)
    out_features, in_features = q.shape
    layer = cls(in_features, out_features, bias=module.bias is not None, blocksize=q.blocksize,
                double_quant=q.double_quant, dtype=q.dtype, device=q.device, **kwargs)  # fmt: skip
    layer.set_weight(q)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    layer.train(module.training)
    return layer


def _nf4(module: nn.Module, name: str, cls: type[LinearNF4], blocksize: int, double_quant: bool, **kwargs):
    """`module` as a `cls`; on meta, an empty one that quantizes the weight `load_state_dict` brings."""
    if module.weight.device.type == "meta" and getattr(module.weight, "quant_state", None) is None:
        if not _is_bnb_4bit(module):
            dtype = module.weight.dtype
        else:  # not quantized yet: bitsandbytes' settings, the 16-bit dtype it holds
            blocksize = getattr(module.weight, "blocksize", None) or 64
            double_quant = bool(getattr(module.weight, "compress_statistics", True))
            dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.get_default_dtype()
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, dtype=dtype, device="meta", **kwargs)  # fmt: skip
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        layer.train(module.training)
        return layer
    if type(module) is nn.Linear:
        layer = cls.from_linear(module, blocksize=blocksize, double_quant=double_quant, **kwargs)
        return layer.train(module.training)  # an eval model stays in eval: no LoRA dropout
    return from_bnb(module, name, cls, **kwargs)


def _refuse_sharded(model: nn.Module, label: str) -> None:
    """Refuse fully_shard-then-convert: DTensor shards cannot be quantized in place, FSDP2 misses new layers."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            f"{label}: the model is already sharded with FSDP2's fully_shard (DTensor parameters, e.g. "
            f"{sharded[:1]}); convert first, then shard: {label}(model, ...), then "
            "nf4.lora.distributed.shard_model(model, mesh=...) (or fully_shard each layer, then the model)"
        )


def _params(x) -> list[nn.Parameter]:
    return list(x.parameters()) if isinstance(x, nn.Module) else [x]


def _targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    inside_peft = {
        f"{name}.{child}"
        for name, module in model.named_modules()
        if _is_peft_lora(module)
        for child, _ in module.named_modules()
        if child
    }  # a PEFT layer's base and adapters convert with the PEFT layer, never on their own
    candidates = [(n, m) for n, m in model.named_modules() if n not in inside_peft and _convertible(m)]
    if candidates and candidates[0][0] == "":
        raise ValueError(
            f"the model itself is a {type(model).__name__}, which cannot be replaced in place; convert it with "
            "LinearNF4.from_linear(layer) or LoRALinearNF4.from_linear(layer), or pass the model that holds it"
        )
    if _peft_converter is None and any(_is_peft_lora(m) for _, m in candidates):
        raise RuntimeError(
            "this is a PEFT model: its LoRA layers convert to nf4's PEFT layer, which lives in nf4.hf (the hf "
            "extra); `import nf4.hf` first, then convert"
        )
    if any(_is_peft_lora(m) or _is_bnb_4bit(m) for _, m in candidates):
        # a model quantized by bitsandbytes (or adapted by PEFT): its 4-bit and PEFT layers convert, and by
        # default its 16-bit nn.Linear layers (the head) stay as they are; in a PEFT model they always do
        peft = any(_is_peft_lora(m) for _, m in candidates)
        keep = (lambda m: type(m) is not nn.Linear) if peft or target_modules is None else (lambda m: True)
        candidates = [(n, m) for n, m in candidates if keep(m)]
    found = [(n, m) for n, m in candidates if _matches(n, target_modules)]
    if not found:
        raise ValueError(
            f"no nn.Linear (or bitsandbytes Linear4bit, or PEFT LoRA layer) matches target_modules={target_modules!r}; "
            f"linear layers here: {[n for n, _ in candidates][:20]}"
        )
    return found


def _replace(model: nn.Module, target_modules, cls, label: str, progress, blocksize, double_quant, **kwargs):
    _refuse_sharded(model, label)
    targets = _targets(model, target_modules)
    adapters = {  # adapters already there (PEFT's, or a previous apply_lora's) stay as trainable as they were
        id(p)
        for m in model.modules()
        if _is_peft_lora(m) or isinstance(m, LoRALinearNF4)
        for p in (*_params(m.lora_A), *_params(m.lora_B))
    }
    for param in model.parameters():
        if id(param) not in adapters:
            param.requires_grad_(False)
    peft_model = any(_is_peft_lora(m) for _, m in targets)
    bar = Progress(len(targets), label, progress)
    for name, module in targets:
        if peft_model and not _is_peft_lora(module):  # adapters come from PEFT only
            new = _nf4(module, name, LinearNF4, blocksize, double_quant)
        elif _is_peft_lora(module):
            base = _nf4(module.base_layer, name, LinearNF4, blocksize, double_quant)
            new = _peft_converter(module, base)
        else:
            new = _nf4(module, name, cls, blocksize, double_quant, **kwargs)
        model.set_submodule(name, new)
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
    use_dora: bool = False,
) -> nn.Module:
    """Replace matching layers (module docstring) by `LoRALinearNF4` in place, freezing all but adapters;
    returns `model`. Arguments as `LoRALinearNF4` (PEFT layers keep theirs); `progress` as `nf4.progress`.
    ValueError if nothing matches or already FSDP2-sharded; RuntimeError for PEFT without `nf4.hf`."""
    lora = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora)
    return _replace(model, target_modules, LoRALinearNF4, "apply_lora", progress, blocksize, double_quant, **lora)


def quantize_model(
    model: nn.Module,
    target_modules: Iterable[str] | str | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """`apply_lora` with `LinearNF4` (no new adapters): for inference. Returns `model`."""
    return _replace(model, target_modules, LinearNF4, "quantize_model", progress, blocksize, double_quant)
