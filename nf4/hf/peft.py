"""PEFT's LoRA on nf4 layers: with `nf4.hf` imported, every PEFT injection wraps each targeted `LinearNF4`
in `PeftLinearNF4`, which keeps PEFT's semantics and runs nf4's fused op.

- One active adapter: one `lora_linear` call (fused matmul, nf4's backward, dropout inside). Several: the
  base's fused matmul plus each adapter's term as PEFT computes it. `set_adapter`, `disable_adapter()`,
  `delete_adapter`: PEFT's own code.
- A mixed batch (`adapter_names=` in forward or `generate`): one `multi_lora_linear` call per layer over a
  cached `AdapterBank` copy of the layer's adapters (memory: their size again); PEFT's loop where a
  gradient is needed.
- Numerics: the low-rank product runs in the activation dtype, the adapter cast to it (PEFT casts the
  activations instead). Adapters may be fp32 or bf16 (TRL); gradients come back in their dtype.
- DoRA (`use_dora=True`): `nf4.lora.dora.dora_linear` (the weight norm from ||W_j||^2, cached, and W A^T
  from the same NF4 matmul: no dense [out, in] matrix); the magnitude in PEFT's `lora_magnitude_vector`
  (its files load and save as PEFT's), initialised to the dequantized base's row norms. At inference the
  norm is cached per adapter. Several active adapters and merging follow PEFT's DoRA formulas; mixed
  batches (`adapter_names`) are refused with DoRA, as PEFT does.
- `merge()` requantizes `dequant(W) + scaling * B @ A` (DoRA: `m / ||W + s B A|| * (W + s B A)`), like
  PEFT on bitsandbytes: lossy. `unmerge()` restores the weight byte for byte. `nf4.hf.merge_and_unload(model)`
  merges exactly into 16 bits.
- Refused with ValueError: lora_bias, fan_in_fan_out, other LoRA variants (aLoRA, Arrow, ...).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from nf4.api import dequantize, quantize
from nf4.lora.bank import BASE, AdapterBank
from nf4.lora.dora import cached_weight_sq, dora_forward, dora_merged, dora_weight_norm
from nf4.lora.functional import lora_linear, multi_lora_linear
from nf4.lora.modules import LinearNF4


class PeftLinearNF4(nn.Module, LoraLayer):
    """PEFT's LoRA layer over a `LinearNF4` base."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs):  # fmt: skip
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._nf4_before_merge = None  # the base weight before the first merge, for an exact unmerge
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        unsupported = {
            "lora_bias": config.lora_bias,
            "fan_in_fan_out": config.fan_in_fan_out,
            "alora_invocation_tokens": getattr(config, "alora_invocation_tokens", None),
            "arrow_config": getattr(config, "arrow_config", None),
        }
        bad = [f"{k}={v!r}" for k, v in unsupported.items() if v not in (None, False)]
        if bad:
            raise ValueError(
                f"nf4's LoRA layers do not support {', '.join(bad)}; use plain LoRA or DoRA (rsLoRA is fine)"
            )
        if config.use_dora:
            return NF4DoraVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def _get_base_layer_device_and_dtype(self, base_layer):
        """The adapter goes where the NF4 bytes are, in PEFT's dtype."""
        return base_layer.weight.device, None

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.merged or not active:
            return base(x, *args, **kwargs)
        if len(active) == 1:  # the fused op: NF4 matmul + LoRA term, one call
            name = active[0]
            lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            if name in self.lora_variant:
                return dora_forward(x, base.nf4_weight, lora_A, lora_B, self.lora_magnitude_vector[name].weight,
                                    base.bias, self.scaling[name], p, self.training, self._dora_cache(), name,
                                    where=type(self).__name__)  # fmt: skip
            return lora_linear(x, base.nf4_weight, lora_A, lora_B, base.bias, self.scaling[name], p, self.training,
                               where=type(self).__name__)  # fmt: skip
        result = base(x, *args, **kwargs)
        for name in active:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            x_a = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:
                result = result + self._dora_term(name, x_a, result).to(result.dtype)
                continue
            result = result + (lora_B(lora_A(self.lora_dropout[name](x_a))) * self.scaling[name]).to(result.dtype)
        return result

    # -- DoRA ----------------------------------------------------------------------------------
    def _dora_cache(self) -> dict:
        """||W_j||^2 and the inference norms (`nf4.lora.dora.cached_norm`): not state, not a submodule."""
        return self.__dict__.setdefault("_nf4_dora_cache", {})

    def _dora_term(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA term added to `result` with several active adapters: `(g - 1) * base_result + g * s *
        lora(dropout(x))`, g = m / ||W + s B A|| (detached), base_result = `result` less the bias (PEFT's
        compounding), or dequant(W) applied to the dropped input in training with dropout."""
        base = self.get_base_layer()
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        weight_sq = cached_weight_sq(base.nf4_weight, self._dora_cache())
        norm = dora_weight_norm(base.nf4_weight, lora_A.weight, lora_B.weight, self.scaling[name], weight_sq)
        g = self.lora_magnitude_vector[name].weight / norm.to(x.device)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result if base.bias is None else result - base.bias
        else:
            x = dropout(x)
            base_result = lora_linear(x, base.nf4_weight, where=type(self).__name__)
        return (g - 1) * base_result + g * lora_B(lora_A(x)) * self.scaling[name]

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """`adapter_names[i]` picks row i's adapter, as PEFT does ("__base__", or an adapter this layer lacks:
        the base alone). Inference: one fused call over an `AdapterBank` of this layer's adapters (built once,
        rebuilt when an adapter's tensors change), or the one-adapter call when every row names the same.
        Where a gradient is needed: PEFT's loop over adapters."""
        base = self.get_base_layer()
        params = [p for name in self.lora_A for p in (self.lora_A[name].weight, self.lora_B[name].weight)]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, base.bias, *params)):
            return self._looped_mixed_batch(x, *args, adapter_names=adapter_names, **kwargs)
        present = set(adapter_names)
        if len(present) == 1:  # one adapter for the whole batch (or none here): the single-adapter call
            name = present.pop()
            if name not in self.lora_A:
                return base(x, *args, **kwargs)
            return lora_linear(x, base.nf4_weight, self.lora_A[name].weight, self.lora_B[name].weight, base.bias,
                               self.scaling[name], where=type(self).__name__)  # fmt: skip
        bank = self._adapter_bank()
        index = self._adapter_index(adapter_names, bank, x.device)
        return multi_lora_linear(x, base.nf4_weight, bank.a, bank.v, bank.scales, index, base.bias,
                                 where=type(self).__name__)  # fmt: skip

    def _looped_mixed_batch(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """PEFT's way: the base output cloned, each adapter's rows edited (differentiable)."""
        result = self.get_base_layer()(x, *args, **kwargs).clone()
        for name in set(adapter_names) - {BASE}:
            if name not in self.lora_A:
                continue
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            sub = self._cast_input_dtype(x[rows], lora_A.weight.dtype)
            result[rows] += (lora_B(lora_A(self.lora_dropout[name](sub))) * self.scaling[name]).to(result.dtype)
        return result

    def _adapter_bank(self) -> AdapterBank:
        """Every adapter of this layer in a bank (a cached copy, not a submodule: no state-dict entries),
        rebuilt when an adapter is added, removed, rescaled, moved or written in place."""
        weights = {name: (self.lora_A[name].weight, self.lora_B[name].weight) for name in self.lora_A}
        key = tuple(
            (name, float(self.scaling[name]), a.data_ptr(), a._version, b.data_ptr(), b._version, a.dtype, b.dtype,
             a.device) for name, (a, b) in weights.items()
        )  # fmt: skip
        cached = self.__dict__.get("_nf4_bank")
        if cached is not None and cached[0] == key:
            return cached[1]
        a0 = next(iter(weights.values()))[0]
        dtype = functools.reduce(torch.promote_types, [t.dtype for pair in weights.values() for t in pair])
        bank = AdapterBank(self.in_features, self.out_features, len(weights),
                           max(a.shape[0] for a, _ in weights.values()), dtype, a0.device)  # fmt: skip
        for name, (a, b) in weights.items():
            bank.add(name, a.detach(), b.detach(), self.scaling[name])
        self.__dict__["_nf4_bank"] = (key, bank)
        self.__dict__.pop("_nf4_index", None)
        return bank

    def _adapter_index(self, adapter_names: list[str], bank: AdapterBank, device: torch.device) -> torch.Tensor:
        """Row slots on `device`, kept for the next call with the same names (`generate`'s steps): one copy
        to the device per batch composition."""
        key = (tuple(adapter_names), device)
        cached = self.__dict__.get("_nf4_index")
        if cached is not None and cached[0] == key:
            return cached[1]
        held = bank.adapters
        index = torch.tensor([held.get(name, -1) for name in adapter_names], dtype=torch.int32, device=device)
        self.__dict__["_nf4_index"] = (key, index)
        return index

    # -- merging into the NF4 weight (lossy) ----------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`scaling * B @ A`, float32 [out_features, in_features]."""
        a, b = self.lora_A[adapter].weight.detach().float(), self.lora_B[adapter].weight.detach().float()
        return self.scaling[adapter] * (b @ a)

    def merged_weight(self, weight: torch.Tensor, adapter: str, unmerged: torch.Tensor) -> torch.Tensor:
        """`weight` (float32, may hold earlier merges) with `adapter` merged: `+ delta`, or for DoRA PEFT's
        `m / ||unmerged + delta|| * (weight + delta)` (the norm from the weight before any merge)."""
        delta = self.get_delta_weight(adapter)
        if adapter not in self.lora_variant:
            return weight + delta
        return dora_merged(weight, delta, self.lora_magnitude_vector[adapter].weight, unmerged)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            warnings.warn(
                "merging a LoRA adapter into an NF4 weight requantizes it: most of the update is rounded away "
                "(nf4.hf.merge_and_unload merges exactly into 16-bit layers)",
                stacklevel=2,
            )
            q = base.nf4_weight
            unmerged = dequantize(q if self._nf4_before_merge is None else self._nf4_before_merge, torch.float32)
            target = self.merged_weight(base.dequantize_weight(torch.float32), name, unmerged)
            if safe_merge and not torch.isfinite(target).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            if self._nf4_before_merge is None:
                self._nf4_before_merge = q
            base.set_weight(quantize(target.to(q.dtype), q.blocksize, q.double_quant))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the NF4 weight from before the first merge, byte for byte."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().set_weight(self._nf4_before_merge)
        self._nf4_before_merge = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class NF4DoraVariant(LoraVariant):
    """PEFT's DoRA on a `PeftLinearNF4`: `init` adds the magnitude (PEFT's `lora_magnitude_vector` entry,
    a `DoraLinearLayer` holding it) set to ||W + s B A|| per row, from the NF4 weight without a dense matrix.
    The layer's own forward and merge run DoRA; PEFT never calls this variant's other methods there."""

    @staticmethod
    def init(module: PeftLinearNF4, adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        weight = module.get_base_layer().nf4_weight
        norm = dora_weight_norm(
            weight, a, b, module.scaling[adapter_name], cached_weight_sq(weight, module._dora_cache())
        )
        holder = DoraLinearLayer(fan_in_fan_out=False)
        holder.weight = nn.Parameter(norm.to(a.dtype), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = holder


def _dispatch_mapping() -> dict:
    return {LinearNF4: PeftLinearNF4}


def lora_config(model: nn.Module | None = None, **kwargs) -> LoraConfig:
    """`peft.LoraConfig(**kwargs)` with nf4's layer registered (as `nf4.hf.compat` does at injection).
    With `model`, `target_modules` matching no layer raise ValueError naming the layers there are."""
    targets = kwargs.get("target_modules")
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    if model is not None and targets is not None and not all_linear:
        _check_targets(model, targets)
    config = LoraConfig(**kwargs)
    config._register_custom_module(_dispatch_mapping())
    return config


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearNF4) or type(m) is nn.Linear}


def _check_targets(model: nn.Module, targets) -> None:
    if isinstance(targets, str):  # a regex, PEFT's full-match rule
        import re

        found = any(re.fullmatch(targets, n) for n in dict(model.named_modules()))
    else:
        names = list(dict(model.named_modules()))
        found = any(n == t or n.endswith("." + t) for n in names for t in targets)
    if not found:
        layers = sorted({n.rpartition(".")[2] for n in _linear_layers(model)})
        raise ValueError(
            f"target_modules={targets!r} matches no module of this {type(model).__name__}; "
            f"its Linear / nf4 layers are named {layers}"
        )


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs) -> PeftModel:  # fmt: skip
    """Load a PEFT LoRA adapter onto an nf4 model; returns the PeftModel. `model`: the base model, or a
    PeftModel that gets the adapter under `adapter_name`. Other kwargs go to PEFT."""
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name, is_trainable=is_trainable, **kwargs)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable,
                                     **kwargs)  # fmt: skip


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Exact merge into a plain 16-bit model, in place; returns the base model (PeftModel unwrapped).

    `PeftLinearNF4` -> nn.Linear of `dequant(W) + sum of active scaling * B @ A` in fp32, rounded once to
    `dtype` (default: original); other nf4 layers dequantized; PEFT merges its own; 4-bit markers go, so
    `save_pretrained` writes a plain 16-bit checkpoint."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name, layer in [(n, m) for n, m in base.named_modules() if isinstance(m, PeftLinearNF4)]:
        inner = layer.get_base_layer()
        if layer.merged:
            layer.unmerge()
        w = unmerged = inner.dequantize_weight(torch.float32)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                w = layer.merged_weight(w, adapter, unmerged)
        base.set_submodule(name, dense_layer(inner, w, dtype))
    if isinstance(model, PeftModel):  # PEFT's own layers (on 16-bit layers), modules_to_save: PEFT merges them
        base = model.merge_and_unload()
    return dequantize_model(base, dtype)


def dense_layer(layer: LinearNF4, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Module:
    """nn.Linear (or Conv1D, as the checkpoint stored it) holding `weight` [out, in] as `dtype`."""
    dtype = dtype or layer.nf4_meta.dtype
    weight = weight.to(dtype)
    if getattr(layer, "transposed_checkpoint", False):  # GPT-2: Conv1D, weight [in, out], always a bias
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(layer.out_features, layer.in_features).to(device=weight.device, dtype=dtype)
        weight = weight.t()
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                          dtype=dtype)  # fmt: skip
    with torch.no_grad():
        dense.weight.copy_(weight)
        if dense.bias is not None:
            dense.bias.copy_(layer.bias.to(dtype) if layer.bias is not None else torch.zeros_like(dense.bias))
    dense.train(layer.training)
    return dense


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every nf4 layer as its `dense_layer`, in place, then `drop_4bit_markers`; returns `model`."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LinearNF4)]:
        model.set_submodule(name, dense_layer(layer, layer.dequantize_weight(torch.float32), dtype))
    drop_4bit_markers(model)
    return model


def drop_4bit_markers(model: nn.Module) -> None:
    """Remove transformers' quantization config and quantizer and `is_loaded_in_4bit`, unless a 4-bit
    layer remains."""
    if any(isinstance(m, LinearNF4) or type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own cleanup: config, quantizer, method
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for name in ("is_loaded_in_4bit", "quantization_method"):
        if name in model.__dict__:
            delattr(model, name)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def convert_peft_layer(layer: nn.Module, base: LinearNF4) -> PeftLinearNF4:
    """PEFT's `layer` as a `PeftLinearNF4` over `base`, with the same Parameter objects (optimizer state
    stays, DoRA's magnitude too). ValueError if merged or neither plain LoRA nor DoRA."""
    if layer.merged:
        raise ValueError("this PEFT layer has adapters merged into its base weight; unmerge() them first")
    variants = getattr(layer, "lora_variant", {})
    bias = getattr(layer, "lora_bias", {})
    if any(not isinstance(v, (DoraLinearVariant, NF4DoraVariant)) for v in variants.values()) or any(bias.values()):
        raise ValueError("nf4's LoRA layers support plain LoRA or DoRA only (no lora_bias or other variants)")
    new = PeftLinearNF4.__new__(PeftLinearNF4)
    new.__dict__.update(layer.__dict__)
    new._modules = dict(layer._modules)
    new._modules["base_layer"] = base
    new.fan_in_fan_out = False
    new._nf4_before_merge = None
    return new
