"""`nf4.lora.lora_linear` and its autograd function (lora/functional.py) over the custom op (lora/ops.py):
forward and gradients against a float64 reference, dropout, bad input, eager vs traced calls, in-place
use of the output."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nf4
from helpers import (
    DTYPES,
    assert_linear_within_float32,
    trained_layer,
)
from nf4.lora import (
    LinearNF4,
    LoRALinearNF4,
    lora_linear,
)
from nf4.lora.functional import LoRALinearFunction


def reference_forward(x, q, a, b, bias, scaling, mask, keep):
    """The formula in float64 with torch autograd: the oracle for the values and all gradients."""
    w = nf4.dequantize(q, torch.float32).double()
    xd = x if mask is None else x * mask * keep
    y = x @ w.t()
    if a is not None:
        y = y + scaling * (xd @ a.t()) @ b.t()
    if bias is not None:
        y = y + bias
    return y


def run_op(x, q, a, b, bias, scaling, mask, keep):
    """The autograd function itself, with a given dropout mask (`lora_linear` draws its own)."""
    return LoRALinearFunction.apply(x, q, a, b, bias, scaling, mask, keep)


def leaf(t, device, dtype=None):
    return None if t is None else t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_(True)


def tolerance(dtype, scale):
    """Errors torch itself makes in `dtype`: a few ulps per output, growing with the reduction size."""
    return 8 * torch.finfo(dtype).eps * scale + 1e-6


@given(
    lead=st.sampled_from([(1,), (5,), (2, 3), (2, 1, 4)]),
    n=st.integers(1, 48),
    k=st.integers(1, 100),
    r=st.sampled_from([0, 1, 4, 16]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients(kernel_device, lead, n, k, r, dtype, bias, dropout, seed):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), 64)
    x = torch.randn(*lead, k, generator=g)
    a = torch.randn(r, k, generator=g) / math.sqrt(k) if r else None
    b = torch.randn(n, r, generator=g) if r else None
    bias_t = torch.randn(n, generator=g) if bias else None
    mask = (torch.rand(*lead, k, generator=g) > 0.25) if dropout and r else None
    keep = 1 / 0.75 if mask is not None else 1.0
    dy = torch.randn(*lead, n, generator=g)

    d = kernel_device
    xs, as_, bs, biass = leaf(x, d, dtype), leaf(a, d), leaf(b, d), leaf(bias_t, d)
    y = run_op(xs, q.to(d), as_, bs, biass, 1.5, None if mask is None else mask.to(d), keep)
    y.backward(dy.to(d, dtype))

    xr, ar, br, biasr = (
        leaf(x, "cpu", torch.float64),
        leaf(a, "cpu", torch.float64),
        leaf(b, "cpu", torch.float64),
        leaf(bias_t, "cpu", torch.float64),
    )
    yr = reference_forward(xr, q, ar, br, biasr, 1.5, mask, keep)
    yr.backward(dy.double())

    assert y.dtype == dtype and y.shape == (*lead, n)
    assert (y.cpu().double() - yr).abs().max() <= tolerance(dtype, yr.abs().max().item() + 1)
    assert (xs.grad.cpu().double() - xr.grad).abs().max() <= tolerance(dtype, xr.grad.abs().max().item() + 1)
    if r:
        # adapter gradients are computed in float32 from activations in `dtype`
        for got, want in ((as_.grad, ar.grad), (bs.grad, br.grad)):
            assert got.dtype == torch.float32
            assert (got.cpu().double() - want).abs().max() <= tolerance(dtype, want.abs().max().item() + 1) * 4
    if bias:
        assert (biass.grad.cpu().double() - biasr.grad).abs().max() <= tolerance(
            dtype, biasr.grad.abs().max().item() + 1
        )


def test_gradcheck_float64_reference_path(reference_path):
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(6, 10, generator=g), 32)
    x = torch.randn(3, 10, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 10, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 10, generator=g) > 0.5
    assert torch.autograd.gradcheck(lambda x, a, b, bias: run_op(x, q, a, b, bias, 0.7, mask, 2.0), (x, a, b, bias))
    assert torch.autograd.gradcheck(lambda x, bias: run_op(x, q, None, None, bias, 1.0, None, 1.0), (x, bias))


def test_weight_gets_no_gradient_and_no_dequantized_copy_is_saved(reference_path):
    layer = LoRALinearNF4.from_linear(nn.Linear(64, 32), r=4)
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = layer(x)
    assert not any(t.dtype.is_floating_point and t.shape == (32, 64) for t in saved)
    y.sum().backward()
    assert all(not b.requires_grad for b in layer.buffers())


def test_dropout_keeps_with_probability_1_minus_p_and_rescales_by_its_inverse(kernel_device):
    """Training mode with lora_dropout p: the adapter's input is x * keep / (1 - p), keep ~ U[0, 1) >= p
    drawn from torch's generator (PEFT's nn.Dropout semantics); reproduced here from the same seed, the
    output and the adapter's gradients match the float64 formula."""
    p = 0.25
    layer = trained_layer(48, 24, use_rslora=False).to(kernel_device).train()
    layer.lora_dropout = p
    x = torch.randn(6, 48, device=kernel_device)
    torch.manual_seed(7)
    y = layer(x)
    y.square().sum().backward()
    torch.manual_seed(7)
    keep = (torch.rand(x.shape, device=kernel_device) >= p).cpu()
    assert 0 < keep.float().mean() < 1
    a, b = (leaf(t, "cpu", torch.float64) for t in (layer.lora_A, layer.lora_B))
    bias = layer.bias.cpu().double()
    exact = reference_forward(x.cpu().double(), layer.nf4_weight.cpu(), a, b, bias, 1.5, keep, 1 / (1 - p))
    exact.square().sum().backward()
    assert (y.detach().cpu().double() - exact).abs().max() <= tolerance(torch.float32, exact.abs().max().item() + 1)
    for got, want in ((layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert (got.cpu().double() - want).abs().max() <= tolerance(torch.float32, want.abs().max().item() + 1) * 4


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("x", ValueError, r"expected input \[\.\.\., 40\], got \[3, 39\] \(the weight is \[12, 40\]\)"),
        ("lora_A", ValueError, r"expected lora_A \[r, 40\] and lora_B \[12, r\], got \[2, 39\] and \[12, 2\]"),
        ("lora_B", ValueError, r"expected lora_A \[r, 40\] and lora_B \[12, r\], got \[2, 40\] and \[12, 3\]"),
        ("one_of_two", ValueError, "pass lora_A and lora_B together"),
        ("bias", ValueError, r"expected bias \[12\], got \[13\]"),
        ("weight", TypeError, "weight must be an NF4Tensor"),
    ],
)
def test_functional_bad_input_names_the_argument(case, error, message):
    q = nf4.quantize(torch.randn(12, 40))
    args = dict(x=torch.randn(3, 40), weight=q, lora_A=torch.randn(2, 40), lora_B=torch.randn(12, 2))
    args.update(
        {
            "x": dict(x=torch.randn(3, 39)),
            "lora_A": dict(lora_A=torch.randn(2, 39)),
            "lora_B": dict(lora_B=torch.randn(12, 3)),
            "one_of_two": dict(lora_B=None),
            "bias": dict(bias=torch.randn(13)),
            "weight": dict(weight=torch.randn(12, 40)),
        }[case]
    )
    with pytest.raises(error, match=message):
        lora_linear(**args)


def test_functional_api(kernel_device):
    q = nf4.quantize(torch.randn(12, 40)).to(kernel_device)
    x = torch.randn(3, 40, device=kernel_device)
    a, b = torch.randn(2, 40, device=kernel_device), torch.randn(12, 2, device=kernel_device)
    y = lora_linear(x, q, a, b, scaling=0.5)
    assert_linear_within_float32(y, x, nf4.dequantize(q).double(), None, a, b, scaling=0.5)


class _SeenOps(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python modes (and runs them unchanged)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("m", [1, 40], ids=["decode", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_calls_match_the_custom_ops(kernel_device, monkeypatch, m, dtype):
    """Plain eager calls run the op's body directly (no dispatcher wrapping: `nf4.lora.ops.eager`); with a
    dispatch mode active (what fake tensors, make_fx and export use) the same calls go through the
    `nf4::matmul` custom op. Both give bit-identical outputs and gradients."""
    torch.manual_seed(0)
    layer = LoRALinearNF4.from_linear(nn.Linear(96, 80, dtype=dtype), r=8).to(kernel_device)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(m, 96, dtype=dtype, device=kernel_device)

    def run():
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.float().square().sum().backward()
        with torch.no_grad():
            y_inference = layer(x)
        return y, y_inference, xg.grad, layer.lora_A.grad, layer.lora_B.grad

    def not_called(*args, **kwargs):
        raise AssertionError("a plain eager call went through the custom op")

    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.nf4, "matmul", not_called)
        direct = run()
    mode = _SeenOps()
    with mode:
        through_ops = run()
    assert "nf4.matmul" in mode.ops, mode.ops
    for a, b in zip(direct, through_ops, strict=True):
        assert torch.equal(a, b)


def test_inference_leaves_the_adapter_product_to_the_decode_kernel(kernel_device, monkeypatch):
    """An eager no-grad call at M <= 16 with 16-bit x hands lora_A itself (float32, not cast) to the decode
    kernel, which computes x @ A^T in its streaming pass: no separate GEMV or cast per call."""
    from nf4.kernels import gemv

    seen = []
    launch = gemv.launch

    def recording(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("a"))
        return launch(*args, **kwargs)

    monkeypatch.setattr(gemv, "launch", recording)
    torch.manual_seed(0)
    layer = LoRALinearNF4.from_linear(nn.Linear(128, 96, dtype=torch.bfloat16), r=8).to(kernel_device)
    nn.init.normal_(layer.lora_B, std=0.5)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=kernel_device)
    with torch.no_grad():
        y = layer(x)
    assert len(seen) == 1 and seen[0] is layer.lora_A
    q = layer.nf4_weight
    exact = reference_forward(x.double(), q, layer.lora_A.double(), layer.lora_B.double(), layer.bias.double(),
                              layer.scaling, None, 1.0)  # fmt: skip
    assert (y.double() - exact).abs().max() <= 4 * torch.finfo(torch.bfloat16).eps * exact.abs().max()


def _in_place(y):
    y += 1
    return nn.functional.relu(y, inplace=True)


def _out_of_place(y):
    return nn.functional.relu(y + 1)


@pytest.mark.parametrize("path", ["eager", "op", "compiled"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("cls", [LinearNF4, LoRALinearNF4], ids=["base", "lora"])
def test_output_can_be_modified_in_place_like_nn_linear(kernel_device, cls, lead, path):
    """`y = layer(x); y += 1; relu_(y)` gives nn.Linear's semantics: the same values and gradients as the
    out-of-place version (the output was a view of the matmul's result, which autograd refuses to modify
    in place under a custom Function). "op" calls `LoRALinearFunction` itself, "compiled" runs the in-place
    ops inside `torch.compile`."""
    torch.manual_seed(0)
    layer = cls.from_linear(nn.Linear(64, 32)).to(kernel_device)
    if cls is LoRALinearNF4:
        nn.init.normal_(layer.lora_B, std=0.1)
    lora = (layer.lora_A, layer.lora_B) if cls is LoRALinearNF4 else (None, None)

    def forward(x):
        if path == "op":
            return run_op(x, layer.nf4_weight, *lora, layer.bias, 1.0, None, 1.0)
        return layer(x)

    weights = torch.arange(32.0, device=kernel_device)  # a gradient that differs per output
    x0 = torch.randn(*lead, 64, device=kernel_device)
    results = []
    for then in (_out_of_place, _in_place):
        fn = lambda x, then=then: then(forward(x))  # noqa: E731
        if path == "compiled":
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        (y * weights).sum().backward()
        grads = [x.grad] + ([layer.lora_A.grad, layer.lora_B.grad] if cls is LoRALinearNF4 else [])
        results.append([y.detach(), *grads])
    assert (results[0][0] == 0).any() and (results[0][0] > 0).any()  # relu clips some outputs
    for expected, got in zip(*results, strict=True):
        assert torch.equal(got, expected)
    with torch.no_grad():  # without autograd too
        y = forward(x0)
        expected = _out_of_place(y.clone())
        assert torch.equal(_in_place(y), expected)
