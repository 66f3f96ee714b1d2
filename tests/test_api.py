"""The public quantize / dequantize: both paths agree, bad input is refused clearly, inputs untouched."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nf4
from helpers import blocksizes, data_kinds, dtypes, make_data, nf4_error_bound, shapes
from nf4.api import decode_absmax


def pieces(q):
    return {k: v for k, v in q._tensors().items()}


@given(
    shape=shapes(max_numel=3000),
    blocksize=blocksizes,
    dtype=dtypes,
    kind=data_kinds,
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_and_kernel_paths_agree(shape, blocksize, dtype, kind, double_quant, seed):
    import nf4.dispatch

    x = make_data(shape, dtype, kind, seed, blocksize)
    results = []
    for interpret in (False, True):
        nf4.dispatch.INTERPRET, saved = interpret if not torch.cuda.is_available() else False, nf4.dispatch.INTERPRET
        try:
            results.append(nf4.quantize(x, blocksize, double_quant))
        except ValueError as e:
            assert double_quant and "overflows float32" in str(e)
            results.append(None)
        finally:
            nf4.dispatch.INTERPRET = saved
    ref, ker = results
    if ref is None:
        assert ker is None
        return
    for name, t in pieces(ref).items():
        assert torch.equal(t, pieces(ker)[name]), name
    out = nf4.dequantize(ref)
    assert torch.equal(out, nf4.dequantize(ker))
    assert torch.all((out.double() - x.double()).abs() <= nf4_error_bound(x, blocksize, double_quant))


def test_public_reference_path_round_trip(reference_path):
    x = torch.randn(40, 70, dtype=torch.bfloat16)
    q = nf4.quantize(x)
    out = nf4.dequantize(q)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert nf4.dequantize(q, torch.float32).dtype == torch.float32
    assert torch.all((out.double() - x.double()).abs() <= nf4_error_bound(x, 64, double_quant=True))


@pytest.mark.parametrize(
    "tensor,message",
    [
        (torch.arange(64, dtype=torch.int32), "must be float32, float16 or bfloat16, got torch.int32"),
        (torch.zeros(64, dtype=torch.uint8), "got torch.uint8"),
        (torch.zeros(64, dtype=torch.float64), r"got torch.float64 \(convert with .float\(\) first\)"),
        (torch.zeros(64, dtype=torch.complex64), "got torch.complex64"),
    ],
    ids=["int32", "uint8", "float64", "complex64"],
)
def test_bad_dtype(tensor, message):
    with pytest.raises(TypeError, match=message):
        nf4.quantize(tensor)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        nf4.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="expects an NF4Tensor"):
        nf4.dequantize(torch.zeros(3))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"], ids=repr)
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.quantize(torch.randn(128), blocksize)


def test_empty_tensor():
    with pytest.raises(ValueError, match=r"cannot quantize an empty tensor \(shape \[0, 5\]\)"):
        nf4.quantize(torch.zeros(0, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "bad,message",
    [
        (float("nan"), r"1 NaN and 0 inf, the first at index \(2, 5\)"),
        (float("inf"), r"0 NaN and 1 inf, the first at index \(2, 5\)"),
        (float("-inf"), r"0 NaN and 1 inf"),
    ],
    ids=["nan", "inf", "-inf"],
)
def test_non_finite_values_are_refused(dtype, bad, message):
    x = torch.randn(4, 100).to(dtype)
    x[2, 5] = bad
    for double_quant in (True, False):
        with pytest.raises(ValueError, match=message):
            nf4.quantize(x, 64, double_quant)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_bad_dequantize_dtype(dtype):
    q = nf4.quantize(torch.randn(64))
    with pytest.raises(TypeError, match="dequantize: dtype must be float32, float16 or bfloat16"):
        nf4.dequantize(q, dtype)


@pytest.mark.parametrize("view", ["transpose", "slice", "expand"])
def test_views_quantize_like_their_contiguous_copy(view):
    base = torch.randn(48, 80, dtype=torch.float16)
    x = {"transpose": base.t(), "slice": base[::2, 3:70], "expand": base[:1].expand(5, 80)}[view]
    assert not x.is_contiguous()
    a, b = nf4.quantize(x), nf4.quantize(x.contiguous())
    assert a.shape == x.shape
    for name, t in pieces(a).items():
        assert torch.equal(t, pieces(b)[name]), name


def test_caller_tensor_is_not_modified_and_grad_is_ignored():
    x = torch.randn(33, 65, requires_grad=True)
    before = x.detach().clone()
    q = nf4.quantize(x)
    out = nf4.dequantize(q)
    assert torch.equal(x.detach(), before) and not out.requires_grad
    packed_before = q.packed.clone()
    nf4.dequantize(q, torch.float16)
    assert torch.equal(q.packed, packed_before)


def test_scalar_tensor():
    q = nf4.quantize(torch.tensor(3.0))
    assert q.shape == (1,) and nf4.dequantize(q).item() == 3.0


def test_extreme_magnitudes_round_trip():
    for scale in (1e-40, 1e-30, 1e30, 1e38):
        x = torch.tensor([1.0, -0.5, 0.25, 0.0] * 16) * scale
        for double_quant in (False, True):
            out = nf4.dequantize(nf4.quantize(x, 64, double_quant))
            assert torch.isfinite(out).all()
            assert torch.all((out.double() - x.double()).abs() <= nf4_error_bound(x, 64, double_quant)), scale


def test_double_quant_overflow_is_refused_not_garbage():
    x = torch.full((64 * 4,), 3.0e38)
    x[64:] = 1e-3  # offset ~ 7.5e37; a block at 3e38 still decodes finitely here
    nf4.quantize(x)
    y = torch.tensor([3.3e38] * 64 * 3 + [0.0] * 64)  # offset near 2.5e38, range needs 3.3e38 + ...
    try:
        q = nf4.quantize(y)
    except ValueError as e:
        assert "use double_quant=False" in str(e) or "double_quant=False" in str(e)
    else:
        assert torch.isfinite(decode_absmax(q)).all()
    assert torch.isfinite(nf4.dequantize(nf4.quantize(y, double_quant=False))).all()


def test_import_is_lean():
    code = (
        "import sys, nf4, torch; q = nf4.quantize(torch.randn(64)); nf4.dequantize(q);"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert not torch.cuda.is_initialized(), 'cuda initialised'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
