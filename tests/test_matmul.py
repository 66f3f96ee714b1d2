"""The fused NF4 matmul + LoRA kernel against the fp32/float64 reference.

Tolerance: at most twice the error torch itself makes computing the same thing in the same dtype
(dequantized weight and operands in that dtype), plus two ulps at the output's scale.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import nf4
from nf4 import reference
from nf4.kernels.matmul import BUCKETS, DEQUANT, FP32_BUCKETS, GEMV, nf4_matmul

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def problem(m, n, k, r, dtype, trans, bias, use_mask, blocksize, double_quant, seed):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), blocksize, double_quant)
    in_dim, out_dim = (n, k) if trans else (k, n)
    x = torch.randn(m, in_dim, generator=g).to(dtype)
    u = torch.randn(m, r, generator=g) if r else None
    v = torch.randn(r, out_dim, generator=g) / 4 if r else None
    b = torch.randn(out_dim, generator=g) if bias else None
    mask = torch.rand(m, out_dim, generator=g) > 0.3 if use_mask else None
    return q, x, u, v, b, mask


def check(y, q, x, trans, u, v, b, mask, keep, merged=None):
    """y against the float64 oracle: within twice torch's own error in x's dtype plus 2 ulps of the output,
    plus, where the strategy rounds a merged weight W' = W + keep * B A to x's dtype once (`merged`, W' in
    float64), that rounding's bound: half an ulp of each |W'| element, summed against |x|."""
    dtype = x.dtype
    w = nf4.dequantize(q, torch.float32)
    exact = reference.matmul_ref(x.double(), w.double(), trans, u, v, b, mask, keep)
    # torch in the same dtype: operands rounded to it, products accumulated by torch, rounded again
    wd = w.to(dtype)
    torch_y = x @ (wd if trans else wd.t())
    if u is not None:
        lora = (u.to(dtype) @ v.to(dtype)) * keep
        torch_y = torch_y + (lora * mask.to(dtype) if mask is not None else lora)
    if b is not None:
        torch_y = torch_y + b.to(dtype)
    torch_err = (torch_y.double() - exact).abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    if merged is not None and exact.numel():
        ulp += ((x.double().abs() @ merged.abs().t()) * torch.finfo(dtype).eps / 2).max().item()
    assert y.dtype == dtype and y.shape == exact.shape
    assert err <= 2 * torch_err + 2 * ulp, (err, torch_err, ulp)


def run_and_check(device, q, x, trans, u, v, b, mask, keep, **launch):
    """Run the launcher on `device` (inputs moved there) and check the result against the oracle."""
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = nf4_matmul(
        on(x), q.to(device), trans=trans, u=on(u), v=on(v), bias=on(b), mask=on(mask), lora_scale=keep, **launch
    )
    check(y.cpu(), q, x, trans, u, v, b, mask, keep)


@given(
    m=st.integers(1, 40),
    n=st.integers(1, 80),
    k=st.integers(1, 200),
    r=st.sampled_from([0, 1, 3, 16, 20]),
    dtype=st.sampled_from(DTYPES),
    trans=st.booleans(),
    bias=st.booleans(),
    use_mask=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    double_quant=st.booleans(),
    split=st.sampled_from([None, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_fused_matmul_matches_reference(
    kernel_device, m, n, k, r, dtype, trans, bias, use_mask, blocksize, double_quant, split, seed
):
    q, x, u, v, b, mask = problem(m, n, k, r, dtype, trans, bias, use_mask, blocksize, double_quant, seed)
    mask = mask if trans and r else None
    run_and_check(kernel_device, q, x, trans, u, v, b, mask, 1 / 0.7, split=split)


ALL_CONFIGS = sorted(
    {(c, trans) for (_, trans), cs in BUCKETS.items() for c in cs}
    | {(c, trans) for c in FP32_BUCKETS.values() for trans in (False, True)},
    key=lambda ct: (ct[0].name, ct[1]),
)


@pytest.mark.parametrize("config,trans", ALL_CONFIGS, ids=[f"{c.name}-trans={int(t)}" for c, t in ALL_CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tile_configuration(kernel_device, config, trans, dtype):
    # shapes that leave partial tiles in every dimension, K not a multiple of 64 or of 16
    q, x, u, v, b, mask = problem(37, 70, 150, 5, dtype, trans, True, trans, 64, True, seed=1)
    run_and_check(kernel_device, q, x, trans, u, v, b, mask, 1.25, config=config)


@pytest.mark.parametrize("trans", [False, True])
def test_dequantize_then_matmul_strategy(kernel_device, trans):
    q, x, u, v, b, mask = problem(20, 48, 96, 4, torch.float16, trans, True, trans, 64, True, seed=2)
    run_and_check(kernel_device, q, x, trans, u, v, b, mask, 2.0, config=DEQUANT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_strategy(kernel_device, dtype):
    """M <= 16 forward: the decode kernel (`nf4.kernels.gemv`) behind `nf4_matmul`, with lora_scale != 1."""
    q, x, u, v, b, _ = problem(5, 70, 192, 5, dtype, False, True, False, 64, True, seed=3)
    run_and_check(kernel_device, q, x, False, u, v, b, None, 2.5, config=GEMV)


def test_empty_batch(kernel_device):
    q = nf4.quantize(torch.randn(16, 64)).to(kernel_device)
    y = nf4_matmul(torch.zeros(0, 64, device=kernel_device), q)
    assert y.shape == (0, 16)


def test_choose_times_once_and_caches(monkeypatch):
    from nf4.kernels import matmul

    calls = []
    monkeypatch.setattr(matmul, "_CHOSEN", {})
    timings = {"a": 3.0, "b": 1.0, "c": 2.0}
    monkeypatch.setattr(matmul.triton.testing, "do_bench", lambda fn, **kw: (calls.append(fn()), timings[calls[-1]])[1])
    key = ("large", 64, 64, 64, torch.bfloat16, False, True, 64, torch.device("cuda"))
    options = {"a": "a", "b": "b", "c": "c"}
    assert matmul.choose(key, options, lambda o: o) == "b"
    assert matmul.choose(key, options, lambda o: o) == "b" and len(calls) == 3  # cached, not re-timed
    cpu_key = key[:-1] + (torch.device("cpu"),)
    assert matmul.choose(cpu_key, options, lambda o: o) == "a"  # nothing to time: the first option


class _Outputs(TorchDispatchMode):
    """Records (op, dtype, shape) of every tensor the ops inside the block return."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


@pytest.mark.parametrize("trans", [False, True], ids=["forward", "input-grad"])
@pytest.mark.parametrize("path", ["dequantize+matmul", "cpu"])
def test_unfused_paths_make_no_float32_tensor_of_the_output_size(kernel_device, monkeypatch, path, trans):
    """The large-M strategies work in the activation dtype: no float32 [M, OUT] temporary (issue: QLoRA
    training at cuBLAS speed; on the H200 they cost 0.8 ms of 4.9 at M = 16384)."""
    import nf4.dispatch

    device = kernel_device
    if path == "cpu":
        monkeypatch.setattr(nf4.dispatch, "INTERPRET", False)
        device = torch.device("cpu")
    n, k, m, r = (1024, 1024, 64, 8) if path == "cpu" else (48, 64, 64, 8)
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(n, k, generator=g)).to(device)
    out_dim, in_dim = (k, n) if trans else (n, k)
    x = torch.randn(m, in_dim, generator=g).to(device, torch.bfloat16)
    u = torch.randn(m, r, generator=g).to(device, torch.bfloat16)
    v = torch.randn(r, out_dim, generator=g).to(device, torch.bfloat16)
    bias = torch.randn(out_dim, generator=g).to(device)
    mask = (torch.rand(m, out_dim, generator=g) > 0.5).to(device) if trans else None
    launch = dict(trans=trans, u=u, v=v, bias=bias, mask=mask, lora_scale=2.0)
    if path == "cpu":
        nf4.dispatch.matmul(x, q, **launch)  # compile the CPU dequantize outside the recording
        call = lambda: nf4.dispatch.matmul(x, q, **launch)  # noqa: E731
    else:
        call = lambda: nf4_matmul(x, q, config=DEQUANT, **launch)  # noqa: E731
    with _Outputs() as rec:
        y = call()
    assert y.dtype == torch.bfloat16 and y.shape == (m, out_dim)
    big_f32 = [s for s in rec.seen if s[1] == torch.float32 and s[2] == (m, out_dim)]
    assert not big_f32, big_f32
    assert any(s[1] == torch.bfloat16 and s[2] == (m, out_dim) for s in rec.seen)  # the recording works
    if path != "cpu":  # the GEMM adds x @ W^T onto the low-rank term and bias: no pass over y after it
        assert [s[0] for s in rec.seen if s[2] == (m, out_dim)][-1] == "aten.addmm_.default", rec.seen
    check(y.cpu(), q.cpu(), x.cpu(), trans, u.cpu(), v.cpu(), bias.cpu(), None if mask is None else mask.cpu(), 2.0)


@given(
    m=st.integers(1, 40),
    n=st.integers(1, 80),
    k=st.sampled_from([32, 64, 96, 128, 192, 100]),
    r=st.sampled_from([1, 16, 20]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    f32_adapter=st.booleans(),
    bias=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_large_m_inference_merges_the_adapter(
    kernel_device, m, n, k, r, dtype, f32_adapter, bias, blocksize, double_quant, seed
):
    """The large-M strategy given the adapter's A (no gradient, no dropout): W + scale * B @ A merged by
    `dequantize_lora` (rounded once), one GEMM; K not a multiple of the tile (100) takes x @ A^T first.
    Against the float64 oracle with u = x @ A^T exact."""
    q, x, _, _, b, _ = problem(m, n, k, 0, dtype, False, bias, False, blocksize, double_quant, seed)
    g = torch.Generator().manual_seed(seed + 1)
    adapter = torch.float32 if f32_adapter else dtype
    a = (torch.randn(r, k, generator=g) / k**0.5).to(adapter)
    v = (torch.randn(r, n, generator=g) / 4).to(adapter)  # B^T
    on = lambda t: None if t is None else t.to(kernel_device)  # noqa: E731
    y = nf4_matmul(on(x), q.to(kernel_device), v=on(v), bias=on(b), lora_scale=1.5, a=on(a), config=DEQUANT)
    merged = nf4.dequantize(q, torch.float32).double() + 1.5 * v.double().t() @ a.double()
    check(y.cpu(), q, x, False, x.double() @ a.double().t(), v, b, None, 1.5, merged=merged)


def test_merged_inference_is_one_kernel_and_one_gemm(kernel_device):
    """With the adapter merged into W, the only op producing an [M, N] tensor is the GEMM itself, and
    nothing of x @ A^T's shape [M, r] is made."""
    m, n, k, r = 48, 64, 128, 8
    g = torch.Generator().manual_seed(0)
    q = nf4.quantize(torch.randn(n, k, generator=g)).to(kernel_device)
    x = torch.randn(m, k, generator=g).to(kernel_device, torch.bfloat16)
    a = torch.randn(r, k, generator=g).to(kernel_device)
    v = torch.randn(r, n, generator=g).to(kernel_device)
    bias = torch.randn(n, generator=g).to(kernel_device, torch.bfloat16)
    with _Outputs() as rec:
        nf4_matmul(x, q, v=v, bias=bias, a=a, config=DEQUANT)
    assert [s[0] for s in rec.seen if s[2] == (m, n)] == ["aten.addmm.default"], rec.seen
    assert not [s for s in rec.seen if s[2] == (m, r)], rec.seen
