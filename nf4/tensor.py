"""`NF4Tensor`: the one handle for a quantized weight, in bitsandbytes' NF4 layout, and its serialized form.

A container, not a `torch.Tensor` subclass: it holds bitsandbytes' pieces (`nf4.format.PIECES`)
unchanged, so checkpoints load both ways without requantizing. `flatten` / `unflatten` take it apart and
rebuild it unchecked, to cross custom ops, module buffers and devices. Only the constructor and
`from_bnb_state_dict` build one from outside pieces, and they validate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from nf4.codebook import NF4_CODE
from nf4.format import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    NESTED_PIECES,
    PIECES,
    NF4Meta,
    check_blocksize,
)
from nf4.reference import decoded_absmax

__all__ = ["BLOCKSIZES", "FLOAT_DTYPES", "NF4Tensor", "check_blocksize"]

_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
_QS_KEY = "quant_state.bitsandbytes__nf4"
_OFFSET_WIDTH = len(repr(-2.2250738585072014e-308))
"""The most characters a float's JSON form takes."""
_SERIALIZED = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


class NF4Tensor:
    """A tensor quantized to NF4 in blocks, optionally with double-quantized absmax.

    Build with `nf4.quantize`, `from_bnb_state_dict`, or this constructor (pieces as `nf4.format` lays
    them out, checked: ValueError / TypeError naming the piece); back to floats with `nf4.dequantize`.
    Device moves move the bytes, never requantize. Immutable by convention.
    """

    __slots__ = (*PIECES, "meta")

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        blocksize: int,
        code: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        nested_offset: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
    ):
        self.packed = packed
        self.absmax = absmax
        self.code = NF4_CODE.to(packed.device, copy=True) if code is None else code
        self.nested_absmax = nested_absmax
        self.nested_offset = nested_offset
        self.nested_code = nested_code
        self.meta = NF4Meta(torch.Size(shape), dtype, blocksize, nested_absmax is not None)
        self._validate("")

    # -- the handle: pieces and metadata ----------------------------------------------------------
    def flatten(self) -> tuple[dict[str, torch.Tensor | None], NF4Meta]:
        """(pieces by name in `PIECES` order, None where absent; metadata)."""
        return {name: getattr(self, name) for name in PIECES}, self.meta

    @classmethod
    def unflatten(cls, pieces: Mapping[str, torch.Tensor | None], meta: NF4Meta) -> NF4Tensor:
        """Rebuild from `flatten()`'s output, unchecked (the pieces come from a checked NF4Tensor)."""
        q = cls.__new__(cls)
        for name in PIECES:
            setattr(q, name, pieces[name])
        q.meta = meta
        return q

    # -- size and layout -------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.meta.shape

    @property
    def dtype(self) -> torch.dtype:
        """The original dtype (`nf4.dequantize`'s default)."""
        return self.meta.dtype

    @property
    def blocksize(self) -> int:
        return self.meta.blocksize

    @property
    def double_quant(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.meta.double_quant

    @property
    def nested_dtype(self) -> torch.dtype:
        """The dtype the nested absmax decode rounds to (`nf4.format`); kept and written back."""
        return self.meta.nested_dtype

    def decodable(self) -> NF4Tensor:
        """Itself, or with a 16-bit `nested_dtype` (the kernels decode in fp32 only) the same codes with
        the decoded fp32 absmax (bitsandbytes' values; made per call, not stored)."""
        if not self.double_quant or self.meta.nested_dtype == torch.float32:
            return self
        pieces = dict.fromkeys(PIECES)
        pieces.update(packed=self.packed, absmax=decoded_absmax(self), code=self.code)
        return NF4Tensor.unflatten(pieces, self.meta._replace(double_quant=False, nested_dtype=torch.float32))

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel() // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.flatten()[0].items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Bytes stored, code tables included."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel: 4.127 at blocksize 64 with double quantization (4.5 without)."""
        return 8.0 * self.nbytes / self.numel()

    # -- conversions -------------------------------------------------------------------------------
    def to(self, device: torch.device | str, non_blocking: bool = False) -> NF4Tensor:
        """The same bytes on `device`."""
        device = torch.device(device)
        pieces, meta = self.flatten()
        moved = {k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in pieces.items()}
        return NF4Tensor.unflatten(moved, meta)

    def cuda(self, device: int | None = None) -> NF4Tensor:
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def cpu(self) -> NF4Tensor:
        return self.to("cpu")

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device}, "
            f"bits_per_param={self.bits_per_param:.3f})"
        )

    # -- bitsandbytes' serialized form ---------------------------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """bitsandbytes' serialized form, as transformers saves a 4-bit Linear's weight.

        Keys: `prefix`, `.absmax`, `.quant_map`, `.quant_state.bitsandbytes__nf4` (UTF-8 JSON as uint8) and,
        double-quantized, `.nested_absmax`, `.nested_quant_map`. Tables are copies (safetensors refuses
        shared memory). NOTE: the JSON is space-padded to a length fixed by the layout, not the offset's
        digits: DCP needs it (tests/test_distributed.py, test_dcp_checkpoint_loads_into_a_skeleton_...).
        """
        state = {"quant_type": "nf4", "blocksize": self.blocksize}
        state.update(dtype=_DTYPE_NAMES[self.dtype], shape=list(self.shape))
        out = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.code.clone(),
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            state.update(
                nested_blocksize=NESTED_BLOCKSIZE,
                nested_dtype=_DTYPE_NAMES[self.nested_dtype],
                nested_offset=float(self.nested_offset),
            )
        blob = json.dumps(state).encode("utf-8")
        if self.double_quant:  # padded with spaces to a length the offset's digits do not change
            width = len(json.dumps({**state, "nested_offset": 0.0})) - len("0.0") + _OFFSET_WIDTH
            blob = blob.ljust(width)
        out[f"{prefix}.{_QS_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Load bitsandbytes' serialized NF4 weight under `prefix` (other keys ignored). Every piece is
        checked; a mismatch or an FP4 state raises ValueError naming the key. Packed bytes of any dtype
        (`quant_storage`) are reinterpreted as uint8."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of str to tensors, got {type(state_dict)}")
        mine = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        unknown = sorted(k for k in mine if k not in _SERIALIZED)
        if unknown:
            fp4 = [k for k in unknown if k.endswith("bitsandbytes__fp4")]
            if fp4:
                raise ValueError(
                    f"{prefix}.{fp4[0]}: this is an FP4 checkpoint; only NF4 (quant_type='nf4') is "
                    "supported. Requantize the original weights with nf4.quantize."
                )
            raise ValueError(
                f"unexpected keys under '{prefix}.': {[f'{prefix}.{k}' for k in unknown]}; "
                f"expected only {[f'{prefix}.{k}' for k in _SERIALIZED]}"
            )
        missing = [f"{prefix}.{k}" for k in ("absmax", "quant_map", _QS_KEY) if k not in mine]
        if prefix not in state_dict:
            missing.insert(0, prefix)
        if missing:
            raise ValueError(f"not a bitsandbytes NF4 state dict: missing {missing}")

        state = _parse_quant_state(mine[_QS_KEY], f"{prefix}.{_QS_KEY}")
        packed = state_dict[prefix]
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"{prefix}: expected a tensor, got {type(packed)}")
        packed = packed.reshape(-1).contiguous().view(torch.uint8).reshape(-1, 1)
        nested = "nested_blocksize" in state
        kwargs = {}
        if nested:
            for k in ("nested_absmax", "nested_quant_map"):
                if k not in mine:
                    raise ValueError(f"{prefix}.{k} is missing but the quant state says double quant")
            kwargs = dict(
                nested_absmax=mine["nested_absmax"],
                nested_code=mine["nested_quant_map"],
                nested_offset=torch.tensor(state["nested_offset"], dtype=torch.float32).to(packed.device),
            )
        elif "nested_absmax" in mine or "nested_quant_map" in mine:
            raise ValueError(
                f"{prefix}.nested_absmax / nested_quant_map present but the quant state has no "
                "nested_blocksize / nested_offset: the pieces come from different checkpoints"
            )
        pieces = dict(packed=packed, absmax=mine["absmax"], code=mine["quant_map"], **kwargs)
        meta = NF4Meta(torch.Size(state["shape"]), state["dtype"], state["blocksize"], nested)
        if nested:
            meta = meta._replace(nested_dtype=FLOAT_DTYPES[state["nested_dtype"]])
        q = cls.unflatten({name: pieces.get(name) for name in PIECES}, meta)
        q._validate(prefix)
        return q

    def _validate(self, prefix: str) -> None:
        """Check every piece against the metadata; ValueError naming it."""

        def name(key):
            if key is None:  # the packed codes: bitsandbytes stores them under the bare prefix
                return prefix or "packed"
            return f"{prefix}.{key}" if prefix else key

        def expect(key, t, dtype, shape, what):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name(key)}: expected a tensor ({what}), got {type(t).__name__}")
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                want = f"{str(dtype).removeprefix('torch.')} {list(shape)}"
                raise ValueError(f"{name(key)}: expected {want} ({what}), got {_describe(t)}")
            if t.device != self.packed.device:
                raise ValueError(f"{name(key)} is on {t.device} but the packed codes are on {self.packed.device}")

        self.meta = self.meta._replace(blocksize=check_blocksize(self.blocksize))
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES)}, got {self.dtype}")
        if len(self.shape) == 0 or any(d <= 0 for d in self.shape):
            raise ValueError(f"shape must have at least one dimension, all positive; got {list(self.shape)}")
        n = self.numel()
        expect(
            None,
            self.packed,
            torch.uint8,
            ((n + 1) // 2, 1),
            f"{n} 4-bit codes for shape {list(self.shape)}, two per byte",
        )
        double = self.double_quant
        expect(
            "absmax",
            self.absmax,
            torch.uint8 if double else torch.float32,
            (self.nblocks,),
            f"one {'8-bit code' if double else 'float32'} per {self.blocksize}-element block",
        )
        expect("quant_map" if prefix else "code", self.code, torch.float32, (16,), "the NF4 table")
        check_values = self.packed.device.type != "meta"  # a meta tensor has shapes but no values
        if check_values and not torch.equal(self.code.cpu(), NF4_CODE):
            raise ValueError(
                f"{name('quant_map' if prefix else 'code')}: the table is not NF4 (an FP4 or custom "
                "map?); only the NF4 table is supported"
            )
        present = [getattr(self, k) is not None for k in NESTED_PIECES]
        if double or any(present):
            if not (double and all(present)):
                raise ValueError("double quantization needs nested_absmax, nested_offset and nested_code together")
            nb2 = -(-self.nblocks // NESTED_BLOCKSIZE)
            expect(
                "nested_absmax",
                self.nested_absmax,
                torch.float32,
                (nb2,),
                f"one float32 per {NESTED_BLOCKSIZE} absmax codes",
            )
            expect(
                "nested_quant_map" if prefix else "nested_code",
                self.nested_code,
                torch.float32,
                (256,),
                "the 8-bit dynamic map",
            )
            expect("nested_offset", self.nested_offset, torch.float32, (), "a float32 scalar")
            if check_values and not bool(torch.isfinite(self.nested_offset)):
                raise ValueError(f"{name('nested_offset')} must be finite, got {float(self.nested_offset)}")


def _parse_quant_state(blob: torch.Tensor, key: str) -> dict:
    """Decode and check the uint8 JSON quant state."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        got = _describe(blob) if isinstance(blob, torch.Tensor) else type(blob).__name__
        raise ValueError(f"{key}: expected a 1-D uint8 tensor of UTF-8 JSON, got {got}")
    try:
        state = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key}: expected a JSON object, got {type(state).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in state:
            raise ValueError(f"{key}: field '{field}' is missing")
    if state["quant_type"] != "nf4":
        raise ValueError(f"{key}: quant_type must be 'nf4', got {state['quant_type']!r}")
    try:
        check_blocksize(state["blocksize"])
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if state["dtype"] not in FLOAT_DTYPES:
        raise ValueError(f"{key}: dtype must be one of {list(FLOAT_DTYPES)}, got {state['dtype']!r}")
    state["dtype"] = FLOAT_DTYPES[state["dtype"]]
    shape = state["shape"]
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(f"{key}: shape must be a non-empty list of positive ints, got {shape!r}")
    nested_fields = ("nested_blocksize", "nested_dtype", "nested_offset")
    present = [f for f in nested_fields if f in state]
    if present:
        if len(present) != len(nested_fields):
            raise ValueError(f"{key}: double-quant fields {nested_fields} must all be present, got {present}")
        if state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(f"{key}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {state['nested_blocksize']!r}")
        if state["nested_dtype"] not in FLOAT_DTYPES:
            raise ValueError(f"{key}: nested_dtype must be one of {list(FLOAT_DTYPES)}, got {state['nested_dtype']!r}")
        offset = state["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"{key}: nested_offset must be a finite number, got {offset!r}")
    return state
