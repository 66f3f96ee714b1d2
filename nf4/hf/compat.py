"""The one place where `import nf4.hf` changes PEFT's and transformers' own code, so that their stock calls
work on nf4 models exactly as on bitsandbytes models. PEFT and transformers recognize a 4-bit layer by
bitsandbytes' classes (`Linear4bit`, `Params4bit`), which nf4 neither subclasses nor imports; each wrapper
below adds nf4's layer next to them and leaves every model without nf4 layers to the original code.

- `peft.tuners.lora.LoraModel._prepare_model` (PEFT's hook "modify the model before the adapter is
  applied", run by every LoRA injection: `get_peft_model`, `PeftModel.from_pretrained`,
  `AutoPeftModelFor*.from_pretrained`, `PeftModel.load_adapter`, transformers' `model.load_adapter`, TRL's
  `peft_config=`): on a model holding `nf4.lora.LinearNF4` layers it registers `PeftLinearNF4` for them
  through PEFT's custom-layer API (`LoraConfig._register_custom_module`), and resolves
  `target_modules="all-linear"` with nf4's layers counted as linear layers (PEFT's rule otherwise: every
  nn.Linear / Conv1D but the output head).
- `transformers.PreTrainedModel.num_parameters` and `peft.PeftModel.get_nb_trainable_parameters`: on a
  model holding nf4 layers, each layer's packed 4-bit `weight` counts twice its bytes (two weights per
  byte, as both count bitsandbytes' `Params4bit`) and its quantization constants (`weight_absmax`) count
  nothing (bitsandbytes keeps them outside the parameters). Without this, transformers imports
  bitsandbytes for any model with `is_loaded_in_4bit` (which nf4 models set, so that PEFT and TRL treat
  them as k-bit models) and the counts miss half of each weight.

`get_memory_footprint` is left alone: it sums the bytes of parameters and buffers, and nf4's count is the
true one, bitsandbytes' plus the quantization constants bitsandbytes keeps outside them.

Written against peft 0.22 and transformers 5.25 (tests/test_hf_peft.py checks each wrapper there); each
original is looked up by name at install time, and a missing one fails `import nf4.hf` with the name.
"""

from __future__ import annotations

import functools

from torch import nn

from nf4.lora.modules import LinearNF4

_MARK = "_nf4_wrapped"


def has_nf4_layers(model: nn.Module) -> bool:
    return any(isinstance(m, LinearNF4) for m in model.modules())


def _multipliers(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many model parameters one element is, for the nf4 layers' stored pieces."""
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
    """transformers' count, with nf4's layers counted like bitsandbytes' (see the module docstring)."""
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
    """PEFT's (trainable, all) count, with nf4's layers counted like bitsandbytes' (see the module docstring)."""
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
    """The nf4 layers `target_modules="all-linear"` adds: all but the output head and those already inside a
    PEFT layer (PEFT's own exclusions for nn.Linear)."""
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
    """Wrap the three methods (idempotent: a second call changes nothing)."""
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
