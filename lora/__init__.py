"""LoRA on NF4 weights: the fused op, nn.Linear replacements, model conversion.

layer = LoRALinearNF4.from_linear(linear, r=16, lora_alpha=16)
apply_lora(model, r=16, target_modules=["q_proj", "v_proj"])     # in place
multi = MultiLoRALinearNF4.from_linear(linear, slots=8, max_rank=16)  # many adapters, one mixed batch
"""

from nf4.lora.adapter import load_adapter, save_adapter
from nf4.lora.bank import AdapterBank
from nf4.lora.convert import apply_lora, quantize_model
from nf4.lora.dora import dora_linear
from nf4.lora.functional import lora_linear, multi_lora_linear
from nf4.lora.merge import merge_and_unload, merged_weight
from nf4.lora.modules import LinearNF4, LoRALinearNF4, MultiLoRALinearNF4

__all__ = [
    "AdapterBank",
    "LinearNF4",
    "LoRALinearNF4",
    "MultiLoRALinearNF4",
    "apply_lora",
    "dora_linear",
    "load_adapter",
    "lora_linear",
    "merge_and_unload",
    "merged_weight",
    "multi_lora_linear",
    "quantize_model",
    "save_adapter",
]
