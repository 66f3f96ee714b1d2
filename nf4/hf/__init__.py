"""nf4 where Hugging Face users already work: transformers' `from_pretrained`, PEFT, the Trainer.

    import nf4.hf                                  # registers quant_method "nf4"; PEFT learns nf4's layers
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4.hf.NF4Config(), dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    ...                                            # Trainer / TRL's SFTTrainer, gradient checkpointing
    model.save_pretrained(out)                     # the adapter, in PEFT's format
    peft.PeftModel.from_pretrained(base, out)      # back onto an nf4 model (or base.load_adapter(out))

Stock PEFT calls work through `nf4.hf.compat`; bitsandbytes is never imported. `nf4.hf.from_pretrained`
also loads bitsandbytes' serialized 4-bit checkpoints without requantizing. Needs `pip install
'nf4[hf]'`; `import nf4` never imports this.
"""

from __future__ import annotations

try:
    import peft  # noqa: F401
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"nf4.hf needs transformers and peft ({e}); install them with: pip install 'nf4[hf]'") from e

from transformers.quantizers import auto as _auto

from nf4.hf import compat
from nf4.hf.peft import PeftLinearNF4, convert_peft_layer, load_adapter, lora_config, merge_and_unload
from nf4.hf.quantizer import QUANT_METHOD, NF4Config, NF4HfQuantizer, as_nf4_config, nf4_config_for
from nf4.lora.convert import register_peft_converter

__all__ = [
    "PeftLinearNF4",
    "NF4Config",
    "NF4HfQuantizer",
    "from_pretrained",
    "load_adapter",
    "lora_config",
    "merge_and_unload",
]

# Registered once per process (transformers refuses a second registration under the same name).
if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NF4Config:
    _auto.register_quantization_config(QUANT_METHOD)(NF4Config)
if _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not NF4HfQuantizer:
    _auto.register_quantizer(QUANT_METHOD)(NF4HfQuantizer)
register_peft_converter(convert_peft_layer)  # nf4.lora.apply_lora / quantize_model on PEFT models
compat.install()  # PEFT's LoRA injection and the parameter counts know nf4's layers (nf4/hf/compat.py)

_CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
_CONFIG_KWARGS += ("trust_remote_code",)


def from_pretrained(model_class, pretrained_model_name_or_path, *model_args, quantization_config=None, **kwargs):
    """`model_class.from_pretrained(...)` with every Linear layer in nf4, whatever the checkpoint holds.

    A 16-bit checkpoint is quantized with `quantization_config` (an NF4Config or NF4 `BitsAndBytesConfig`;
    default `NF4Config()`). A bitsandbytes NF4 checkpoint is read as it is (its recorded config swapped
    for an NF4Config; `quantization_config` only pins the blocksize). FP4 and 8-bit raise ValueError.
    Other arguments go to `model_class.from_pretrained`.
    """
    quantization_config = as_nf4_config(quantization_config)
    config = kwargs.pop("config", None)
    if config is None:
        config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
        config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    recorded = getattr(config, "quantization_config", None)
    if recorded is None:
        kwargs["quantization_config"] = quantization_config or NF4Config()
    else:
        blocksize = quantization_config.blocksize if quantization_config is not None else None
        config.quantization_config = nf4_config_for(recorded, blocksize).to_dict()
    return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
