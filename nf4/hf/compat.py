"""The one place where `import nf4.hf` changes PEFT's and transformers' code, so their stock calls work on
nf4 models as on bitsandbytes models. They recognize 4-bit layers by bitsandbytes' classes, which nf4
neither subclasses nor imports; each wrapper adds nf4's layer and leaves models without one alone.

- `LoraModel._prepare_model` (run by every LoRA injection: `get_peft_model`, `PeftModel.from_pretrained`,
  `load_adapter`, TRL's `peft_config=`): registers `PeftLinearNF4` for `LinearNF4` through PEFT's
  custom-layer API, and counts nf4's layers as linear for `target_modules="all-linear"`.
- `PreTrainedModel.num_parameters`, `PeftModel.get_nb_trainable_parameters`: a packed `weight` counts two
  per byte, as bitsandbytes' `Params4bit`, and `weight_absmax` none. Otherwise transformers imports
  bitsandbytes for `is_loaded_in_4bit` models (nf4 sets it for PEFT and TRL) and counts half.

`get_memory_footprint` stays: nf4's byte count is already true. Written against peft 0.22 and
transformers 5.25 (tests/test_hf_peft.py); a missing original fails `import nf4.hf` naming it.
"""

from __future__ import annotations

import functools

from torch import nn

from nf4.lora.modules import LinearNF4

_MARK = "_nf4_wrapped"


def has_nf4_layers(model: nn.Module) -> bool:
    return any(isinstance(m, LinearNF4) for m in model.modules())


def _multipliers(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> weights per element, for nf4 layers' pieces."""
    out = {}
    for m in model.modules():
        if isinstance(m, LinearNF4):
            out[id(m.weight)] = 2  # packed codes: two 4-bit weights per byte, as bitsandbytes' Params4bit
            out[id(m.weight_absmax)] = 0  # quantization constants, not weights
    return out


def _count(param: nn.Parameter, multipliers: dict[int, int]) -> int:
    factor = multipliers.get(id(param))
    if factor is not None:
        return param.numel() * factor
    if type(param).__name__ == "Params4bit":  # a bitsandbytes layer left in the model: counted as they do
        return param.numel() * 2 * param.element_size()
    return param.numel()


def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' count, nf4's layers counted like bitsandbytes'."""
    embeddings = set()
    if exclude_embeddings:
        embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    multipliers = _multipliers(self)
    return sum(
        _count(p, multipliers)
        for n, p in self.named_parameters()
        if n not in embeddings and (p.requires_grad or not only_trainable)
    )


def get_nb_trainable_parameters(self) -> tuple[int, int]:
    """PEFT's (trainable, all) count, nf4's layers counted like bitsandbytes'."""
    multipliers = _multipliers(self)
    trainable = total = 0
    for _, param in self.named_parameters():
        n = _count(param, multipliers)
        if n == 0 and id(param) not in multipliers and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3, as PEFT
            n = param.ds_numel
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def all_linear_names(model: nn.Module) -> set[str]:
    """nf4 layers for "all-linear": all but the head and those inside a PEFT layer (PEFT's exclusions)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {
        f"{prefix}.{suffix}"
        for prefix, m in model.named_modules()
        if isinstance(m, BaseTunerLayer)
        for suffix, _ in m.named_modules()
        if suffix
    }
    return {n for n, m in model.named_modules() if isinstance(m, LinearNF4) and m is not head and n not in inside}


def _prepare_model(original, self, peft_config, model):
    original(self, peft_config, model)
    if not has_nf4_layers(model):
        return
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from nf4.hf.peft import PeftLinearNF4

    peft_config._register_custom_module({LinearNF4: PeftLinearNF4})
    targets = peft_config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        nf4_names = all_linear_names(model)
        _maybe_include_all_linear_layers(peft_config, model)  # PEFT's names: nn.Linear, Conv1D, adapter layers
        peft_config.target_modules = set(peft_config.target_modules) | nf4_names


def _wrap_counter(nf4_count):
    def wrap(original):
        @functools.wraps(original)
        def counter(self, *args, **kwargs):
            if has_nf4_layers(self):
                return nf4_count(self, *args, **kwargs)
            return original(self, *args, **kwargs)

        return counter

    return wrap


def _wrap_prepare(original):
    @functools.wraps(original)
    def prepare(self, peft_config, model):
        return _prepare_model(original, self, peft_config, model)

    return prepare


def install() -> None:
    """Wrap the three methods (idempotent)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
    from transformers import PreTrainedModel

    for owner, name, wrap in (
        (LoraModel, "_prepare_model", _wrap_prepare),
        (PreTrainedModel, "num_parameters", _wrap_counter(num_parameters)),
        (PeftModel, "get_nb_trainable_parameters", _wrap_counter(get_nb_trainable_parameters)),
    ):
        original = getattr(owner, name, None)
        if not callable(original):
            raise ImportError(
                f"nf4.hf wraps {owner.__module__}.{owner.__name__}.{name}, which this version does not define; "
                "install the peft and transformers versions the hf extra names (pip install 'nf4[hf]')"
            )
        if getattr(original, _MARK, False):
            continue
        wrapped = wrap(original)
        setattr(wrapped, _MARK, True)
        setattr(owner, name, wrapped)
