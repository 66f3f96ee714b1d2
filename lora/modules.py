"""Drop-in replacements for nn.Linear with an NF4 weight: `LinearNF4` and `LoRALinearNF4`.

The quantized weight lives in buffers (packed codes, absmax, tables) and `module.weight` returns it as an
`NF4Tensor` (its `.shape`, `.dtype` and `.device` read like the original weight's). The state dict holds
the weight in bitsandbytes' serialized form (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so a
checkpoint that transformers saved for a bitsandbytes 4-bit Linear loads into these modules and back.
`.to(...)`, `.cuda()`, `.half()` move the quantized bytes but never cast or requantize them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nf4.api import quantize
from nf4.codebook import dynamic_map
from nf4.lora.functional import dropout_mask
from nf4.tensor import NF4Tensor

_PIECES = {
    "weight_packed": "packed",
    "weight_absmax": "absmax",
    "weight_code": "code",
    "weight_nested_absmax": "nested_absmax",
    "weight_nested_offset": "nested_offset",
    "weight_nested_code": "nested_code",
}


def _empty_nf4(out_features: int, in_features: int, blocksize: int, double_quant: bool, dtype, device) -> NF4Tensor:
    """An all-zero quantized weight (codes 0x77, absmax 0), without quantizing anything."""
    n = out_features * in_features
    nblocks = -(-n // blocksize)
    packed = torch.full(((n + 1) // 2, 1), 0x77, dtype=torch.uint8, device=device)
    if not double_quant:
        absmax = torch.zeros(nblocks, device=device)
        return NF4Tensor(packed, absmax, (out_features, in_features), dtype, blocksize)
    return NF4Tensor(
        packed,
        torch.full((nblocks,), 127, dtype=torch.uint8, device=device),
        (out_features, in_features),
        dtype,
        blocksize,
        nested_absmax=torch.zeros(-(-nblocks // 256), device=device),
        nested_offset=torch.zeros((), device=device),
        nested_code=dynamic_map().to(device),
    )


class LinearNF4(nn.Module):
    """`y = x @ dequant(W)^T + bias` with W frozen in NF4 (inference, or a frozen base under LoRA).

    Args:
        in_features, out_features, bias: as nn.Linear.
        blocksize, double_quant: the NF4 format (see `nf4.quantize`).
        dtype: the original weight's dtype recorded in the format (what `dequantize` returns).
    The weight starts all-zero: build from a trained layer with `from_linear`, or `load_state_dict`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self._set_weight(_empty_nf4(out_features, in_features, blocksize, double_quant, dtype, device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, **kwargs) -> LinearNF4:
        """Quantize `linear`'s weight (on its device); the bias is copied and frozen."""
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
        module._set_weight(quantize(weight, blocksize, double_quant))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    # -- the quantized weight ------------------------------------------------------------------
    def _set_weight(self, q: NF4Tensor) -> None:
        for buffer, piece in _PIECES.items():
            self.register_buffer(buffer, getattr(q, piece), persistent=False)
        self._weight_meta = (q.dtype, q.blocksize)

    @property
    def weight(self) -> NF4Tensor:
        """The quantized weight [out_features, in_features] as an `NF4Tensor` (a view of the buffers)."""
        pieces = {piece: getattr(self, buffer) for buffer, piece in _PIECES.items()}
        dtype, blocksize = self._weight_meta
        return NF4Tensor(shape=(self.out_features, self.in_features), dtype=dtype, blocksize=blocksize, **pieces)

    def _weight_args(self) -> tuple:
        return (
            self.weight_packed,
            self.weight_absmax,
            self.weight_code,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            self.weight_nested_code,
            self.out_features,
            self._weight_meta[1],
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float tensor [out, in] (the original dtype by default)."""
        return self.weight.dequantize(dtype)

    # -- forward -------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input [..., {self.in_features}], got {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}: expected a floating-point input, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        y, _ = torch.ops.nf4.lora_linear(x, *self._weight_args(), None, None, self.bias, 1.0, None, 1.0)
        return y

    # -- state dict in bitsandbytes' form ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in mine:
            missing_keys.append(key)
            return
        try:
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
        self._set_weight(q.to(self.weight_packed.device))

    # -- device moves never cast the format ----------------------------------------------------
    def _apply(self, fn, recurse=True):
        saved = {name: self._buffers.pop(name) for name in _PIECES}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=saved["weight_packed"].device)).device
            for name, buf in saved.items():
                self._buffers[name] = None if buf is None else buf.to(device)
        return self

    def extra_repr(self) -> str:
        dtype, blocksize = self._weight_meta
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={blocksize}, double_quant={self.weight_nested_absmax is not None}, "
            f"dtype={str(dtype).removeprefix('torch.')}"
        )


class LoRALinearNF4(LinearNF4):
    """An NF4 base layer plus a trainable LoRA adapter (PEFT's conventions).

        y = x @ dequant(W)^T + scaling * (dropout(x) @ lora_A^T) @ lora_B^T + bias

    `lora_A` [r, in_features] is initialised kaiming-uniform (a = sqrt(5)) and `lora_B` [out_features, r]
    to zeros, so a fresh adapter leaves the output unchanged; `scaling = lora_alpha / r`
    (`lora_alpha / sqrt(r)` with `use_rslora`). The adapter is float32 unless `adapter_dtype` says
    otherwise; the base weight and bias are frozen.
    """

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
        **kwargs,
    ):
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
        device = self.weight_packed.device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=device))
        self.reset_lora_parameters()
        self._unmerged: NF4Tensor | None = None  # the weight before `merge`, for `unmerge`

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A kaiming-uniform (a = sqrt(5)), B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

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
        """Quantize `linear` to NF4 and attach a fresh adapter (output unchanged until trained)."""
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
        if self.merged:  # the adapter is inside the weight
            return super().forward(x)
        self._check_input(x)
        mask, keep_scale = dropout_mask(x, self.lora_dropout, self.training)
        y, _ = torch.ops.nf4.lora_linear(
            x, *self._weight_args(), self.lora_A, self.lora_B, self.bias, float(self.scaling), mask, keep_scale
        )
        return y

    # -- merging -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True between `merge()` and `unmerge()`: the weight holds the adapter, which is skipped."""
        return self._unmerged is not None

    def delta_weight(self) -> torch.Tensor:
        """The adapter's update `scaling * lora_B @ lora_A`, float32 [out_features, in_features]."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self) -> dict[str, float]:
        """Fold the adapter into the NF4 weight: `W' = quantize(dequant(W) + scaling * B @ A)`.

        Lossy: the update is usually smaller than the NF4 rounding step, so much of it is rounded away.
        Returns the weight-space measurements: `update_norm` = ||dW||, `error_norm` =
        ||dequant(W') - (dequant(W) + dW)||, and `update_lost` = their ratio (1.0 means the merged
        weight is as far from the intended one as the whole update is large). `unmerge()` restores the
        previous weight exactly; for an exact merge use `nf4.lora.merge_and_unload` (16-bit weights).
        """
        if self.merged:
            raise RuntimeError("this layer is already merged; unmerge() first")
        q = self.weight
        base = q.dequantize(torch.float32)
        delta = self.delta_weight()
        target = base + delta
        merged = quantize(target.to(q.dtype), q.blocksize, q.double_quant)
        error = merged.dequantize(torch.float32) - target
        self._unmerged = q
        self._set_weight(merged)
        update, err = float(delta.norm()), float(error.norm())
        return {"update_norm": update, "error_norm": err, "update_lost": err / update if update else 0.0}

    def unmerge(self) -> None:
        """Restore the weight from before `merge()`, byte for byte (the adapter was never changed)."""
        if not self.merged:
            raise RuntimeError("this layer is not merged")
        self._set_weight(self._unmerged)
        self._unmerged = None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}" + (", merged=True" if self.merged else "")
        )
