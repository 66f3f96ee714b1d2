"""Triton quantize/dequantize kernels against the torch reference, bit for bit.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (conftest.py); with one, on
CUDA tensors. The reference always runs on the CPU.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import nf4
from helpers import (
    DTYPES,
    PROBE_ABSMAX,
    blocksizes,
    codes_of,
    data_kinds,
    dtypes,
    make_data,
    midpoint_probes,
    shapes,
    threshold_probes,
)
from nf4 import reference
from nf4.api import decode_absmax
from nf4.codebook import dynamic_map, nearest_thresholds


def quantize_both(x, blocksize, double_quant, device):
    """(kernel NF4Tensor moved to the CPU, reference pieces) for the same input."""
    try:
        q = nf4.quantize(x.to(device), blocksize, double_quant).cpu()
    except ValueError as e:  # only the documented overflow of double-quantizing ~1e38 magnitudes
        assert double_quant and "overflows float32" in str(e), e
        return None, None
    packed, absmax = reference.quantize_ref(x, blocksize)
    ref = {"packed": packed, "absmax": absmax}
    if double_quant:
        offset = reference.absmax_offset(absmax)
        codes, absmax2 = reference.double_quantize_ref(absmax, offset, nearest_thresholds(dynamic_map()))
        ref.update(codes=codes, absmax2=absmax2, offset=offset)
    return q, ref


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@given(
    shape=shapes(max_numel=4000),
    blocksize=blocksizes,
    dtype=dtypes,
    kind=data_kinds,
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_kernel_bit_exact(kernel_device, shape, blocksize, dtype, kind, double_quant, seed):
    x = make_data(shape, dtype, kind, seed, blocksize)
    q, ref = quantize_both(x, blocksize, double_quant, kernel_device)
    assume(q is not None)  # not the documented double-quant overflow of ~1e38 magnitudes
    assert torch.equal(q.packed, ref["packed"])
    if double_quant:
        assert torch.equal(q.absmax, ref["codes"])
        assert torch.equal(bits(q.nested_absmax), bits(ref["absmax2"]))
        assert torch.equal(bits(q.nested_offset), bits(ref["offset"]))
    else:
        assert torch.equal(bits(q.absmax), bits(ref["absmax"]))


@given(
    shape=shapes(max_numel=4000),
    blocksize=blocksizes,
    dtype=dtypes,
    out_dtype=dtypes,
    kind=data_kinds,
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dequantize_kernel_exact(kernel_device, shape, blocksize, dtype, out_dtype, kind, double_quant, seed):
    x = make_data(shape, dtype, kind, seed, blocksize)
    q = nf4.quantize(x, blocksize, double_quant=False)  # CPU: the pieces come from the same place
    if double_quant:
        try:
            q = nf4.quantize(x, blocksize, double_quant=True)
        except ValueError as e:
            assert "overflows float32" in str(e)
            assume(False)  # the documented double-quant overflow: nothing to dequantize
    out = nf4.dequantize(q.to(kernel_device), out_dtype).cpu()
    expect = reference.dequantize_ref(q.packed, decode_absmax(q), blocksize, q.shape, out_dtype)
    assert out.dtype == out_dtype and out.shape == x.shape
    assert torch.equal(out.view(torch.uint8), expect.view(torch.uint8))


@pytest.mark.parametrize("blocksize", [64, 128, 4096], ids=lambda b: f"bs={b}")
def test_quantize_kernel_on_midpoints_and_their_neighbours(kernel_device, blocksize):
    """Scaled values exactly on each NF4 midpoint go to the lower code, one float32 step above to the
    upper (`helpers.midpoint_probes`): the kernel's codes and absmax equal the format's and the
    reference's bit for bit, in blocks whose absmax is 1, 3, tiny and huge (pre-scaled)."""
    from nf4.kernels import quantize_nf4

    x, expect = midpoint_probes()
    if blocksize > 64:  # the same values, each probe block padded with zeros to the blocksize
        x = torch.nn.functional.pad(x.view(-1, 64), (0, blocksize - 64)).reshape(-1)
        expect = torch.nn.functional.pad(expect.view(-1, 64), (0, blocksize - 64), value=7).reshape(-1)
    packed, absmax = quantize_nf4(x.to(kernel_device), blocksize)
    packed, absmax = packed.cpu(), absmax.cpu()
    assert torch.equal(codes_of(packed, x.numel()), expect)
    assert torch.equal(absmax, torch.tensor([abs(a) for a in PROBE_ABSMAX], dtype=torch.float32))
    ref_packed, ref_absmax = reference.quantize_ref(x, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(bits(absmax), bits(ref_absmax))


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 255, 257, 4095, 4097], ids=lambda n: f"n={n}")
@pytest.mark.parametrize("blocksize", [32, 64, 4096], ids=lambda b: f"bs={b}")
def test_partial_blocks_and_odd_counts(kernel_device, n, blocksize):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    q, ref = quantize_both(x, blocksize, True, kernel_device)
    assert torch.equal(q.packed, ref["packed"]) and torch.equal(q.absmax, ref["codes"])
    if n % 2:
        assert q.packed[-1, 0] & 15 == 7  # the pad nibble is the code of 0.0
    out = nf4.dequantize(q.to(kernel_device)).cpu()
    assert torch.equal(out, reference.dequantize_ref(ref["packed"], decode_absmax(q), blocksize, x.shape, x.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_tensor(kernel_device, dtype):
    x = torch.zeros(3, 100, dtype=dtype, device=kernel_device)
    q = nf4.quantize(x, 64)
    assert torch.all(q.packed.cpu() == 0x77)
    assert torch.all(decode_absmax(q).cpu() == 0)
    assert torch.equal(nf4.dequantize(q).cpu(), torch.zeros(3, 100, dtype=dtype))


def test_bf16_output_rounds_to_nearest_even(kernel_device):
    # Products whose float32 value lies just above and below bf16 rounding ties.
    x = torch.linspace(-3, 3, 4096, dtype=torch.float32) * 1.0001
    q = nf4.quantize(x.to(kernel_device), 64, double_quant=False)
    out = nf4.dequantize(q, torch.bfloat16).cpu()
    fp32 = reference.dequantize_ref(q.cpu().packed, q.cpu().absmax, 64, x.shape, torch.float32)
    assert torch.equal(out, fp32.to(torch.bfloat16))
    assert not torch.equal(out, (fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))


@pytest.mark.parametrize("nblocks", [1, 2, 255, 256, 257, 700], ids=lambda n: f"nblocks={n}")
def test_absmax_kernel_matches_reference(kernel_device, nblocks):
    from nf4.kernels import quantize_absmax

    g = torch.Generator().manual_seed(nblocks)
    absmax = torch.rand(nblocks, generator=g) * torch.exp(torch.randn(nblocks, generator=g))
    offset = reference.absmax_offset(absmax)
    t = nearest_thresholds(dynamic_map())
    codes, absmax2 = quantize_absmax(absmax.to(kernel_device), offset.to(kernel_device), t.to(kernel_device))
    ref_codes, ref_absmax2 = reference.double_quantize_ref(absmax, offset, t)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax2.cpu(), ref_absmax2)


def test_absmax_kernel_on_thresholds_and_their_neighbours(kernel_device):
    """Double quantization rounds to the exact nearest map entry, a tie to the lower one: values exactly
    on each threshold and one float32 step either side (`helpers.threshold_probes`, offset 0) get the
    format's codes from the kernel, bit for bit with the reference."""
    from nf4.kernels import quantize_absmax

    y, expect = threshold_probes()
    offset = torch.zeros((), dtype=torch.float32)
    t = nearest_thresholds(dynamic_map())
    codes, absmax2 = quantize_absmax(y.to(kernel_device), offset.to(kernel_device), t.to(kernel_device))
    assert torch.equal(codes.cpu().long(), expect) and torch.equal(absmax2.cpu(), torch.ones(3))
    ref_codes, ref_absmax2 = reference.double_quantize_ref(y, offset, t)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax2.cpu(), ref_absmax2)


def test_bucket_table_counts_midpoints_exactly():
    """The quantize kernel's code of a scaled value xs, `base[r] + (xs > mid[r])` with r the bucket of
    RN(16 * xs + 16) (`nf4.kernels.quantize.bucket_table`), equals the number of NF4 midpoints strictly
    below xs for every float32 in [-1 - 2**-20, 1 + 2**-20]. Both sides are step functions that change
    only at the midpoints (the count) and the bucket edges (r), so checking every float32 within 64 ulps
    of each of them, and one value inside every interval between them, checks every float32."""
    import numpy as np

    from nf4.codebook import nf4_midpoints
    from nf4.kernels.quantize import BUCKET_MAGIC, bucket_table

    mids = nf4_midpoints().numpy()
    edges = (np.arange(34, dtype=np.float64) - 16.5) / 16
    points = np.sort(np.concatenate([mids.astype(np.float64), edges, [-1.0, 0.0, 1.0]]))
    probes = [np.float32(p) for p in points]
    near = []
    for p in probes:
        up = down = p
        for _ in range(64):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            near += [up, down]
    between = ((points[:-1] + points[1:]) / 2).astype(np.float32)
    xs = np.array(probes + near + list(between), dtype=np.float32)
    xs = xs[np.abs(xs) <= 1 + 2**-20]
    assert xs.size > 5000

    v = (xs * np.float32(16) + np.float32(BUCKET_MAGIC.value)).astype(np.float32)  # 16 * xs is exact
    entry = bucket_table().numpy()[v.view(np.int32) & 63]
    mid = (entry & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    codes = (entry >> 32) + (xs > mid)
    expected = np.searchsorted(mids, xs, side="left")  # midpoints strictly below xs
    assert np.array_equal(codes, expected), xs[codes != expected][:10]
