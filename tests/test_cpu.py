"""The fast CPU paths (torch.compile'd dequantize, chunked matmul) against the torch reference."""

import pytest
import torch

import nf4
import nf4.cpu
from helpers import codes_of, midpoint_probes
from nf4 import reference
from nf4.api import decode_absmax
from nf4.codebook import NF4_CODE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def compiled_cpu(monkeypatch):
    """The compiled CPU path for every size, on the reference side of the dispatch."""
    import nf4.dispatch

    monkeypatch.setattr(nf4.dispatch, "INTERPRET", False)
    monkeypatch.setattr(nf4.cpu, "MIN_NUMEL", 0)
    monkeypatch.setattr(nf4.cpu, "CHUNK", 4096)  # several chunks even for small weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_rounding_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    exponent = torch.randint(-40, 18, (200_000,), generator=g).float()
    sign = torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    values = sign * (torch.rand(200_000, generator=g) + 1) * torch.exp2(exponent)
    grid = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float()
    grid = grid[torch.isfinite(grid)]
    ties = (grid[:-1] + grid[1:]) / 2  # halfway between neighbours (sorted by bits within a sign)
    for v in (values, grid, ties, torch.nextafter(ties, torch.zeros(())), torch.tensor([0.0, -0.0, 1e-45, 3e38])):
        want = v.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        assert torch.equal(nf4.cpu._bits16(v, dtype) & 0xFFFF, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,blocksize,double_quant",
    [((64, 128), 64, True), ((33, 77), 32, False), ((3, 1000), 256, True), ((5, 4096), 4096, True), ((7,), 64, False)],
    ids=["64x128-dq", "33x77-bs32", "3x1000-bs256", "5x4096-bs4096", "7"],
)
def test_compiled_dequantize_is_bit_exact(compiled_cpu, dtype, shape, blocksize, double_quant):
    x = torch.randn(shape) * torch.exp(torch.randn(shape) * 3)
    q = nf4.quantize(x, blocksize, double_quant)
    got = nf4.dequantize(q, dtype)
    want = reference.dequantize_ref(q.packed, decode_absmax(q), blocksize, q.shape, dtype)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_midpoints_round_trip_through_the_cpu_path(compiled_cpu, dtype):
    """The CPU path end to end on scaled values exactly on each NF4 midpoint and one float32 step either
    side (`helpers.midpoint_probes`): `nf4.quantize` gives the format's codes (a tie goes to the lower
    code), and the compiled dequantize gives `NF4[code] * absmax`, rounded once to `dtype`."""
    x, expect = midpoint_probes()
    q = nf4.quantize(x, 64, double_quant=False)
    assert torch.equal(codes_of(q.packed, x.numel()), expect)
    want = (NF4_CODE[expect] * q.absmax.repeat_interleave(64)).to(dtype)
    assert torch.equal(nf4.dequantize(q, dtype).view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_matmul_matches_reference(compiled_cpu, trans, dtype):
    g = torch.Generator().manual_seed(1)
    n, k, m, r = 96, 200, 5, 4  # K not a multiple of the blocksize: chunks start on block boundaries
    q = nf4.quantize(torch.randn(n, k, generator=g), 64)
    in_dim, out_dim = (n, k) if trans else (k, n)
    x = torch.randn(m, in_dim, generator=g).to(dtype)
    u, v = torch.randn(m, r, generator=g), torch.randn(r, out_dim, generator=g)
    bias = torch.randn(out_dim, generator=g)
    mask = torch.rand(m, out_dim, generator=g) > 0.5
    got = nf4.cpu.matmul_cpu(x, q, trans, u, v, bias, mask, 2.0)
    want = reference.matmul_ref(x, nf4.dequantize(q, torch.float32), trans, u, v, bias, mask, 2.0)
    assert got is not None and got.dtype == dtype
    tol = torch.finfo(dtype).eps * want.float().abs().max() * 2 + 1e-5
    assert (got.float() - want.float()).abs().max() <= tol


def test_small_tensors_skip_the_compiler():
    q = nf4.quantize(torch.randn(16, 64))
    assert nf4.cpu.dequantize_cpu(q.packed, decode_absmax(q), q.numel(), 64, torch.float32) is None
    assert nf4.cpu.matmul_cpu(torch.randn(2, 64), q) is None
