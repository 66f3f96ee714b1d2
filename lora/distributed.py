"""Several GPUs: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards nf4 models as they are.

The design (why nothing nf4-specific wraps FSDP2): the bulk of an NF4 weight is stored in integer
parameters (`LinearNF4.weight`, the packed codes, uint8 [(n + 1) // 2, 1]; `weight_absmax`, uint8 codes or
the float32 absmax as its int32 bits), so FSDP2 shards them on dim 0 like any parameter (padding uneven
sizes; a block may straddle two shards, which does not matter: the forward sees the all-gathered whole),
all-gathers them in 4 bits (0.516 bytes per weight at blocksize 64 with double quantization: 0.5 of codes
+ 1/64 of absmax codes) and never casts them: a `MixedPrecisionPolicy` casts floating parameters only. The
small pieces (the NF4 table, the nested absmax and offset, the 256-entry map) are persistent buffers, which
FSDP2 neither shards nor casts. The alternatives were worse: a tensor subclass with `fsdp_pre_all_gather` /
`fsdp_post_all_gather` (torchao's NF4Tensor) must divide evenly by the world size and is invisible to
bitsandbytes' state-dict layout; a container caching the whole tensor keeps it alive and silently defeats
sharding; float pieces stored as parameters are rounded by `param_dtype=bf16`.

What users see is unchanged: `apply_lora`, the fused ops (which read the unsharded parameters FSDP2 puts in
place during forward and backward), bitsandbytes' state-dict keys and bytes (`get_model_state_dict` with
`full_state_dict=True` gives the unsharded model's state dict; `torch.distributed.checkpoint` saves and
loads the sharded one at any world size), `nf4.lora.save_adapter` (every rank calls it, rank 0 writes).

A checkpoint saved with `torch.distributed.checkpoint` loads into a model built the same way (the same
base weights quantized, e.g. with `from_pretrained` or `apply_lora`): each weight's quant-state entry is
bitsandbytes' JSON, whose length depends on the stored offset, and DCP refuses an entry of another length
with a "Size mismatch" error rather than load it.

    from torch.distributed.fsdp import fully_shard
    model = apply_lora(model, ...)                    # or from_pretrained(..., NF4Config()) + PEFT
    for layer in nf4_layers(model):                   # each NF4 layer (with its adapter) one FSDP2 group
        fully_shard(layer)
    fully_shard(model)

`shard_model(model, **kwargs)` does exactly that; `AllGatherBytes` counts what the collectives move.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from nf4.lora.modules import LinearNF4


def nf4_layers(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: each NF4 layer, or the PEFT LoRA layer wrapping it (so that its
    adapter shares the layer's all-gather), outermost first."""
    found, taken = [], set()
    for _, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, LinearNF4) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            found.append(module)
            taken.add(id(base))
        elif isinstance(module, LinearNF4) and id(module) not in taken:
            found.append(module)
    return found


def shard_model(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """`fully_shard` every NF4 layer of `model` (see `nf4_layers`), then the root, with the same keyword
    arguments (mesh, mp_policy, offload_policy, reshard_after_forward, ...). Returns `model`."""
    from torch.distributed.fsdp import fully_shard

    for layer in nf4_layers(model):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes this rank stores for the model's parameters and buffers (a sharded parameter: its shard)."""
    return sum(_local(t).numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def nf4_local_bytes(model: nn.Module) -> int:
    """Bytes of the NF4 weights (codes, absmax, tables) this rank stores: adapters and biases left out."""
    total = 0
    for m in model.modules():
        if isinstance(m, LinearNF4):
            pieces = (m.weight, m.weight_absmax, *m.buffers(recurse=False))
            total += sum(_local(t).numel() * t.element_size() for t in pieces)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class AllGatherBytes(contextlib.ContextDecorator):
    """Counts the bytes that all-gathers deliver to this rank (the gathered output's size) while active:

        with AllGatherBytes() as counted:
            loss = model(x).sum(); loss.backward()
        counted.bytes

    It wraps the collectives FSDP2 calls (`all_gather_single` in torch >= 2.12, `all_gather_into_tensor`
    before); nothing else changes.
    """

    _NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.sizes: list[int] = []  # bytes of each all-gather, in call order
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name in self._NAMES:
            real = getattr(dist, name, None)
            if real is None:
                continue
            self._saved[name] = real

            def counting(output, *args, _real=real, **kwargs):
                self.sizes.append(output.numel() * output.element_size())
                self.bytes += self.sizes[-1]
                self.calls += 1
                return _real(output, *args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()
        return False


def is_main_process() -> bool:
    """True outside torch.distributed and on rank 0."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
