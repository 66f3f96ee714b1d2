"""Hypothesis strategies and data generators shared by the tests."""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import strategies as st

from nf4.tensor import BLOCKSIZES

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dtypes = st.sampled_from(DTYPES)
blocksizes = st.sampled_from(BLOCKSIZES)
small_blocksizes = st.sampled_from(BLOCKSIZES[:4])


@st.composite
def shapes(draw, max_numel=3000, max_dims=3):
    """Shapes of 1 to 3 dims, from a single element up to about `max_numel`, odd sizes included."""
    ndim = draw(st.integers(1, max_dims))
    dims = []
    budget = max_numel
    for _ in range(ndim):
        d = draw(st.integers(1, max(1, budget)))
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


def make_data(shape, dtype, kind, seed, blocksize=64):
    """Test data of a given `kind`: normal, zero blocks, extreme magnitudes, mixed scales."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    x = torch.randn(n, generator=g)
    if kind == "zero_blocks":
        mask = torch.rand(-(-n // blocksize), generator=g) < 0.5
        x = x * (~mask).repeat_interleave(blocksize)[:n]
    elif kind == "scales":
        x = x * torch.exp(torch.randn(n, generator=g) * 4)
    elif kind == "extreme":
        finfo = torch.finfo(dtype)
        choices = torch.tensor([finfo.max / 2, finfo.tiny, finfo.tiny * 0.01, 1e-30, 1.0, 0.0])
        pick = torch.randint(0, len(choices), (-(-n // blocksize),), generator=g)
        x = x.clamp(-1, 1) * choices[pick].repeat_interleave(blocksize)[:n]
    big = torch.finfo(dtype).max
    return x.clamp(-big, big).to(dtype).reshape(shape)  # finite in every dtype


data_kinds = st.sampled_from(("normal", "zero_blocks", "scales", "extreme"))


STATIC = Path(__file__).resolve().parent.parent / "benchmarks" / "static"
"""The static speed model and the ahead-of-time compiler (development tools, not part of the package)."""


def static_module(name: str):
    """`benchmarks/static/<name>.py` as a module (`aot`, `sass`, `model`): the folder goes on sys.path."""
    if str(STATIC) not in sys.path:
        sys.path.insert(0, str(STATIC))
    return importlib.import_module(name)


def without_interpreter(code: str, timeout: int = 900) -> str:
    """Run Python `code` in a subprocess without TRITON_INTERPRET (so kernels compile for a GPU target),
    with benchmarks/static importable (`import sass`); its stdout. Fails the test with the subprocess's
    stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STATIC), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- the format's own error bound, and inputs on the code thresholds ------------------------------


def absmax_decode_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Per-block bound (float64 [nblocks]) on |decoded - absmax| for double-quantized absmax (float [nblocks],
    the true values), from the format (nf4-format.md, section 3): half the largest gap of the 256-entry
    map (0.0070) x the 256-group's max |absmax - offset| (offset = mean), plus float32 rounding (the
    offset, the scaling, the decode's product and sum): a few ulps of the values involved."""
    from nf4.codebook import dynamic_map

    absmax = absmax.detach().double().cpu()
    nblocks = absmax.numel()
    offset = absmax.mean()
    groups = -(-nblocks // 256)
    y = torch.nn.functional.pad((absmax - offset).abs(), (0, groups * 256 - nblocks))
    spread = y.view(groups, 256).amax(dim=1).repeat_interleave(256)[:nblocks]
    map_half_gap = float(dynamic_map().double().diff().max()) / 2
    return spread * map_half_gap + 4 * torch.finfo(torch.float32).eps * (spread + offset.abs() + absmax)


def nf4_error_bound(x: torch.Tensor, blocksize: int, double_quant: bool, dtype: torch.dtype | None = None):
    """Per-element bound (float64, x's shape) on |dequantize(quantize(x, blocksize, double_quant), dtype) - x|
    that the format guarantees (nf4-format.md), computed from x alone:

        half the largest gap between NF4 values (0.1519) x the block's absmax
      + with double quant, the decoded absmax's error (`absmax_decode_bound`; |code| <= 1 carries it
        to every value)
      + float32 rounding of the reciprocal, the scaling (a value an ulp off can pick the neighbouring
        code) and the product: a few ulps of the block's scale
      + one rounding to `dtype` (default x's dtype): half an ulp of the block's scale, and half the
        smallest subnormal step (float32's or dtype's) where values are subnormal.
    """
    from nf4.codebook import NF4_CODE

    dtype = dtype or x.dtype
    flat = x.detach().reshape(-1).double().cpu()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    decode = absmax_decode_bound(absmax) if double_quant else torch.zeros_like(absmax)
    scale = absmax + decode
    half_gap = float(NF4_CODE.double().diff().max()) / 2
    f32, out = torch.finfo(torch.float32), torch.finfo(dtype)
    per_block = absmax * half_gap + decode + 4 * f32.eps * scale + out.eps / 2 * scale
    floor = max(f32.smallest_normal * f32.eps, out.smallest_normal * out.eps) / 2
    return (per_block.repeat_interleave(blocksize)[:n] + floor).view(x.shape)


def _scaled(x, absmax):
    """The format's scaled value x * (1 / absmax) in float32 (numpy float32 scalars), with the reference's
    exact power-of-two pre-scaling for absmax outside [2**-64, 2**64] (`nf4.reference.unit_scale`)."""
    import numpy as np

    pre = np.float32(2.0**64) if absmax < 2.0**-64 else np.float32(2.0**-64) if absmax > 2.0**64 else np.float32(1)
    inv = np.float32(1) / (absmax * pre)  # IEEE division of float32 scalars: correctly rounded
    return (x * pre) * inv


PROBE_ABSMAX = (1.0, -3.0, 2.0**-80, -(1.5 * 2.0**70))
"""Absmax (signed: the first value of its block) of the `midpoint_probes` blocks: 1 (the scaled value is
x itself), 3 and 1.5 * 2**70 (inexact reciprocals), 2**-80 and 1.5 * 2**70 (the power-of-two pre-scaling)."""


def midpoint_probes(blocksize: int = 64):
    """float32 x [len(PROBE_ABSMAX) * blocksize] and its expected NF4 codes (int64), per the format.

    Each block starts with its absmax value, then for each of the 15 float32 NF4 midpoints
    `(c[i] + c[i+1]) / 2` holds the float32 x whose scaled value `x * (1 / absmax)` is exactly the
    midpoint (where one exists: always when absmax is a power of two), the x with the largest scaled value
    below it and the x with the smallest above it (the midpoint's nextafter neighbours when absmax is a
    power of two), then zeros. The code is the number of midpoints strictly below the scaled value (a tie
    goes to the lower code): midpoint i -> i, just above -> i + 1, just below -> i. Random data never lands
    on a midpoint; a `>=` for `>`, searchsorted's other side or a differently rounded scaling shows here.
    """
    import numpy as np

    from nf4.codebook import NF4_CODE

    assert blocksize >= 46, "a block holds its absmax and up to 3 values per midpoint"
    code = NF4_CODE.numpy()
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)  # float32 sum, exact halving
    xs, expect = [], []
    for a in PROBE_ABSMAX:
        a32 = np.float32(abs(a))
        block = [np.float32(a)]
        for t in mids:
            x0 = np.float32(np.float64(t) * np.float64(a32))
            window = [x0]
            down = up = x0
            for _ in range(16):
                down, up = np.nextafter(down, np.float32(-np.inf)), np.nextafter(up, np.float32(np.inf))
                window += [down, up]
            scaled = {x: _scaled(x, a32) for x in window}
            below = max((x for x in window if scaled[x] < t), key=lambda x: scaled[x])
            above = min((x for x in window if scaled[x] > t), key=lambda x: scaled[x])
            block += [x for x in window if scaled[x] == t][:1] + [below, above]
        if abs(a) in (1.0, 2.0**-80):  # a power of two: every midpoint and both neighbours, exactly
            assert len(block) == 46 and all(_scaled(x, a32) == t for x, t in zip(block[1::3], mids, strict=True))
        block += [np.float32(0)] * (blocksize - len(block))
        xs += block
        expect += [int((mids < _scaled(x, a32)).sum()) for x in block]
    return torch.from_numpy(np.array(xs, dtype=np.float32)), torch.tensor(expect, dtype=torch.int64)


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes (int64) of packed uint8 [(n + 1) // 2, 1], element 2k in the high nibble."""
    flat = packed.reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n]


def threshold_probes():
    """(y float32 [768], expected nested codes int64 [768]) for double quantization with offset 0: each
    256-group holds 1.0 (so its absmax2 is 1 and the scaled value is y itself) and values exactly on the
    255 rounding thresholds between neighbouring entries of the 256-entry map, and one float32 step
    either side. The expected code is the exact nearest map entry, a tie going to the lower one
    (nf4-format.md, section 3), from float64 distances: on a threshold (the float32 at or just below
    the exact midpoint) the lower entry, one step above it the upper."""
    import numpy as np

    from nf4.codebook import dynamic_map

    code = dynamic_map().double().numpy()
    mid = (code[:-1] + code[1:]) / 2
    at = mid.astype(np.float32)
    at = np.where(at.astype(np.float64) > mid, np.nextafter(at, np.float32(-np.inf)), at).astype(np.float32)
    values = np.concatenate([at, np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(-np.inf))])
    groups = [np.concatenate([[np.float32(1)], chunk]) for chunk in np.split(values.astype(np.float32), 3)]
    y = np.concatenate(groups).astype(np.float32)
    dist = np.abs(y.astype(np.float64)[:, None] - code[None, :])
    expect = dist.argmin(axis=1)  # the first (lower) index on a tie
    return torch.from_numpy(y), torch.from_numpy(expect).long()


def bnb_cpu_inference(model: torch.nn.Module, *args) -> None:
    """One no-grad, eval-mode CPU call of `model`, a model with bitsandbytes' Linear4bit layers, as on a
    CPU with AVX512-BF16: there `Linear4bit.forward` repacks its weight for its CPU kernel
    (`_convert_weight_packed_for_cpu`: the absmax decoded to bfloat16), and its `state_dict` undoes that,
    re-double-quantizing the absmax in the weight's dtype (`nested_dtype` "bfloat16" for a bf16 weight).
    On a CPU without AVX512-BF16 the layers are told they have it, and bitsandbytes' matmul, whose kernel
    for the repacked layout needs it, returns zeros (the output is not what is tested)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    real = bnb.matmul_4bit
    if not bnbf.has_avx512bf16():
        bnb.matmul_4bit = lambda x, w, bias=None, quant_state=None: x.new_zeros(*x.shape[:-1], quant_state.shape[0])
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        bnb.matmul_4bit = real
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)


def same_bnb_entry(key: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two state-dict entries hold the same: equal tensors, or for a bitsandbytes quant state the same JSON
    text (nf4 pads it with spaces to a fixed length per layout: `NF4Tensor.to_bnb_state_dict`)."""
    if key.endswith("quant_state.bitsandbytes__nf4"):
        return bytes(a.tolist()).rstrip(b" ") == bytes(b.tolist()).rstrip(b" ")
    return torch.equal(a, b)


def assert_linear_within_float32(y, x, w, bias=None, a=None, b=None, scaling=0.0):
    """y (float32 [M, N]) is `x @ w^T + scaling * (x @ a^T) @ b^T + bias` (w [N, K] float64: the exact
    weight) up to float32's worst-case error for its dot products and additions, about
    (K + r + 2) * eps * (|x| @ |w|^T + |scaling| * (|x| @ |a|^T) @ |b|^T + |bias|)."""
    x, w = x.detach().double().cpu(), w.detach().double().cpu()
    exact, size, r = x @ w.t(), x.abs() @ w.abs().t(), 0
    if a is not None:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        exact = exact + scaling * (x @ a.t()) @ b.t()
        size = size + abs(scaling) * (x.abs() @ a.abs().t()) @ b.abs().t()
        r = a.shape[0]
    if bias is not None:
        bias = bias.detach().double().cpu()
        exact, size = exact + bias, size + bias.abs()
    bound = (x.shape[-1] + r + 2) * torch.finfo(torch.float32).eps * size
    err = (y.detach().double().cpu() - exact).abs()
    assert torch.all(err <= bound), err.max()


def peft_scaling(r, lora_alpha, use_rslora):
    """PEFT's scaling, from its definition (not from the layer): alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def trained_layer(in_features, out_features, use_rslora, double_quant=True, std=0.5, seed=0):
    """A LoRALinearNF4 with r = 4, lora_alpha = 6 (scaling 1.5, or 3 with rsLoRA) and a non-zero lora_B."""
    from torch import nn

    from nf4.lora import LoRALinearNF4

    torch.manual_seed(seed)
    layer = LoRALinearNF4.from_linear(
        nn.Linear(in_features, out_features), r=4, lora_alpha=6, use_rslora=use_rslora, double_quant=double_quant
    )
    nn.init.normal_(layer.lora_B, std=std)
    return layer


def count_calls(monkeypatch, module, names) -> dict[str, int]:
    """{name: calls} of `module`'s functions `names`, counted from now (the functions still run)."""
    calls = dict.fromkeys(names, 0)

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in names:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    return calls
