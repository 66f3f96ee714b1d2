"""Several GPUs: FSDP2's `fully_shard` shards nf4 models as they are.

    for layer in nf4_layers(model):     # one FSDP2 group per NF4 layer with its adapter
        fully_shard(layer)
    fully_shard(model)                  # = shard_model(model, **kwargs)

The bulk of an NF4 weight is integer parameters: FSDP2 shards them (padded; a block may straddle shards,
the forward sees the gathered whole), all-gathers 4 bits, never casts them; small pieces are buffers
(tests/test_distributed.py). A tensor subclass
would need sizes divisible by the world size and hide bitsandbytes' state-dict layout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from nf4.lora.modules import LinearNF4


def nf4_layers(model: nn.Module) -> list[nn.Module]:
    """Each NF4 layer, or the PEFT layer wrapping it (its adapter shares the all-gather), outermost first."""
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
    """`fully_shard` each of `nf4_layers(model)`, then the root, all with `fsdp_kwargs`; returns `model`."""
    from torch.distributed.fsdp import fully_shard

    for layer in nf4_layers(model):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this rank stores (a sharded parameter: its shard)."""
    return sum(_local(t).numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def nf4_local_bytes(model: nn.Module) -> int:
    """Bytes of the NF4 weights (codes, absmax, tables) this rank stores."""
    total = 0
    for m in model.modules():
        if isinstance(m, LinearNF4):
            pieces = (m.weight, m.weight_absmax, *m.buffers(recurse=False))
            total += sum(_local(t).numel() * t.element_size() for t in pieces)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class AllGatherBytes(contextlib.ContextDecorator):
    """While active, counts what all-gathers deliver to this rank (`.bytes`, `.calls`, `.sizes`)."""

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
