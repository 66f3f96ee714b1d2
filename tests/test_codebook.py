"""The code tables: derivations bit for bit against literals and bitsandbytes."""

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch

from nf4.codebook import (
    FP4_CODE,
    NF4_CODE,
    NF4_OFFSET,
    dynamic_map,
    linspace32,
    nearest_thresholds,
    nf4_midpoints,
    normal_float_code,
    normal_float_offset,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_nf4_literals_equal_scipy_derivation_bit_for_bit():
    assert torch.equal(bits(normal_float_code(4)), bits(NF4_CODE))


def test_nf4_equals_bitsandbytes_normal_map():
    bnb = bnbf.create_normal_map()  # 256 entries: the 16 values and 240 padding zeros
    ours_nonzero = NF4_CODE[NF4_CODE != 0]
    assert torch.equal(bits(bnb[bnb != 0]), bits(ours_nonzero))
    assert torch.equal(bits(bnbf.get_4bit_type("nf4", device="cpu")), bits(NF4_CODE))


def test_nf4_table_shape():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])


@pytest.mark.parametrize("k", range(2, 9), ids=lambda k: f"k={k}")
def test_normal_float_family(k):
    code = normal_float_code(k)
    assert code.shape == (2**k,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])
    assert int((code == 0).sum()) == 1
    assert int((code > 0).sum()) == 2 ** (k - 1) and int((code < 0).sum()) == 2 ** (k - 1) - 1
    assert code.max() == 1.0 and code.min() == -1.0


def test_offset_formula_gives_qlora_constant():
    assert round(normal_float_offset(4), 7) == NF4_OFFSET
    assert torch.equal(normal_float_code(4, normal_float_offset(4)).round(decimals=3), NF4_CODE.round(decimals=3))


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4"])
def test_normal_float_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        normal_float_code(bad)


def test_fp4_equals_bitsandbytes():
    assert torch.equal(FP4_CODE, bnbf.get_4bit_type("fp4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    ours = dynamic_map()
    assert torch.equal(bits(ours), bits(bnbf.create_dynamic_map(signed=True)))
    assert ours.shape == (256,) and ours[127] == 0 and ours[255] == 1.0
    assert ours[0] == pytest.approx(-0.99296874) and int((ours < 0).sum()) == 127


@pytest.mark.parametrize("steps", range(2, 20))
@pytest.mark.parametrize("start,end", [(NF4_OFFSET, 0.5), (0.0, 2.506314516067505), (0.1, 1.0)], ids=str)
def test_linspace32_matches_torch(start, end, steps):
    # The NF4 derivation's ranges (and one where two float32 roundings instead of torch's fused
    # multiply-add would be off by an ulp). torch's own rounding elsewhere depends on its SIMD path
    # (see nf4/codebook.py), so this checks the points the codebook uses, not arbitrary inputs.
    ours = torch.from_numpy(linspace32(start, end, steps))
    assert torch.equal(bits(ours), bits(torch.linspace(start, end, steps)))


def test_nf4_midpoints_are_float32_means():
    mids = nf4_midpoints()
    expect = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).numpy()
    assert mids.dtype == torch.float32 and np.array_equal(mids.numpy(), expect)


@pytest.mark.parametrize("table", ["nf4", "dynamic"])
def test_nearest_thresholds_give_exact_nearest_ties_low(table):
    code = NF4_CODE if table == "nf4" else dynamic_map()
    t = nearest_thresholds(code)
    # Random values plus every threshold and its float32 neighbours: the places a rounding slip shows.
    g = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.rand(20000, generator=g) * 2 - 1, t, code])
    probe = torch.cat([probe, torch.nextafter(probe, torch.tensor(2.0)), torch.nextafter(probe, torch.tensor(-2.0))])
    got = torch.searchsorted(t, probe)
    dist = (probe.double()[:, None] - code.double()[None, :]).abs()
    expect = dist.argmin(dim=1)  # argmin returns the first (lower) index on ties
    assert torch.equal(got, expect)
