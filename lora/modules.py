"""Drop-in nn.Linear replacements whose weight is stored as bitsandbytes' `Linear4bit` stores it:

    weight                frozen Parameter, uint8 [(n + 1) // 2, 1]   packed codes
    weight_absmax         frozen Parameter, uint8 [nblocks]           absmax codes, or fp32 absmax as int32
    weight_code           fp32 buffer [16]                            the NF4 table
    weight_nested_absmax  fp32 buffer [ceil(nblocks / 256)]           } double quantization only
    weight_nested_offset  fp32 buffer []                              }
    weight_nested_code    fp32 buffer [256]                           }

FSDP2 shards integer parameters and no mixed-precision policy casts them. Buffers are persistent
(transformers resets the others); `weight` is a parameter (loaders resolve keys to attributes). The
state dict is bitsandbytes' form; on meta it lists `weight` alone, the float [out, in] to bring.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from nf4.api import dequantize, quantize
from nf4.codebook import dynamic_map
from nf4.format import FLOAT_DTYPES, NF4Meta
from nf4.lora.bank import AdapterBank
from nf4.lora.dora import dora_forward, dora_merged, dora_weight_norm
from nf4.lora.functional import lora_linear, multi_lora_linear
from nf4.tensor import NF4Tensor

_PARAMS = {"weight": "packed", "weight_absmax": "absmax"}
"""Parameter name -> NF4Tensor piece (the bulk)."""
_BUFFERS = {
    "weight_code": "code",
    "weight_nested_absmax": "nested_absmax",
    "weight_nested_offset": "nested_offset",
    "weight_nested_code": "nested_code",
}
"""Buffer name -> NF4Tensor piece (the small pieces)."""


def _empty_nf4(out_features: int, in_features: int, blocksize: int, double_quant: bool, dtype, device) -> NF4Tensor:
    """All-zero; explicit dtypes keep the default dtype out."""
    n = out_features * in_features
    nblocks = -(-n // blocksize)
    packed = torch.full(((n + 1) // 2, 1), 0x77, dtype=torch.uint8, device=device)
    shape = (out_features, in_features)
    if not double_quant:
        return NF4Tensor(packed, torch.zeros(nblocks, dtype=torch.float32, device=device), shape, dtype, blocksize)
    return NF4Tensor(
        packed,
        torch.full((nblocks,), 127, dtype=torch.uint8, device=device),
        shape,
        dtype,
        blocksize,
        nested_absmax=torch.zeros(-(-nblocks // 256), dtype=torch.float32, device=device),
        nested_offset=torch.zeros((), dtype=torch.float32, device=device),
        nested_code=dynamic_map().to(device),
    )


class LinearNF4(nn.Module):
    """`y = x @ dequant(W)^T + bias`, W frozen in NF4, for nn.Linear. Starts all-zero: use `from_linear`
    or load a state dict."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        """
        Args:
            in_features, out_features, bias: as nn.Linear (the bias frozen).
            blocksize: one of `nf4.BLOCKSIZES`. double_quant: 8-bit absmax (4.127 bits/param, not 4.5).
            dtype: the weight's original dtype (what `dequantize_weight` returns) and the bias's: float32,
                float16 or bfloat16 (default: torch's default). device: may be meta.
        Raises ValueError / TypeError for non-positive sizes or another dtype.
        """
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES.values():
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.set_weight(_empty_nf4(out_features, in_features, blocksize, double_quant, dtype, device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, **kwargs) -> LinearNF4:
        """Quantize `linear`'s weight on its device; the bias is copied, frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            dtype=weight.dtype,
            device=weight.device,
            **kwargs,
        )
        module.set_weight(quantize(weight, blocksize, double_quant))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    # -- the quantized weight ------------------------------------------------------------------
    def set_weight(self, q: NF4Tensor) -> None:
        """Store `q`'s pieces as this module's parameters and buffers."""
        pieces, meta = q.flatten()
        if not meta.double_quant:  # float32 absmax as its bit pattern: no mixed-precision policy casts it
            pieces["absmax"] = pieces["absmax"].view(torch.int32)
        for name, piece in _PARAMS.items():
            self._parameters.pop(name, None)
            self.register_parameter(name, nn.Parameter(pieces[piece], requires_grad=False))
        for name, piece in _BUFFERS.items():
            self.register_buffer(name, pieces[piece], persistent=True)
        self._weight_meta = meta

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The weight [out_features, in_features] as an NF4Tensor over the stored pieces."""
        params, buffers = self._parameters, self._buffers  # not getattr: nn.Module.__getattr__ is slow here
        meta = self._weight_meta
        absmax = params["weight_absmax"]
        pieces = {piece: buffers[name] for name, piece in _BUFFERS.items()}
        pieces.update(packed=params["weight"], absmax=absmax if meta.double_quant else absmax.view(torch.float32))
        return NF4Tensor.unflatten(pieces, meta)

    @property
    def nf4_meta(self) -> NF4Meta:
        """Shape, original dtype, blocksize, double_quant."""
        return self._weight_meta

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as floats [out_features, in_features], default its original dtype."""
        return dequantize(self.nf4_weight, dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] (fp32/fp16/bf16; fp64 on CPU) -> [..., out_features] in x's dtype."""
        return lora_linear(x, self.nf4_weight, bias=self.bias, where=type(self).__name__)

    # -- state dict in bitsandbytes' form ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in (*_PARAMS, *_BUFFERS):  # replaced by bitsandbytes' keys (or, on meta, by `weight` alone)
            destination.pop(prefix + name, None)
        q = self.nf4_weight
        if q.device.type == "meta":  # no values for a quant state yet: bitsandbytes lists the weight to load,
            meta = self._weight_meta  # [out, in] in its original dtype, and loaders read that entry so
            destination[prefix + "weight"] = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
            return
        for key, value in q.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        n_missing = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        internal = {prefix + name for name in (*_PARAMS, *_BUFFERS)}  # never keys of the state dict
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in internal]
        if key not in mine:
            missing_keys.append(key)
            return
        try:
            q = self._quantize_arrival(mine[key]) if mine.keys() == {key} else None
            if q is None:
                q = NF4Tensor.from_bnb_state_dict(mine, prefix=key)
        except (ValueError, TypeError) as e:
            error_msgs.append(f"{key}: {e}")
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{key}: the checkpoint's weight has shape {list(q.shape)}, this module expects "
                f"[{self.out_features}, {self.in_features}]"
            )
            return
        assign = local_metadata.get("assign_to_params_buffers", False) or self.weight.device.type == "meta"
        if assign or not self._same_layout(q):
            self.set_weight(q if assign else q.to(self.weight.device))
            return
        with torch.no_grad():  # in place, like nn.Module: the parameter objects stay (FSDP2 holds them)
            mine = self.nf4_weight.flatten()[0]
            for name, piece in q.flatten()[0].items():
                if piece is not None and piece is not mine[name]:
                    mine[name].copy_(piece)
        self._weight_meta = q.meta

    def _quantize_arrival(self, weight) -> NF4Tensor | None:
        """A float weight arriving alone, quantized in this module's format; None for packed codes."""
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2):
            return None
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"the checkpoint's weight has shape {list(weight.shape)}, this module expects "
                f"[{self.out_features}, {self.in_features}]"
            )
        meta = self._weight_meta
        device = weight.device if self.weight.device.type == "meta" else self.weight.device
        return quantize(weight.detach().to(device, meta.dtype), meta.blocksize, meta.double_quant)

    def _same_layout(self, q: NF4Tensor) -> bool:
        meta = self._weight_meta
        return (q.shape, q.blocksize, q.double_quant) == (meta.shape, meta.blocksize, meta.double_quant)

    def _fqn_modifiers(self) -> dict[str, str]:
        """DCP resolves keys as attribute paths: `weight.absmax` etc. via `_bnb_key_path`."""
        return {"weight": "_bnb_key_path"}

    @property
    def _bnb_key_path(self) -> SimpleNamespace:
        names = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
        weight = SimpleNamespace(**dict.fromkeys(names), quant_state=SimpleNamespace(bitsandbytes__nf4=None))
        return SimpleNamespace(weight=weight)

    # -- device moves never cast the format ----------------------------------------------------
    def _apply(self, fn, recurse=True):
        params = {name: self._parameters.pop(name) for name in _PARAMS}
        buffers = {name: self._buffers.pop(name) for name in _BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=params["weight"].device)).device

            def move(t):  # the bytes on `device`; out of the meta device (to_empty): uninitialised, like to_empty
                if t is None or t.device == device:
                    return t
                return torch.empty_like(t, device=device) if t.device.type == "meta" else t.to(device)

            for name, p in params.items():  # unmoved parameters stay the same objects (optimizers, FSDP2)
                self._parameters[name] = p if p.device == device else nn.Parameter(move(p.detach()), False)
            for name, b in buffers.items():
                self._buffers[name] = move(b)
        return self

    def extra_repr(self) -> str:
        meta = self._weight_meta
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={meta.blocksize}, double_quant={meta.double_quant}, "
            f"dtype={str(meta.dtype).removeprefix('torch.')}"
        )


class LoRALinearNF4(LinearNF4):
    """`y = x @ dequant(W)^T + scaling * (dropout(x) @ A^T) @ B^T + bias`: W frozen, A [r, in_features]
    and B [out_features, r] trainable (PEFT's conventions). With `use_dora`, DoRA as PEFT's `use_dora=True`
    (`nf4.lora.dora`): a trainable magnitude `lora_magnitude` [out_features], set to ||W + s B A|| per row
    whenever the weight is set until the adapter is trained, loaded or merged."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        use_dora: bool = False,
        **kwargs,
    ):
        """
        Args:
            r: rank (positive int). lora_alpha: `scaling = lora_alpha / r` (`/ sqrt(r)` with `use_rslora`).
            lora_dropout: in [0, 1), on the adapter's input in training. adapter_dtype: of lora_A, lora_B
            (and the DoRA magnitude). use_dora: DoRA (class docstring).
            in_features, out_features, bias, **kwargs (blocksize, double_quant, dtype, device): as `LinearNF4`.
        Raises ValueError for a bad r or lora_dropout.
        """
        super().__init__(in_features, out_features, bias, **kwargs)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=device))
        self.use_dora = bool(use_dora)
        self._fresh_magnitude = self.use_dora  # follows the weight until trained, loaded or merged
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(torch.zeros(out_features, dtype=adapter_dtype, device=device))
        self.reset_lora_parameters()
        self._unmerged: NF4Tensor | None = None  # the weight before `merge`, for `unmerge`
        self._dora_cache: dict = {}  # ||W_j||^2 and the inference norm (nf4.lora.dora.cached_norm)

    def reset_lora_parameters(self) -> None:
        """PEFT's: A kaiming-uniform (a = sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self._init_magnitude()

    def set_weight(self, q: NF4Tensor) -> None:
        super().set_weight(q)
        if getattr(self, "_fresh_magnitude", False):
            self._init_magnitude()

    def _init_magnitude(self) -> None:
        """PEFT's DoRA initialisation: the magnitude = ||dequant(W) + s B A|| per row (no dense matrix)."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.lora_magnitude.copy_(dora_weight_norm(self.nf4_weight, self.lora_A, self.lora_B, self.scaling))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.use_dora and prefix + "lora_magnitude" in state_dict:
            self._fresh_magnitude = False  # the loaded magnitude stays when the weight arrives after it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 16,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        **kwargs,
    ) -> LoRALinearNF4:
        """Quantize `linear` and attach a fresh adapter."""
        return super().from_linear(
            linear,
            blocksize=blocksize,
            double_quant=double_quant,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            **kwargs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused op; dropout in training mode only; no adapter once merged."""
        if self.merged:
            return super().forward(x)
        if self.use_dora:
            self._fresh_magnitude = False
            return dora_forward(x, self.nf4_weight, self.lora_A, self.lora_B, self.lora_magnitude, self.bias,
                                self.scaling, self.lora_dropout, self.training, self._dora_cache,
                                where=type(self).__name__)  # fmt: skip
        return lora_linear(x, self.nf4_weight, self.lora_A, self.lora_B, self.bias, self.scaling, self.lora_dropout,
                           self.training, where=type(self).__name__)  # fmt: skip

    # -- merging -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True between `merge()` and `unmerge()`."""
        return self._unmerged is not None

    def delta_weight(self) -> torch.Tensor:
        """`scaling * lora_B @ lora_A`, float32 [out_features, in_features]."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def adapted_weight(self, base: torch.Tensor) -> torch.Tensor:
        """The weight the adapted layer computes with, from `base` = dequant(W) in float32: `base + dW`, or
        with DoRA `m / ||base + dW|| * (base + dW)` per row (PEFT's merge)."""
        if not self.use_dora:
            return base + self.delta_weight()
        return dora_merged(base, self.delta_weight(), self.lora_magnitude)

    def merge(self) -> dict[str, float]:
        """`W' = quantize(dequant(W) + dW)`, dW = scaling * B @ A (DoRA: `adapted_weight` - dequant(W)); lossy
        (dW is often below the NF4 step).
        Returns `update_norm` ||dW||, `error_norm` ||dequant(W') - dequant(W) - dW||, `update_lost` (ratio).
        RuntimeError if merged."""
        if self.merged:
            raise RuntimeError("this layer is already merged; unmerge() first")
        q = self.nf4_weight
        base = dequantize(q, torch.float32)
        target = self.adapted_weight(base)
        delta = target - base
        merged = quantize(target.to(q.dtype), q.blocksize, q.double_quant)
        error = dequantize(merged, torch.float32) - target
        self._unmerged = q
        self._fresh_magnitude = False
        self.set_weight(merged)
        update, err = float(delta.norm()), float(error.norm())
        return {"update_norm": update, "error_norm": err, "update_lost": err / update if update else 0.0}

    def unmerge(self) -> None:
        """Restore the weight from before `merge()`, byte for byte."""
        if not self.merged:
            raise RuntimeError("this layer is not merged")
        self.set_weight(self._unmerged)
        self._unmerged = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}"
            + (", use_dora=True" if self.use_dora else "")
            + (", merged=True" if self.merged else "")
        )


class MultiLoRALinearNF4(LinearNF4):
    """An NF4 layer serving many LoRA adapters at once: row i of a batch adds the adapter of slot
    `adapter_index[i]` (-1: none), all rows in one fused call (`multi_lora_linear`). Inference: adapters
    are buffers of `self.bank` (an `AdapterBank`), filled with `add_adapter`; train them with
    `LoRALinearNF4` or PEFT."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, slots: int = 8,
                 max_rank: int = 16, adapter_dtype: torch.dtype = torch.float32, **kwargs):  # fmt: skip
        """slots, max_rank: the bank's capacity; adapter_dtype: its dtype. Others as `LinearNF4`."""
        super().__init__(in_features, out_features, bias, **kwargs)
        self.bank = AdapterBank(in_features, out_features, slots, max_rank, adapter_dtype, self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    **kwargs) -> MultiLoRALinearNF4:  # fmt: skip
        """Quantize `linear`, with an empty bank (`slots`, `max_rank`, `adapter_dtype` in kwargs)."""
        return super().from_linear(linear, blocksize=blocksize, double_quant=double_quant, **kwargs)

    def add_adapter(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> int:
        """Fill a slot (`AdapterBank.add`); returns it. `scaling`: lora_alpha / r (or / sqrt(r))."""
        return self.bank.add(name, lora_A, lora_B, scaling)

    def remove_adapter(self, name: str) -> int:
        """Empty `name`'s slot (`AdapterBank.remove`); returns it."""
        return self.bank.remove(name)

    def adapter_index(self, names) -> torch.Tensor:
        """Slots of `names` (None or "__base__": -1) on the layer's device, for `forward`."""
        return self.bank.index(names, self.weight.device)

    def forward(self, x: torch.Tensor, adapter_index: torch.Tensor | None = None) -> torch.Tensor:
        """`adapter_index`: slots per sequence ([B] for x [B, T, in]) or per row; None: the base alone."""
        if adapter_index is None:
            return super().forward(x)
        bank = self.bank
        return multi_lora_linear(x, self.nf4_weight, bank.a, bank.v, bank.scales, adapter_index, self.bias,
                                 where=type(self).__name__)  # fmt: skip
