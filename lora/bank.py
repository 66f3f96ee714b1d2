"""Many LoRA adapters of one layer, stacked in fixed slots, for mixed batches (`multi_lora_linear`).

    a [S, R, K]   slot i's lora_A [r_i, K] in rows 0..r_i, zeros below     (R = max_rank)
    v [S, R, N]   slot i's lora_B^T [r_i, N], zeros below (zero rows add nothing)
    scales [S]    float32: slot i's lora_alpha / r_i (or / sqrt(r_i), rsLoRA), 0 while empty

Adding, replacing or removing an adapter copies into its slot: shapes never change, so nothing
recompiles and a captured CUDA graph stays valid. Names live on the host; a batch's per-row slots
(`index`) are a device tensor. Memory: S x R x (K + N) in the bank's dtype, whatever ranks are held.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BASE = "__base__"
"""PEFT's name for a row that runs the base layer alone (`index` -1, as None does)."""


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class AdapterBank(nn.Module):
    """`slots` adapters of rank <= `max_rank` for a layer [out_features, in_features] (module docstring)."""

    def __init__(self, in_features: int, out_features: int, slots: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, device=None):  # fmt: skip
        super().__init__()
        self.in_features = _positive("in_features", in_features)
        self.out_features = _positive("out_features", out_features)
        self.slots, self.max_rank = _positive("slots", slots), _positive("max_rank", max_rank)
        if not dtype.is_floating_point:
            raise TypeError(f"the bank's dtype must be floating point, got {dtype}")
        self.register_buffer("a", torch.zeros(slots, max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(slots, max_rank, out_features, dtype=dtype, device=device))
        self.register_buffer("scales", torch.zeros(slots, dtype=torch.float32, device=device))
        self.names: list[str | None] = [None] * slots
        self.ranks: list[int] = [0] * slots

    @property
    def adapters(self) -> dict[str, int]:
        """name -> slot of every adapter held."""
        return {name: i for i, name in enumerate(self.names) if name is not None}

    def add(self, name: str, lora_A: Tensor, lora_B: Tensor, scaling: float) -> int:
        """Put adapter `name` (lora_A [r, in_features], lora_B [out_features, r]) in a slot: its own if
        held (replaced), else the first free one. Returns the slot. ValueError when full or mismatched."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"an adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if lora_A.dim() != 2 or lora_A.shape[1] != self.in_features or tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(
                f"adapter {name!r}: expected lora_A [r, {self.in_features}] and lora_B [{self.out_features}, r], "
                f"got {list(lora_A.shape)} and {list(lora_B.shape)}"
            )
        if not 0 < r <= self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {r}; this bank holds ranks 1..{self.max_rank} "
                             f"(make one with a larger max_rank)")  # fmt: skip
        held = self.adapters
        if name in held:
            slot = held[name]
        elif None in self.names:
            slot = self.names.index(None)
        else:
            raise ValueError(f"the bank's {self.slots} slots are full ({sorted(held)}); remove one first")
        with torch.no_grad():
            self.a[slot].zero_()
            self.a[slot, :r].copy_(lora_A)
            self.v[slot].zero_()
            self.v[slot, :r].copy_(lora_B.t())
            self.scales[slot].fill_(float(scaling))
        self.names[slot], self.ranks[slot] = name, r
        return slot

    def remove(self, name: str) -> int:
        """Empty adapter `name`'s slot (zeros: a stale index then adds nothing); returns the slot."""
        slot = self.slot(name)
        with torch.no_grad():
            self.a[slot].zero_()
            self.v[slot].zero_()
            self.scales[slot].zero_()
        self.names[slot], self.ranks[slot] = None, 0
        return slot

    def slot(self, name: str) -> int:
        """The slot holding `name`; KeyError naming those held."""
        held = self.adapters
        if name not in held:
            raise KeyError(f"no adapter named {name!r} in this bank; it holds {sorted(held)}")
        return held[name]

    def index(self, names, device=None) -> Tensor:
        """int32 slots of `names` (one per sequence or row), -1 for None or "__base__"; on the bank's device
        unless `device` is given. KeyError for an unknown name."""
        held = self.adapters
        unknown = sorted({n for n in names if n is not None and n != BASE and n not in held})
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this bank holds {sorted(held)}")
        slots = [-1 if n is None or n == BASE else held[n] for n in names]
        return torch.tensor(slots, dtype=torch.int32, device=self.a.device if device is None else device)

    def get_extra_state(self) -> dict:
        return {"names": list(self.names), "ranks": list(self.ranks)}

    def set_extra_state(self, state: dict) -> None:
        if len(state["names"]) != self.slots:
            raise ValueError(f"a state of {len(state['names'])} slots cannot load into a bank of {self.slots}")
        self.names, self.ranks = list(state["names"]), list(state["ranks"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, slots={self.slots}, "
                f"max_rank={self.max_rank}, dtype={str(self.a.dtype).removeprefix('torch.')}, "
                f"adapters={self.adapters}")  # fmt: skip
