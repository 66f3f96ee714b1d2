"""transformers' quantizer for nf4: `from_pretrained(..., quantization_config=NF4Config())`.

A load (transformers 5): the model is built on meta; its nn.Linear layers (not the head, tied or
keep-in-fp32 modules, as bitsandbytes skips) become `LinearNF4` on meta; then tensor by tensor:
- 16-bit checkpoint: `NF4Quantize` quantizes each weight where it was loaded (bitsandbytes' bytes) and
  drops the 16-bit tensor: the 16-bit model never exists in memory;
- bitsandbytes' serialized NF4: each weight's pieces are collected by name and `NF4Deserialize` checks
  and stores them, nothing requantized.
Bad layers (FP4, another blocksize, a corrupt quant state, a missing layer) raise one ValueError at the
end naming each: transformers would only log them and leave the layer on meta.

`save_pretrained` writes bitsandbytes' serialized form and its 4-bit `quantization_config`, so stock
transformers + bitsandbytes loads it; `nf4.hf.from_pretrained` reads such checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from nf4.api import quantize
from nf4.format import check_blocksize
from nf4.lora.modules import LinearNF4
from nf4.tensor import NF4Tensor

QUANT_METHOD = "nf4"
_FP4_KEY = "weight.quant_state.bitsandbytes__fp4"
SERIALIZED_NAMES = (
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    _FP4_KEY,  # collected too, so that an FP4 checkpoint is refused by name instead of half-loaded
    "weight",  # last: transformers before 5.2x matched the patterns in order
)
"""bitsandbytes' keys of one 4-bit weight, relative to its module."""


class NF4Config(QuantizationConfigMixin):
    """How `from_pretrained` quantizes a model to NF4 (`quant_method="nf4"`).

    Args:
        blocksize: one of `nf4.BLOCKSIZES` (64, as published checkpoints). A pre-quantized checkpoint must
            match; None accepts any.
        double_quant: 8-bit absmax too (4.127 instead of 4.5 bits per parameter).
        modules_to_not_convert: names or patterns kept in 16 bits, besides keep-in-fp32 modules. None: what
            bitsandbytes skips (head, tied weights); a list replaces that: name "lm_head" to keep it.
    """

    def __init__(
        self,
        blocksize: int | None = 64,
        double_quant: bool = True,
        modules_to_not_convert: list[str] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.blocksize = None if blocksize is None else check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        self.double_quant = double_quant
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise TypeError(f"NF4Config got unexpected arguments {unknown}; it takes blocksize, double_quant, "
                            "modules_to_not_convert")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "modules_to_not_convert": self.modules_to_not_convert,
        }

    def bitsandbytes_dict(self, compute_dtype: torch.dtype, skipped: list[str] | None) -> dict[str, Any]:
        """bitsandbytes' 4-bit `quantization_config` for the same weights (what `save_pretrained` writes)."""
        return {
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skipped,
        }

    @classmethod
    def from_bitsandbytes(cls, config: dict, blocksize: int | None = None) -> NF4Config:
        """The NF4Config reading a checkpoint of bitsandbytes' `quantization_config` dict; ValueError for
        FP4 or 8-bit."""
        bnb = config.get("quant_method") == "bitsandbytes" or config.get("load_in_4bit") or config.get("load_in_8bit")
        if not bnb:
            raise ValueError(f"not a bitsandbytes quantization_config: {config}")
        if config.get("load_in_8bit") or not config.get("load_in_4bit", False):
            raise ValueError(
                "this checkpoint is quantized to 8 bits (LLM.int8) with bitsandbytes; nf4 reads only its 4-bit NF4 "
                "checkpoints. Load the original 16-bit weights with NF4Config instead."
            )
        quant_type = config.get("bnb_4bit_quant_type", "fp4")
        if quant_type != "nf4":
            raise ValueError(
                f"this checkpoint is quantized to bitsandbytes' 4-bit {quant_type!r} (bnb_4bit_quant_type); nf4 "
                "reads only 'nf4'. Load the original 16-bit weights with NF4Config instead."
            )
        return cls(
            blocksize=blocksize,
            double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
            modules_to_not_convert=config.get("llm_int8_skip_modules"),
        )


class NF4HfQuantizer(HfQuantizer):
    """transformers' hooks for `NF4Config`."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names = {"weight": list(SERIALIZED_NAMES)}

    def __init__(self, quantization_config: NF4Config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.errors: dict[str, str] = {}  # layer -> what went wrong, raised after the load
        self.loaded: set[str] = set()

    # -- before loading ------------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("nf4 layers cannot be offloaded to disk; pass a device_map with GPUs and/or 'cpu'")

    def update_device_map(self, device_map):
        """As bitsandbytes: no device_map loads onto the current CUDA device, else the CPU."""
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        return name == "weight" and isinstance(model.get_submodule(module_name), LinearNF4)

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        from transformers.pytorch_utils import Conv1D

        blocksize = config.blocksize or 64
        converted = []
        for name, module in list(model.named_modules()):
            if not name or not should_convert_module(name, self.modules_to_not_convert):
                continue
            if type(module) is nn.Linear:
                in_features, out_features = module.in_features, module.out_features
            elif isinstance(module, Conv1D):  # GPT-2's Linear, weight stored [in, out]
                in_features, out_features = module.weight.shape
            else:
                continue
            layer = LinearNF4(
                in_features,
                out_features,
                bias=module.bias is not None,
                blocksize=blocksize,
                double_quant=config.double_quant,
                dtype=module.weight.dtype,
                device="meta",
            )
            layer.transposed_checkpoint = isinstance(module, Conv1D)
            layer.requires_grad_(False)
            model.set_submodule(name, layer)
            converted.append(name)
        if not converted:
            raise ValueError(
                f"NF4Config converted no layer of this {type(model).__name__}: it has no nn.Linear outside "
                f"modules_to_not_convert={self.modules_to_not_convert}; check modules_to_not_convert"
            )
        self.converted = converted

    # -- while loading -------------------------------------------------------------------------
    def get_quantize_ops(self):
        return NF4Quantize(self)

    def get_weight_conversions(self):
        """Pre-quantized: each weight's pieces into one `NF4Deserialize` (explicit: transformers before 5.2x
        ignores `serialized_names`)."""
        from transformers.core_model_loading import WeightConverter

        if not self.pre_quantized:
            return []
        return [WeightConverter(list(SERIALIZED_NAMES), "weight", [NF4Deserialize(self)])]

    def _store(self, model, weight_key: str, build, missing_keys) -> None:
        """Store `build(module)` in the LinearNF4 owning `weight_key`, or record why not."""
        module_name = weight_key.rpartition(".")[0]
        module = model.get_submodule(module_name)
        try:
            q = build(module)
            if tuple(q.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"expected a weight of shape [{module.out_features}, {module.in_features}], "
                    f"the checkpoint has {list(q.shape)}"
                )
            blocksize = self.quantization_config.blocksize
            if blocksize is not None and q.blocksize != blocksize:
                raise ValueError(
                    f"expected blocksize {blocksize} (the quantization_config's), the checkpoint's quant state "
                    f"has {q.blocksize}; load it with NF4Config(blocksize={q.blocksize}) or blocksize=None"
                )
        except (ValueError, TypeError) as e:
            self.errors[module_name] = str(e)
        else:
            module.set_weight(q)
            for tensor in (module.weight, module.weight_absmax):  # loaded: model._init_weights must skip them
                tensor._is_hf_initialized = True
            module._is_hf_initialized = True
            self.loaded.add(module_name)
        if missing_keys is not None:
            missing_keys.discard(weight_key)  # reported (or raised) by us, never left to transformers

    # -- after loading -------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        from transformers import BitsAndBytesConfig

        for name in self.converted:
            if name not in self.loaded and name not in self.errors:
                self.errors[name] = "its weight is not in the checkpoint"
        if self.errors:
            lines = "\n  ".join(f"{name}: {why}" for name, why in sorted(self.errors.items()))
            raise ValueError(f"nf4 could not load {len(self.errors)} layer(s):\n  {lines}")
        model.is_loaded_in_4bit = True
        dtypes = {m.nf4_meta.dtype for m in model.modules() if isinstance(m, LinearNF4)}
        compute = dtypes.pop() if len(dtypes) == 1 else torch.float32
        skipped = self.quantization_config.modules_to_not_convert
        # what is written on save: bitsandbytes' own config, so stock transformers + bitsandbytes load it
        model.config.quantization_config = BitsAndBytesConfig.from_dict(
            self.quantization_config.bitsandbytes_dict(compute, skipped)
        )
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: `nf4.hf.peft.dequantize_model`."""
        from nf4.hf.peft import dequantize_model

        return dequantize_model(model, dtype)


class _QuantizerOp(ConversionOps):
    """Reports to this load's quantizer: transformers deep-copies ops per weight, the copies share it."""

    def __init__(self, hf_quantizer: NF4HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        return self  # stateless but for the shared quantizer


class NF4Quantize(_QuantizerOp):
    """A LinearNF4's 16-bit weight -> NF4 pieces stored in the module; the 16-bit tensor dropped."""

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        quantizer = self.hf_quantizer
        config = quantizer.quantization_config
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value

            def build(module, value=value):
                if getattr(module, "transposed_checkpoint", False):
                    value = value.t()
                if not value.is_floating_point():
                    raise ValueError(f"expected a floating-point weight to quantize, got {value.dtype}")
                return quantize(value, config.blocksize or 64, config.double_quant)

            quantizer._store(model, key, build, missing_keys)
        return {}


class NF4Deserialize(_QuantizerOp):
    """One weight's serialized pieces -> an NF4Tensor stored in the LinearNF4 as it is."""

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        if not isinstance(module, LinearNF4):
            return input_dict  # another module's `weight` (a norm, the head): not ours
        pieces = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        config = self.hf_quantizer.quantization_config

        def build(module):
            if _FP4_KEY in pieces:
                raise ValueError(
                    "expected NF4, the checkpoint's quant state is bitsandbytes' FP4 "
                    f"({full_layer_name}.quant_state.bitsandbytes__fp4); nf4 reads only NF4 weights"
                )
            if set(pieces) == {"weight"} and pieces["weight"].is_floating_point():  # a 16-bit weight: quantize it
                weight = pieces["weight"]
                weight = weight.t() if getattr(module, "transposed_checkpoint", False) else weight
                return quantize(weight, config.blocksize or 64, config.double_quant)
            state = {f"{full_layer_name}{k.removeprefix('weight')}": v for k, v in pieces.items()}
            return NF4Tensor.from_bnb_state_dict(state, prefix=full_layer_name)

        self.hf_quantizer._store(model, full_layer_name, build, missing_keys)
        return {}


def as_nf4_config(config) -> NF4Config | None:
    """NF4Config or None as is; a 4-bit NF4 `BitsAndBytesConfig` as the NF4Config giving the same bytes
    (`bnb_4bit_compute_dtype` has no counterpart: nf4 computes in the activation dtype). TypeError /
    ValueError for FP4, 8-bit or other configs."""
    if config is None or isinstance(config, NF4Config):
        return config
    from transformers import BitsAndBytesConfig

    if not isinstance(config, BitsAndBytesConfig):
        raise TypeError(
            f"quantization_config must be nf4.hf.NF4Config (or bitsandbytes' NF4 BitsAndBytesConfig), got "
            f"{type(config).__name__}; pass quantization_config=nf4.hf.NF4Config()"
        )
    if config.load_in_8bit or not config.load_in_4bit:
        raise ValueError(
            "quantization_config=BitsAndBytesConfig(load_in_8bit=True) asks for bitsandbytes' 8-bit LLM.int8, "
            "which nf4 does not implement; nf4 quantizes to 4-bit NF4: pass quantization_config=nf4.hf.NF4Config() "
            "(or load with AutoModelForCausalLM.from_pretrained and bitsandbytes for 8 bits)"
        )
    if config.bnb_4bit_quant_type != "nf4":
        raise ValueError(
            f"quantization_config=BitsAndBytesConfig(bnb_4bit_quant_type={config.bnb_4bit_quant_type!r}) asks for "
            "bitsandbytes' FP4, which nf4 does not implement; nf4 quantizes to NF4: pass "
            "quantization_config=nf4.hf.NF4Config() (or bnb_4bit_quant_type='nf4')"
        )
    return NF4Config(
        blocksize=64,  # bitsandbytes' 4-bit blocksize
        double_quant=bool(config.bnb_4bit_use_double_quant),
        modules_to_not_convert=config.llm_int8_skip_modules,
    )


def nf4_config_for(quantization_config: dict | None, blocksize: int | None) -> NF4Config | None:
    """The NF4Config for a checkpoint's recorded `quantization_config` (None: 16-bit)."""
    if quantization_config is None:
        return None
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    if quantization_config.get("quant_method") == QUANT_METHOD:
        return NF4Config.from_dict(quantization_config)
    return NF4Config.from_bitsandbytes(quantization_config, blocksize)


__all__ = ["NF4Config", "NF4Deserialize", "NF4HfQuantizer", "NF4Quantize", "as_nf4_config", "nf4_config_for"]
