"""Saving the adapter of a PEFT model sharded with FSDP2 (`fully_shard`), in PEFT's format.

Under FSDP2 `model.state_dict()` holds DTensor shards, and gathering them is a collective: PEFT's
`model.save_pretrained(dir)` called on rank 0 alone (the usual `if rank == 0:`) waits for the other
ranks until the process group times out. `save_pretrained(model, dir)` here is called on every rank: it
gathers the adapter (each parameter whole, `DTensor.full_tensor`, in the same order on every rank; never
the 4-bit base) and hands it to PEFT's own `save_pretrained(dir, state_dict=..., is_main_process=...)`,
so rank 0 writes exactly the files PEFT writes on one process (`adapter_model.safetensors`,
`adapter_config.json`). Order: convert, wrap with PEFT, shard, train, then save.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nf4.lora.distributed import is_main_process


def adapter_state_dict(model: nn.Module) -> dict:
    """The PEFT model's adapter parameters (`lora_` in the name, or trainable: PEFT's `modules_to_save`)
    whole, on the CPU, keyed as `model.state_dict()` keys them. Every rank must call it (collectives)."""
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name or param.requires_grad:
            t = param.detach()
            full = getattr(t, "full_tensor", None)  # a DTensor shard: gathered, on every rank
            state[name] = (full() if full is not None else t).cpu()
    return state


def save_pretrained(model: nn.Module, save_directory: str | Path, **kwargs) -> Path:
    """PEFT's `model.save_pretrained(save_directory, **kwargs)` for a PEFT model sharded with FSDP2 (or
    not): every rank calls it, the adapter is gathered, rank 0 writes PEFT's files. Returns the directory."""
    if not hasattr(model, "peft_config") or not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained expects a PEFT model (peft.get_peft_model(...)), got {type(model).__name__}; "
            "for a model adapted with nf4.lora.apply_lora use nf4.lora.save_adapter"
        )
    state = adapter_state_dict(model)
    kwargs.setdefault("is_main_process", is_main_process())
    model.save_pretrained(str(save_directory), state_dict=state, **kwargs)
    return Path(save_directory)
