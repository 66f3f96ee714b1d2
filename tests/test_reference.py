"""The torch reference against bitsandbytes 0.50.2 (CPU) and against the format's error bounds."""

import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import DTYPES, blocksizes, codes_of, dtypes, make_data, midpoint_probes, shapes, threshold_probes
from nf4 import reference
from nf4.codebook import FP4_CODE, NF4_CODE, dynamic_map, nearest_thresholds


def bnb_quantize(x, blocksize, double_quant):
    return bnbf.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def ref_double_quant(absmax):
    offset = reference.absmax_offset(absmax)
    codes, absmax2 = reference.double_quantize_ref(absmax, offset, nearest_thresholds(dynamic_map()))
    return codes, absmax2, offset


@given(shape=shapes(max_numel=20000), blocksize=blocksizes, dtype=dtypes, seed=st.integers(0, 2**16))
def test_packed_and_absmax_bit_exact_with_bitsandbytes(shape, blocksize, dtype, seed):
    x = make_data(shape, dtype, "normal", seed, blocksize)
    packed, absmax = reference.quantize_ref(x, blocksize)
    bnb_packed, state = bnb_quantize(x, blocksize, double_quant=False)
    assert torch.equal(packed, bnb_packed)
    assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32))


def test_midpoints_and_their_neighbours_bit_exact_with_bitsandbytes():
    """A scaled value exactly on an NF4 midpoint gets the lower code, the next float32 up the upper one
    (`helpers.midpoint_probes`: absmax 1, 3, tiny, huge): the reference gives the format's codes, and
    bitsandbytes the same bytes."""
    x, expect = midpoint_probes()
    packed, absmax = reference.quantize_ref(x, 64)
    assert torch.equal(codes_of(packed, x.numel()), expect)
    bnb_packed, state = bnb_quantize(x, 64, double_quant=False)
    assert torch.equal(packed, bnb_packed) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("blocksize", [64, 256], ids=lambda b: f"bs={b}")
@pytest.mark.parametrize("kind", ["zero_blocks", "scales"])
def test_special_data_bit_exact_with_bitsandbytes(blocksize, kind):
    x = make_data((96, 200), torch.float32, kind, seed=1, blocksize=blocksize)
    packed, absmax = reference.quantize_ref(x, blocksize)
    bnb_packed, state = bnb_quantize(x, blocksize, double_quant=False)
    assert torch.equal(packed, bnb_packed) and torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(256, 512), (1000, 333), (4096, 64), (4096, 4096)], ids=lambda s: "x".join(map(str, s))
)
def test_nested_codes_against_bitsandbytes_and_exact_nearest(shape, dtype):
    x = make_data(shape, dtype, "normal", seed=2)
    _, absmax = reference.quantize_ref(x, 64)
    codes, absmax2, offset = ref_double_quant(absmax)
    _, state = bnb_quantize(x, 64, double_quant=True)
    assert offset.item() == state.offset.item()
    assert torch.equal(absmax2, state.state2.absmax)
    # bitsandbytes' CPU build looks codes up in an approximate 65536-entry table over [-1, 1]: about
    # 0.2% of its codes differ from the exact nearest entry, by one step, or by a few steps near zero
    # where the map's entries are closer together than the table's 2/65536 resolution. Where the two
    # differ, ours is nearer the value and theirs within that resolution of ours.
    code_map = dynamic_map()
    differ = codes != state.absmax
    assert differ.float().mean() < 0.005
    v = reference.unit_scale(
        torch.nn.functional.pad(absmax - offset, (0, -absmax.numel() % 256)).view(-1, 256), absmax2
    ).reshape(-1)[: absmax.numel()]
    ours_map, theirs_map = code_map[codes.long()][differ], code_map[state.absmax.long()][differ]
    assert torch.all((v[differ] - ours_map).abs() <= (v[differ] - theirs_map).abs())
    steps = (codes.int() - state.absmax.int())[differ].abs()
    assert torch.all((steps <= 1) | ((ours_map - theirs_map).abs() <= 2 / 65536))
    # Ours is the exact nearest map entry, ties to the lower one.
    code_map = code_map.double()
    y = (absmax - offset).double()
    scale = absmax2.double().repeat_interleave(256)[: y.numel()]
    exact = ((y / scale)[:, None] - code_map[None, :]).abs().argmin(dim=1)
    v32 = reference.unit_scale(
        torch.nn.functional.pad(absmax - offset, (0, -absmax.numel() % 256)).view(-1, 256), absmax2
    )
    exact32 = ((v32.reshape(-1)[: y.numel()].double()[:, None] - code_map[None, :]).abs()).argmin(dim=1)
    assert torch.equal(codes.long(), exact32)
    assert (codes.long() - exact).abs().max() <= 1  # float32 scaling can move a value by an ulp


def test_dequantize_ref_matches_bitsandbytes_where_bnb_is_right():
    # bnb's CPU dequantize is wrong when shape[-1] % 16 == 0 and shape[-1] % blocksize != 0 (AVX-512
    # path); these shapes avoid that case.
    for shape, blocksize, dtype in [
        ((64, 128), 64, torch.bfloat16),
        ((33, 50), 32, torch.float16),
        ((7, 4096), 4096, torch.float32),
    ]:
        x = make_data(shape, dtype, "normal", seed=3, blocksize=blocksize)
        packed, absmax = reference.quantize_ref(x, blocksize)
        ours = reference.dequantize_ref(packed, absmax, blocksize, x.shape, dtype)
        bnb_packed, state = bnb_quantize(x, blocksize, double_quant=False)
        theirs = bnbf.dequantize_4bit(bnb_packed, state, quant_type="nf4")
        assert torch.equal(ours, theirs), (shape, blocksize, dtype)


@given(shape=shapes(max_numel=5000), blocksize=blocksizes, dtype=dtypes, seed=st.integers(0, 2**16))
def test_dequantize_is_the_formula(shape, blocksize, dtype, seed):
    x = make_data(shape, dtype, "scales", seed, blocksize)
    packed, absmax = reference.quantize_ref(x, blocksize)
    out = reference.dequantize_ref(packed, absmax, blocksize, x.shape, dtype)
    n = x.numel()
    flat = packed.view(-1)
    codes = torch.stack([flat >> 4, flat & 15], 1).view(-1)[:n].long()
    block = torch.arange(n) // blocksize
    expect = (NF4_CODE[codes] * absmax[block]).to(dtype).reshape(shape)
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(out, expect)


def local_gap(code: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Half the distance to the farther neighbour of each code: the most any value mapped there is off."""
    lower = torch.where(index > 0, code[index] - code[(index - 1).clamp(min=0)], torch.zeros(()))
    upper = torch.where(
        index < len(code) - 1, code[(index + 1).clamp(max=len(code) - 1)] - code[index], torch.zeros(())
    )
    return torch.maximum(lower, upper) / 2


@given(shape=shapes(max_numel=20000), blocksize=blocksizes, dtype=dtypes, seed=st.integers(0, 2**16))
def test_error_bound_half_the_local_code_gap(shape, blocksize, dtype, seed):
    x = make_data(shape, dtype, "scales", seed, blocksize)
    packed, absmax = reference.quantize_ref(x, blocksize)
    out = reference.dequantize_ref(packed, absmax, blocksize, x.shape, torch.float32).reshape(-1)
    n = x.numel()
    codes = reference.unpack_nibbles(packed, n)
    scale = absmax[torch.arange(n) // blocksize]
    bound = local_gap(NF4_CODE, codes) * scale
    err = (out - x.reshape(-1).float()).abs()
    # + a few float32 ulps of the block scale for the scaling and the product's rounding
    assert torch.all(err <= bound * (1 + 1e-6) + 4 * torch.finfo(torch.float32).eps * scale)


@pytest.mark.parametrize("nblocks", [1, 255, 256, 1000, 5000], ids=lambda n: f"nblocks={n}")
def test_double_quantized_absmax_within_map_resolution(nblocks):
    g = torch.Generator().manual_seed(nblocks)
    absmax = torch.rand(nblocks, generator=g) * 3 + 0.01
    codes, absmax2, offset = ref_double_quant(absmax)
    code_map = dynamic_map()
    decoded = reference.dequantize_absmax_ref(codes, absmax2, offset, code_map)
    scale = absmax2.repeat_interleave(256)[:nblocks]
    bound = local_gap(code_map, codes.long()) * scale
    assert torch.all((decoded - absmax).abs() <= bound * (1 + 1e-5) + 1e-6 * absmax)
    # The map's coarsest step, near |v| = 1, is 0.9 / 64: half of it bounds the error relative to each
    # 256-block's range max |absmax - offset|.
    assert torch.all((decoded - absmax).abs() <= (0.9 / 64 / 2) * scale * (1 + 1e-5) + 1e-6 * absmax)


def test_nested_codes_on_thresholds_and_their_neighbours():
    """Values exactly on each threshold of the 256-entry map go to the lower entry (the exact nearest,
    ties low), one float32 step above to the upper (`helpers.threshold_probes`)."""
    y, expect = threshold_probes()
    codes, absmax2 = reference.double_quantize_ref(y, torch.zeros(()), nearest_thresholds(dynamic_map()))
    assert torch.equal(codes.long(), expect) and torch.equal(absmax2, torch.ones(3))


def test_decode_formula_rounds_twice():
    codes = torch.tensor([3, 200, 127], dtype=torch.uint8)
    absmax2 = torch.tensor([0.37], dtype=torch.float32)
    offset = torch.tensor(1.1, dtype=torch.float32)
    code_map = dynamic_map()
    got = reference.dequantize_absmax_ref(codes, absmax2, offset, code_map)
    for i, q in enumerate(codes.tolist()):
        prod = code_map[q] * absmax2[0]  # a float32 product...
        assert got[i] == prod + offset  # ...then a float32 sum, not one fused rounding


def mse_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> float:
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    scaled = blocks / absmax
    nearest = (scaled[..., None] - code).abs().argmin(-1)
    return float(((code[nearest] * absmax - blocks) ** 2).mean())


def test_nf4_error_below_fp4_and_int4_on_normal_data():
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    packed, absmax = reference.quantize_ref(x, 64)
    nf4_mse = float(((reference.dequantize_ref(packed, absmax, 64, x.shape, torch.float32) - x) ** 2).mean())
    int4 = torch.arange(-7, 8, dtype=torch.float32) / 7  # symmetric 4-bit integer absmax quantization
    fp4_mse, int4_mse = mse_blockwise(x, FP4_CODE), mse_blockwise(x, int4)
    assert nf4_mse < fp4_mse and nf4_mse < int4_mse, (nf4_mse, fp4_mse, int4_mse)
    assert math.isclose(nf4_mse, mse_blockwise(x, NF4_CODE), rel_tol=1e-3)


@pytest.mark.parametrize("value", [1e-40, 1e-44, 3e-39, 1e-30, 1e30, 3e38], ids=lambda v: f"{v:g}")
def test_extreme_block_magnitudes_quantize_like_unit_data(value):
    # A block scaled by any finite factor keeps its codes: power-of-two pre-scaling avoids 1/absmax
    # overflowing to inf (subnormal absmax) or underflowing to a subnormal (huge absmax).
    unit = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.07, -0.9, 0.6, -1.0])
    scale = value / unit.abs().max()
    x = (unit * scale).to(torch.float32)
    packed, absmax = reference.quantize_ref(x, 32)
    ref_packed, _ = reference.quantize_ref(x / scale * 1.0, 32)
    codes = reference.unpack_nibbles(packed, 8)
    assert absmax.item() == x.abs().max().item()
    assert torch.isfinite(reference.dequantize_ref(packed, absmax, 32, x.shape, torch.float32)).all()
    if value >= 1e-38:  # normal float32: the scaled data is the same up to rounding
        assert torch.equal(packed, ref_packed)
    assert codes[3] == 7 and codes[0] == 15 and codes[7] == 0


def _exact_mean_f32(values: torch.Tensor) -> float:
    """The mean of float32 `values`: their exact sum rounded to float64 (math.fsum), / n, then float32."""
    return float(torch.tensor(math.fsum(values.double().tolist()) / values.numel(), dtype=torch.float32))


@pytest.mark.parametrize("n", [1, 255, 4096, 100_003], ids=lambda n: f"nblocks={n}")
def test_offset_is_the_exact_mean_whatever_the_order_of_the_blocks(n):
    """benchmarks/results/2026-11-29-h200/README.md, finding 2: a float32 mean depends on the
    reduction order (CPU and CUDA stored different offsets for one weight). The offset must be a
    function of the set of absmax values."""
    g = torch.Generator().manual_seed(n)
    absmax = torch.rand(n, generator=g) * 3 + 0.01
    offset = reference.absmax_offset(absmax)
    assert offset.dtype == torch.float32 and offset.shape == ()
    assert offset.item() == _exact_mean_f32(absmax)
    for seed in range(4):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(reference.absmax_offset(absmax[perm]).view(torch.int32), offset.view(torch.int32))
    if n == 100_003:  # this input does move a float32 mean with the order: the test bites
        means = {absmax[torch.randperm(n, generator=torch.Generator().manual_seed(s))].mean().item() for s in range(8)}
        assert len(means) > 1


@given(seed=st.integers(0, 2**16), n=st.integers(1, 3000), spread=st.sampled_from([1.0, 1e3, 1e30]))
def test_offset_is_order_independent_for_any_spread(seed, n, spread):
    g = torch.Generator().manual_seed(seed)
    absmax = (torch.rand(n, generator=g) * torch.exp(torch.randn(n, generator=g) * math.log(spread) / 4)).float()
    offset = reference.absmax_offset(absmax)
    perm = torch.randperm(n, generator=g)
    assert torch.equal(reference.absmax_offset(absmax[perm]).view(torch.int32), offset.view(torch.int32))
    assert torch.isfinite(offset) and absmax.min() <= offset <= absmax.max()
    if spread == 1.0:
        assert offset.item() == _exact_mean_f32(absmax)


def test_offset_of_extreme_absmax_is_finite():
    big = torch.full((1000,), torch.finfo(torch.float32).max)
    assert reference.absmax_offset(big).item() == torch.finfo(torch.float32).max
    assert reference.absmax_offset(torch.zeros(7)).item() == 0.0
    tiny = torch.full((5,), 1e-45)
    assert reference.absmax_offset(tiny).item() == torch.tensor(1e-45).item()


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 12289])
def test_quantize_in_chunks_equals_one_piece(monkeypatch, n, blocksize):
    """`quantize_ref` works through the tensor in chunks: the bytes do not depend on where they fall."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.linspace(0.1, 10, n)
    whole = reference.quantize_ref(x, blocksize)
    monkeypatch.setattr(reference, "QUANT_CHUNK", 4096)
    chunked = reference.quantize_ref(x, blocksize)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
