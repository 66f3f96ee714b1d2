"""Tiny random Llama checkpoints written with `save_pretrained` (no downloads), for the nf4.hf tests."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import nf4.hf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def close(a, b):
    """Within twice float32's error on the tiny models' sums (K <= 128) at b's scale: nf4 against PEFT on
    bitsandbytes with the same bytes."""
    scale = b.abs().max()
    return (a - b).abs().max() <= 2 * 128 * torch.finfo(torch.float32).eps * scale + 1e-6


def tiny_config(**overrides) -> LlamaConfig:
    # intermediate 128: bitsandbytes' CPU path needs in_features divisible by its blocksize
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny(path, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(**overrides)).to(dtype).save_pretrained(path)
    return path


def load_nf4(path, dtype=torch.float32, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4.hf.NF4Config(**config), dtype=dtype)


def load_bnb(path, dtype=torch.float32, double_quant=True, quant_type="nf4"):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids: "w4" .. "w127" and four special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(4, 128)} | {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
