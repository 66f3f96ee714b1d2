"""Builders shared by the matmul and training benchmarks: the same layer in each implementation."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn


class One(nn.Module):
    """A model holding one linear layer named `proj` (what PEFT wraps)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_bnb(linear: nn.Linear, r: int, compute_dtype: torch.dtype, device: torch.device):
    """PEFT's LoRA (r, lora_alpha = r) on a bitsandbytes NF4 Linear4bit (double quant, blocksize 64),
    with B randomised so the adapter is not a no-op. None when bitsandbytes or peft is missing."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer.load_state_dict(linear.state_dict())
    model = One(layer).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0))
    nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.01)
    return model


def ours(linear: nn.Linear, r: int, device: torch.device):
    """LoRALinearNF4 (r, lora_alpha = r) with B randomised."""
    from nf4.lora import LoRALinearNF4

    layer = LoRALinearNF4.from_linear(linear, r=r, lora_alpha=r).to(device)
    nn.init.normal_(layer.lora_B, std=0.01)
    return layer


def lm_training_steps(model, opt, ids, warmup: int, steps: int, around=contextlib.nullcontext):
    """Causal-LM training steps (forward with labels = ids, backward, `opt.step()`): `ids(step)` gives each
    step's token ids; `around()` wraps forward and backward. Returns (median seconds of the steps after
    `warmup`, the last step's loss, the last `around()` object). CUDA is synchronised around each step."""
    cuda = next(model.parameters()).device.type == "cuda"
    times, loss = [], None
    for step in range(warmup + steps):
        batch = ids(step)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with around() as wrapper:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item(), wrapper
