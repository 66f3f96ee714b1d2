"""DoRA on NF4 (lora/dora.py): the norm identity against the dense norm (near cancellation included), and
`dora_linear`'s output and gradients against PEFT's formula in float64, on the kernel and CPU paths."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_functional import leaf

import nf4
from nf4.lora.dora import DoRALinearFunction, dora_linear, dora_weight_norm, weight_norm_sq

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def dense_norm(w, a, b, scaling):
    """PEFT's `get_weight_norm` in float64: the dense [N, K] matrix W + s B A, normed per row."""
    return torch.linalg.norm(w.double() + scaling * b.double() @ a.double(), dim=1)


def identity_bound(w, a, b, scaling):
    """|n_identity^2 - n_dense^2| per row: W A^T is a float32 matmul over K (|error| <= K eps32 |W| |A|^T,
    before the float64 sum); the float64 terms round at a few eps64 of their magnitudes; n is rounded to
    float32 (2 eps32 n^2)."""
    w, a, b = w.double(), a.double(), b.double()
    k = w.shape[1]
    wa_err = (k + 2) * EPS32 * (w.abs() @ a.abs().t())
    cross = 2 * scaling * (b.abs() * wa_err).sum(1)
    size = w.square().sum(1) + 2 * scaling * (b.abs() * (w.abs() @ a.abs().t())).sum(1)
    size = size + scaling**2 * ((b.abs() @ (a.abs() @ a.abs().t())) * b.abs()).sum(1)
    return cross + 16 * (k + 4) * EPS64 * size


def cancelling(w, a, scaling):
    """B whose s B A removes W's projection on A's row space: B_j = -(1/s) W_j A^T (A A^T)^-1."""
    a = a.double()
    return (-(w.double() @ a.t()) @ torch.linalg.inv(a @ a.t()) / scaling).float()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.sampled_from([8, 16, 64, 96]),
    r=st.sampled_from([1, 4, 8, 16]),
    scaling=st.sampled_from([0.5, 2.0]),
    cancel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_norm_identity_matches_the_dense_norm(kernel_device, n, k, r, scaling, cancel, seed):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), 64)
    w = nf4.dequantize(q, torch.float32)
    a = torch.randn(min(r, k), k, generator=g) / math.sqrt(k)
    b = cancelling(w, a, scaling) if cancel else torch.randn(n, a.shape[0], generator=g)
    d = kernel_device
    got = dora_weight_norm(q.to(d), a.to(d), b.to(d), scaling)
    assert got.dtype == torch.float32 and got.shape == (n,)
    got = got.cpu().double()
    want = dense_norm(w, a, b, scaling)
    assert ((got.square() - want.square()).abs() <= identity_bound(w, a, b, scaling) + 2 * EPS32 * want.square()).all()
    if cancel and a.shape[0] == k:  # full row space: every row cancels down to rounding
        assert (want <= 1e-4 * w.norm(dim=1).double()).all()


def test_near_cancellation_is_within_the_bound_and_never_nan(reference_path):
    """Rows where s B A = -W exactly in real numbers: n^2 from the identity is a difference of terms of
    size ||W_j||^2; rounding may make it negative, which is clamped to 0 (no NaN)."""
    g = torch.Generator().manual_seed(3)
    q = nf4.quantize(torch.randn(12, 16, generator=g), 64)
    w = nf4.dequantize(q, torch.float32)
    a = torch.randn(16, 16, generator=g) / 4
    b = cancelling(w, a, 1.0)
    got = dora_weight_norm(q, a, b, 1.0).double()
    want = dense_norm(w, a, b, 1.0)
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert (got.square() - want.square()).abs().le(identity_bound(w, a, b, 1.0) + 2 * EPS32 * want.square()).all()
    assert (got <= 1e-3 * w.norm(dim=1).double()).all()  # the cancellation is seen, not ||W_j||


def test_weight_norm_sq_is_the_row_sum_of_squares_in_float64(reference_path):
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(2500, 24, generator=g), 64)  # more rows than one chunk
    w = nf4.dequantize(q, torch.float32).double()
    got = weight_norm_sq(q)
    assert got.dtype == torch.float64
    assert torch.allclose(got, w.square().sum(1), rtol=4 * EPS64 * 24, atol=0)


def reference_forward(x, q, a, b, m, bias, scaling, mask, keep):
    """PEFT's DoRA (`DoraLinearLayer.forward` + `DoraLinearVariant.forward`) in float64, dense W."""
    w = nf4.dequantize(q, torch.float32).double()
    norm = dense_norm(w, a.detach(), b.detach(), scaling).detach()
    g = m / norm
    xd = x if mask is None else x * mask * keep
    y = x @ w.t() + (g - 1) * (xd @ w.t()) + g * (scaling * (xd @ a.t()) @ b.t())
    return y if bias is None else y + bias


def tolerance(dtype, scale):
    """A few ulps of `dtype` per output, as tests/test_functional.py (the same products, plus one scale)."""
    return 16 * torch.finfo(dtype).eps * scale + 1e-6


@settings(max_examples=20, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    n=st.integers(1, 40),
    k=st.sampled_from([16, 32, 64]),
    r=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    dropout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_gradients_match_peft_dora_in_float64(kernel_device, lead, n, k, r, dtype, bias, dropout, seed):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), 64)
    x = torch.randn(*lead, k, generator=g)
    a = torch.randn(r, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, r, generator=g) / 4
    m = nf4.dequantize(q, torch.float32).norm(dim=1) * (1 + 0.3 * torch.rand(n, generator=g))
    bias_t = torch.randn(n, generator=g) if bias else None
    mask = (torch.rand(*lead, k, generator=g) > 0.25) if dropout else None
    keep = 1 / 0.75 if dropout else 1.0
    dy = torch.randn(*lead, n, generator=g)

    d = kernel_device
    xs, as_, bs, ms, biass = leaf(x, d, dtype), leaf(a, d), leaf(b, d), leaf(m, d), leaf(bias_t, d)
    wsq = weight_norm_sq(q).to(d)
    y = DoRALinearFunction.apply(xs, q.to(d), as_, bs, ms, biass, 1.5, None if mask is None else mask.to(d), keep, wsq)
    y.backward(dy.to(d, dtype))

    ref = [leaf(t, "cpu", torch.float64) for t in (x, a, b, m, bias_t)]
    yr = reference_forward(*ref[:1], q, *ref[1:], 1.5, mask, keep)
    yr.backward(dy.double())

    assert y.dtype == dtype and y.shape == (*lead, n)
    assert (y.cpu().double() - yr).abs().max() <= tolerance(dtype, yr.abs().max().item() + 1)
    for got, want in ((xs, ref[0]), (as_, ref[1]), (bs, ref[2]), (ms, ref[3]), (biass, ref[4])):
        if want is None:
            continue
        assert got.grad.dtype == got.dtype
        err = (got.grad.cpu().double() - want.grad).abs().max()
        assert err <= tolerance(dtype, want.grad.abs().max().item() + 1) * 4, (got.shape, err)


def test_gradcheck_float64_reference_path(reference_path):
    """x, magnitude and bias (the norm, detached by design, depends on A and B only: finite differences in A
    or B would see it move; their gradients are checked against PEFT's formula above)."""
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(6, 16, generator=g), 32)
    f64 = dict(dtype=torch.float64, generator=g)
    a, b = torch.randn(2, 16, **f64), torch.randn(6, 2, **f64)
    x, m, bias = (
        t.requires_grad_() for t in (torch.randn(3, 16, **f64), torch.rand(6, **f64) + 1, torch.randn(6, **f64))
    )
    mask = torch.rand(3, 16, generator=g) > 0.5
    wsq = weight_norm_sq(q)

    def run(mask, keep):
        return lambda x, m, bias: DoRALinearFunction.apply(x, q, a, b, m, bias, 0.7, mask, keep, wsq)

    assert torch.autograd.gradcheck(run(mask, 2.0), (x, m, bias))
    assert torch.autograd.gradcheck(run(None, 1.0), (x, m, bias))


def test_inference_with_a_cached_norm_equals_the_training_forward(kernel_device, monkeypatch):
    """`norm=` (the layer's cache at inference) takes the one-matmul path where nothing needs a gradient
    (grad mode on or off) and no dropout runs; it gives the Function's output."""
    g = torch.Generator().manual_seed(1)
    q = nf4.quantize(torch.randn(24, 32, generator=g), 64).to(kernel_device)
    x = torch.randn(3, 32, generator=g).to(kernel_device)
    a = (torch.randn(4, 32, generator=g) / 6).to(kernel_device)
    b = (torch.randn(24, 4, generator=g) / 4).to(kernel_device)
    m = (torch.rand(24, generator=g) + 1).to(kernel_device)
    bias = torch.randn(24, generator=g).to(kernel_device)
    norm = dora_weight_norm(q, a, b, 0.5)
    with torch.no_grad():
        full = dora_linear(x, q, a, b, m, bias, 0.5)

    def refuse(*args):
        raise AssertionError("the Function ran: the cached norm was not used")

    monkeypatch.setattr(DoRALinearFunction, "apply", refuse)
    cached = dora_linear(x, q, a, b, m, bias, 0.5, 0.3, training=False, norm=norm)  # grad mode on, none needed
    with torch.no_grad():
        assert torch.equal(dora_linear(x, q, a, b, m, bias, 0.5, norm=norm), cached)
    assert torch.allclose(cached, full, rtol=1e-5, atol=1e-5)
    w = nf4.dequantize(q.cpu(), torch.float32).double()
    want = (m.cpu().double() / dense_norm(w, a.cpu(), b.cpu(), 0.5)) * (
        x.cpu().double() @ (w + 0.5 * b.cpu().double() @ a.cpu().double()).t()
    ) + bias.cpu().double()
    assert (cached.cpu().double() - want).abs().max() <= tolerance(torch.float32, want.abs().max().item() + 1)


def test_dropout_runs_in_training_only_and_eval_is_deterministic(reference_path):
    g = torch.Generator().manual_seed(2)
    q = nf4.quantize(torch.randn(16, 32, generator=g), 64)
    x = torch.randn(8, 32, generator=g)
    a, b = torch.randn(4, 32, generator=g) / 6, torch.randn(16, 4, generator=g)
    m = torch.rand(16, generator=g) + 1
    evals = [dora_linear(x, q, a, b, m, None, 1.0, 0.5, training=False) for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    assert torch.allclose(evals[0], reference_forward(x.double(), q, a.double(), b.double(), m.double(), None, 1.0,
                                                      None, 1.0).float(), rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.manual_seed(5)
    trained = dora_linear(x, q, a, b, m, None, 1.0, 0.5, training=True)
    torch.manual_seed(5)
    mask = torch.rand(x.shape) >= 0.5
    want = reference_forward(x.double(), q, a.double(), b.double(), m.double(), None, 1.0, mask, 2.0)
    assert not torch.allclose(trained, evals[0], atol=1e-3)
    assert torch.allclose(trained.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ("magnitude_shape", r"^dora_linear: expected a floating-point magnitude \[6\], got \[5\]"),
        ("magnitude_int", r"^dora_linear: expected a floating-point magnitude \[6\]"),
        ("lora_shape", r"^dora_linear: expected lora_A \[r, 8\] and lora_B \[6, r\]"),
    ],
)
def test_bad_input_raises_with_the_expected_shape(reference_path, change, message):
    q = nf4.quantize(torch.randn(6, 8), 64)
    x, a, b, m = torch.randn(2, 8), torch.randn(2, 8), torch.randn(6, 2), torch.ones(6)
    if change == "magnitude_shape":
        m = torch.ones(5)
    elif change == "magnitude_int":
        m = torch.ones(6, dtype=torch.int64)
    else:
        b = torch.randn(6, 3)
    with pytest.raises(ValueError, match=message):
        dora_linear(x, q, a, b, m)


def test_saved_tensors_hold_no_dense_weight_and_one_output_sized_activation(reference_path):
    """Memory: what the backward keeps is LoRA's (x, x A^T, the mask) plus z [M, N] and O(N) vectors; no [N, K]
    matrix (dense W or B A) is ever saved."""
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(48, 40, generator=g), 64)
    x = torch.randn(7, 40, generator=g, requires_grad=True)
    a = (torch.randn(4, 40, generator=g) / 6).requires_grad_()
    b = torch.randn(48, 4, generator=g).requires_grad_()
    m = (torch.rand(48, generator=g) + 1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        dora_linear(x, q, a, b, m, weight_sq=weight_norm_sq(q))
    shapes = sorted(tuple(t.shape) for t in saved)
    assert (48, 40) not in shapes
    assert sum(t.numel() for t in saved) <= x.numel() + 7 * 4 + 7 * 48 + a.numel() + b.numel() + 2 * 48


def test_forward_and_backward_read_nothing_back(kernel_device):
    """No host read (tests/test_sync.py's guard) on DoRA's training and cached-norm inference paths."""
    from test_sync import no_host_reads

    g = torch.Generator().manual_seed(4)
    d = kernel_device
    q = nf4.quantize(torch.randn(32, 64, generator=g), 64).to(d)
    x = torch.randn(5, 64, generator=g).to(d).requires_grad_()
    a = (torch.randn(4, 64, generator=g) / 8).to(d).requires_grad_()
    b = torch.randn(32, 4, generator=g).to(d).requires_grad_()
    m = (torch.rand(32, generator=g) + 1).to(d).requires_grad_()
    wsq = weight_norm_sq(q)
    with no_host_reads():
        y = dora_linear(x, q, a, b, m, None, 0.5, 0.25, training=True, weight_sq=wsq)
        y.square().sum().backward()
        norm = dora_weight_norm(q, a, b, 0.5, wsq)
        with torch.no_grad():
            dora_linear(x, q, a, b, m, None, 0.5, norm=norm)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, a, b, m))


def test_defaults_are_scaling_1_without_dropout(reference_path):
    g = torch.Generator().manual_seed(6)
    q = nf4.quantize(torch.randn(16, 32, generator=g), 64)
    x, a, b = torch.randn(4, 32, generator=g), torch.randn(2, 32, generator=g) / 6, torch.randn(16, 2, generator=g)
    m = torch.rand(16, generator=g) + 1
    assert torch.equal(dora_linear(x, q, a, b, m), dora_linear(x, q, a, b, m, None, 1.0, 0.0, False))
    assert not torch.equal(dora_linear(x, q, a, b, m), dora_linear(x, q, a, b, m, None, 2.0))


def test_a_cached_norm_is_not_used_where_a_gradient_is_needed(reference_path):
    """`norm=` takes the inference path only without gradients: with them the Function runs and A, B and the
    magnitude get their gradients (the cached path has no graph)."""
    g = torch.Generator().manual_seed(8)
    q = nf4.quantize(torch.randn(16, 32, generator=g), 64)
    x = torch.randn(4, 32, generator=g)
    a, b = (torch.randn(2, 32, generator=g) / 6).requires_grad_(), torch.randn(16, 2, generator=g).requires_grad_()
    m = (torch.rand(16, generator=g) + 1).requires_grad_()
    dora_linear(x, q, a, b, m, norm=dora_weight_norm(q, a, b, 1.0)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() > 0 for t in (a, b, m))


def _torch_passes(monkeypatch):
    """Make `nf4.lora.dora` take torch's elementwise passes instead of `nf4.kernels.dora`."""
    import nf4.dispatch

    monkeypatch.setattr(nf4.dispatch, "dora_kernels", lambda z, g: False)


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 600),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    extra=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_dora_passes_match_torchs(kernel_device, m, n, dtype, bias, extra, seed):
    """`nf4.kernels.dora` (tiles of 8 x 256 and 32 x 256: the shapes cross both) gives
    torch's passes bit for bit, and dm = sum_m dy * z within float32's summation bound of float64's."""
    from nf4.kernels.dora import dora_grad, dora_scale
    from nf4.lora.dora import magnitude_grad_parts, scale_columns

    gen = torch.Generator().manual_seed(seed)
    z, dy, e = (torch.randn(m, n, generator=gen).to(kernel_device, dtype) for _ in range(3))
    g = (torch.rand(n, generator=gen) + 0.5).to(kernel_device)
    b = torch.randn(n, generator=gen).to(kernel_device) if bias else None
    want = (z.float() * g + (e.float() if extra else 0)) + (b if bias else 0)
    got = dora_scale(z, g, b, e if extra else None)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    with pytest.MonkeyPatch.context() as mp:
        _torch_passes(mp)
        assert torch.equal(scale_columns(z, g, b, e if extra else None), got)
        dyg_torch, dm_torch = magnitude_grad_parts(dy, z, g, True)
    dyg, dm = dora_grad(dy, z, g)
    assert torch.equal(dyg, (dy.float() * g).to(dtype)) and torch.equal(dyg, dyg_torch)
    exact = (dy.double() * z.double()).sum(0)
    bound = 2 * m * 2.0**-24 * (dy.double() * z.double()).abs().sum(0) + 1e-30
    assert dm.dtype == torch.float32 and ((dm.double() - exact).abs() <= bound).all()
    assert ((dm_torch.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("needs_m", [True, False])
def test_the_layer_runs_one_fused_pass_each_way_and_equals_torchs_passes(kernel_device, monkeypatch, needs_m):
    """Forward: one `dora_scale` launch (the bias in it). Backward: one `dora_grad` where the magnitude
    needs a gradient, else one `dora_scale` for dy * g. Outputs and gradients equal those of torch's
    passes (dm within float32 summation rounding)."""
    import nf4.dispatch

    calls = []
    for name in ("dora_scale", "dora_grad"):
        real = getattr(nf4.dispatch, name)
        monkeypatch.setattr(nf4.dispatch, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    gen = torch.Generator().manual_seed(3)
    q = nf4.quantize(torch.randn(40, 64, generator=gen), 64).to(kernel_device)
    wsq = weight_norm_sq(q)
    inputs = [torch.randn(*s, generator=gen) for s in ((6, 64), (4, 64), (40, 4), (40,), (40,))]
    dy = torch.randn(6, 40, generator=gen).to(kernel_device, torch.bfloat16)

    def run():
        x, a, b, m, bias = (leaf(t, kernel_device) for t in inputs)
        x = leaf(inputs[0], kernel_device, torch.bfloat16)
        m.requires_grad_(needs_m)
        y = DoRALinearFunction.apply(x, q, a, b, m, bias, 2.0, None, 1.0, wsq)
        y.backward(dy)
        return y, x.grad, a.grad, b.grad, m.grad, bias.grad

    fused = run()
    assert calls == ["dora_scale", "dora_grad" if needs_m else "dora_scale"]
    _torch_passes(monkeypatch)
    plain = run()
    assert len(calls) == 2
    for i, (f, p) in enumerate(zip(fused, plain, strict=True)):
        if i == 4:
            assert (f is None) == (not needs_m) and (f is None or torch.allclose(f, p, rtol=1e-5, atol=1e-6))
        else:
            assert torch.equal(f, p), i


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda k, z, g: k.dora_scale(z.t(), g), "^dora_scale: .*contiguous"),
        (lambda k, z, g: k.dora_scale(z, g.double()), "^dora_scale: .*float32 g of shape \\[8\\]"),
        (lambda k, z, g: k.dora_scale(z, g[:4]), "float32 g of shape \\[8\\]"),
        (lambda k, z, g: k.dora_scale(z, g, bias=g[:3]), "^dora_scale: .*float32 bias of shape \\[8\\]"),
        (lambda k, z, g: k.dora_scale(z.double(), g), "float32/float16/bfloat16"),
        (lambda k, z, g: k.dora_grad(z, z.half(), g), "^dora_grad: .*contiguous torch.float32 \\[8, 8\\]"),
        (lambda k, z, g: k.dora_scale(z, g, extra=z[:2]), "every \\[M, N\\] operand"),
    ],
)
def test_fused_passes_refuse_what_they_cannot_read(kernel_device, call, message):
    import nf4.kernels.dora as k

    z, g = torch.randn(8, 8, device=kernel_device), torch.ones(8, device=kernel_device)
    with pytest.raises(ValueError, match=message):
        call(k, z, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_configurations_are_the_launches_made(monkeypatch, dtype):
    """`dora_configs` (what tests/test_compile.py compiles for sm_80 / sm_90) describes the launches
    `dora_scale` and `dora_grad` make: the same kernel, argument types, compile-time constants (but
    SOFT_BF16, the interpreter's) and options."""
    import nf4.kernels.dora as k
    from nf4.kernels.common import ptr_type

    launches, configs = {}, {c.name: c for c in k.dora_configs()}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches[self.kernel] = (args, kwargs)

            return launch

    for name in ("_dora_scale_kernel", "_dora_grad_kernel"):
        monkeypatch.setattr(k, name, Recorder(getattr(k, name)))
    z, g = torch.zeros(4, 8, dtype=dtype), torch.ones(8)
    k.dora_scale(z, g, torch.ones(8), z)
    k.dora_grad(z, z, g)
    assert len(configs) == 6
    dname = str(dtype).removeprefix("torch.")
    for kernel, cfg in ((k._dora_scale_kernel.kernel, configs[f"dora_scale[{dname}]"]),
                        (k._dora_grad_kernel.kernel, configs[f"dora_grad[{dname}]"])):  # fmt: skip
        args, kwargs = launches[kernel]
        assert cfg.kernel is kernel
        names = getattr(kernel, "arg_names", None) or [p.name for p in kernel.params]  # interpreted or JIT
        runtime = [n for n in names if n not in cfg.constexprs]
        assert list(cfg.signature) == runtime and len(args) == len(runtime)
        for name, value in zip(runtime, args, strict=True):
            want = ptr_type(value.dtype) if isinstance(value, torch.Tensor) else "i32"
            assert cfg.signature[name] == want, name
        assert {n: kwargs[n] for n in cfg.constexprs if n != "SOFT_BF16"} == {
            n: v for n, v in cfg.constexprs.items() if n != "SOFT_BF16"
        }
        assert cfg.constexprs["SOFT_BF16"] is False
        assert {n: kwargs[n] for n in cfg.options} == cfg.options and set(kwargs) == set(cfg.constexprs) | set(
            cfg.options
        )
