"""The general multi-adapter path (`nf4.kernels.adapters`, any M) against the oracle: the base
`x @ dequant(W)^T + bias` in float64 plus `nf4.reference.adapter_rows_ref`.

Tolerance: at most twice the error torch makes computing the same thing in the same dtype (weight
dequantized to that dtype, torch's matmul, the low-rank term and bias rounded to that dtype and added),
plus two ulps at the output's scale. Base-only rows must equal the base call bit for bit.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_sync import no_host_reads

import nf4
from helpers import static_module
from nf4 import reference
from nf4.kernels import adapters
from nf4.kernels.adapters import adapter_configs, nf4_matmul_adapters
from nf4.kernels.matmul import nf4_matmul

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bank(s, r, k, n, bank_dtype, seed, ranks=None):
    """a_bank [S, R, K], v_bank [S, R, N] with slot i's rank ranks[i] <= R (rows past it zero), scales [S]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s, r, k, generator=g) / k**0.5
    v = torch.randn(s, r, n, generator=g)
    for i, rank in enumerate(ranks or []):
        a[i, rank:] = 0
        v[i, rank:] = 0
    scales = torch.rand(s, generator=g) * 1.5 + 0.5
    return a.to(bank_dtype), v.to(bank_dtype), scales


def problem(m, n, k, dtype, seed, bias_dtype=None, blocksize=64, double_quant=True):
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return q, x, b


def check(y, q, x, a, v, scales, index, b):
    dtype = x.dtype
    w = nf4.dequantize(q, torch.float32)
    low = reference.adapter_rows_ref(x.float(), a, v, scales, index).double()
    exact = x.double() @ w.double().t() + low
    torch_y = x @ w.to(dtype).t() + low.to(dtype)
    if b is not None:
        exact = exact + b.double()
        torch_y = torch_y + b.to(dtype)
    torch_err = (torch_y.double() - exact).abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    # the low-rank term's own float32 sums (K for u, R for u @ v; torch_y's term is exact): at K = 2 the
    # base's error alone is below them
    size = reference.adapter_rows_ref(x.float().abs(), a.abs(), v.abs(), scales.abs(), index).double()
    low_size = size.max().item() if size.numel() else 0.0
    low_err = (x.shape[1] + a.shape[1] + 2) * torch.finfo(torch.float32).eps * low_size
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert y.dtype == dtype and y.shape == exact.shape
    assert err <= 2 * torch_err + 2 * ulp + low_err, (err, torch_err, ulp, low_err)


def run_and_check(device, q, x, a, v, scales, index, b, split=None):
    """Run on `device`, check against the oracle, and check base-only rows against the base call bit for bit."""
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = nf4_matmul_adapters(on(x), q.to(device), on(a), on(v), on(scales), on(index), bias=on(b), split=split).cpu()
    check(y, q, x, a, v, scales, index, b)
    base = nf4_matmul(on(x), q.to(device), bias=on(b)).cpu()
    none = index < 0
    assert torch.equal(y[none], base[none])
    return y


@given(
    m=st.sampled_from([1, 17, 40]),
    n=st.integers(1, 80),
    k=st.integers(1, 64).map(lambda h: 2 * h),
    s=st.integers(1, 5),
    r=st.sampled_from([1, 5, 16, 20]),
    dtype=st.sampled_from(DTYPES),
    bank_float32=st.booleans(),
    bias=st.sampled_from([None, "x", "float32"]),
    base_only=st.floats(0.0, 0.5),
    int64=st.booleans(),
    split=st.sampled_from([None, 1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_matches_oracle(kernel_device, m, n, k, s, r, dtype, bank_float32, bias, base_only, int64, split, seed):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, r + 1, (s,), generator=g).tolist()  # padded to R in the bank
    bias_dtype = {None: None, "x": dtype, "float32": torch.float32}[bias]
    q, x, b = problem(m, n, k, dtype, seed, bias_dtype)
    a, v, scales = bank(s, r, k, n, torch.float32 if bank_float32 else dtype, seed, ranks)
    index = torch.randint(0, s, (m,), generator=g, dtype=torch.int64 if int64 else torch.int32)
    index[torch.rand(m, generator=g) < base_only] = -1
    run_and_check(kernel_device, q, x, a, v, scales, index, b, split)


def _pattern(name, m, s, g):
    if name == "one slot scattered":  # slot s - 1 on every third row, the rest base-only
        return torch.where(torch.arange(m) % 3 == 1, s - 1, -1).int()
    if name == "all rows one slot":
        return torch.full((m,), 2, dtype=torch.int32)
    if name == "every row its own slot":
        return torch.randperm(m, generator=g).int()
    if name == "all base-only":
        return torch.full((m,), -1, dtype=torch.int32)
    if name == "segments of 16 shuffled":  # as a batch of sequences: runs of one slot, in any order
        return torch.arange(m).div(16, rounding_mode="floor").remainder(s).int()[torch.randperm(m, generator=g)]
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    ["one slot scattered", "all rows one slot", "every row its own slot", "all base-only", "segments of 16 shuffled"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_index_patterns(kernel_device, name, dtype):
    m, n, k = 40, 24, 64
    g = torch.Generator().manual_seed(5)
    q, x, b = problem(m, n, k, dtype, 5, torch.float32)
    a, v, scales = bank(m, 6, k, n, dtype, 5, ranks=torch.randint(1, 7, (m,), generator=g).tolist())
    run_and_check(kernel_device, q, x, a, v, scales, _pattern(name, m, m, g), b, split=2)


def test_one_slot_bank(kernel_device):
    """S = 1: every row the one adapter or none, at the largest M here."""
    q, x, b = problem(40, 33, 96, torch.float16, 6)
    a, v, scales = bank(1, 16, 96, 33, torch.float32, 6)
    run_and_check(kernel_device, q, x, a, v, scales, torch.tensor([0, -1] * 20, dtype=torch.int32), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_rank_term_is_rounded_once(kernel_device, dtype):
    """A zero base: y is the low-rank term rounded once to x's dtype. On tensor cores u enters the dot as
    hi + lo in the bank's dtype; with hi alone (u rounded to 16 bits) far fewer than 99 % of the outputs
    equal the exact term rounded once (seen under the interpreter)."""
    m, n, k = 33, 64, 128
    q = nf4.quantize(torch.zeros(n, k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    a, v, scales = bank(3, 16, k, n, dtype, 7)
    index = torch.arange(m, dtype=torch.int32) % 3
    on = lambda t: t.to(kernel_device)  # noqa: E731
    y = nf4_matmul_adapters(on(x), q.to(kernel_device), on(a), on(v), on(scales), on(index)).cpu()
    u = torch.einsum("mk,mrk->mr", x.double(), a.double()[index.long()]) * scales.double()[index.long()][:, None]
    exact = torch.einsum("mr,mrn->mn", u, v.double()[index.long()])
    terms = torch.einsum("mr,mrn->mn", u.abs(), v.double()[index.long()].abs())  # sum of |u_j v_j|
    rounded = exact.to(dtype)
    spacing = (torch.nextafter(rounded, torch.tensor(float("inf"), dtype=dtype)) - rounded).double().abs()
    # one rounding of the exact term, plus 2**-14 of the terms for u's hi + lo (2**-16) and fp32 sums
    assert ((y.double() - exact).abs() <= spacing + 2**-14 * terms).all()
    assert (y == rounded).float().mean() >= 0.99


def test_inputs_not_modified(kernel_device):
    q, x, b = problem(17, 20, 64, torch.bfloat16, 8, torch.bfloat16)
    a, v, scales = bank(3, 4, 64, 20, torch.float32, 8)
    index = torch.tensor([0, 1, 2, -1] * 4 + [1], dtype=torch.int64)
    inputs = (x, a, v, scales, index, b, q.packed, q.absmax)
    before = [t.clone() for t in inputs]
    on = lambda t: t.to(kernel_device)  # noqa: E731
    nf4_matmul_adapters(on(x), q.to(kernel_device), on(a), on(v), on(scales), on(index), bias=on(b))
    assert all(torch.equal(t, c) for t, c in zip(before, inputs, strict=True))


@pytest.mark.parametrize("m", [17, 40])
def test_no_host_read(kernel_device, m):
    q, x, b = problem(m, 24, 64, torch.float16, 9, torch.float16)
    a, v, scales = bank(4, 8, 64, 24, torch.float16, 9)
    index = (torch.arange(m, dtype=torch.int32) % 5) - 1
    args = [t.to(kernel_device) for t in (x, a, v, scales, index)]
    q = q.to(kernel_device)
    nf4_matmul_adapters(args[0], q, *args[1:], bias=b.to(kernel_device))  # a shape's first call may choose
    with no_host_reads():
        y = nf4_matmul_adapters(args[0], q, *args[1:], bias=b.to(kernel_device))
    check(y.cpu(), q.to("cpu"), x, a, v, scales, index, b)


def test_empty_inputs(kernel_device):
    q, x, b = problem(5, 8, 32, torch.float32, 10, torch.float32)
    d = kernel_device
    base = nf4_matmul(x.to(d), q.to(d), bias=b.to(d))
    for s, r in ((0, 4), (2, 0)):  # no slot, no rank: the base alone
        a, v, scales = bank(s, r, 32, 8, torch.float32, 10)
        index = torch.full((5,), -1 if s == 0 else 1, dtype=torch.int32)
        y = nf4_matmul_adapters(x.to(d), q.to(d), a.to(d), v.to(d), scales.to(d), index.to(d), bias=b.to(d))
        assert torch.equal(y, base)
    a, v, scales = bank(2, 4, 32, 8, torch.float32, 10)
    y = nf4_matmul_adapters(
        x[:0].to(d), q.to(d), a.to(d), v.to(d), scales.to(d), torch.zeros(0, dtype=torch.int32, device=d)
    )
    assert y.shape == (0, 8)


def test_validation(kernel_device):
    d = kernel_device
    q, x, b = problem(4, 8, 32, torch.float32, 11)
    q, x = q.to(d), x.to(d)
    a, v, scales = (t.to(d) for t in bank(3, 2, 32, 8, torch.float32, 11))
    index = torch.zeros(4, dtype=torch.int32, device=d)
    call = lambda **kw: nf4_matmul_adapters(  # noqa: E731
        kw.get("x", x),
        q,
        kw.get("a", a),
        kw.get("v", v),
        kw.get("scales", scales),
        kw.get("index", index),
        bias=kw.get("bias"),
    )
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \[M, K\]"):
        call(x=x[0])
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.float64"):
        call(x=x.double())
    with pytest.raises(ValueError, match="K = 32: expected x of shape"):
        call(x=x[:, :16])
    with pytest.raises(ValueError, match=r"a_bank must be \[S, R, K\] with K = 32, got \[3, 2, 16\]"):
        call(a=a[..., :16])
    with pytest.raises(ValueError, match=r"v_bank must be \[S, R, N\] = \[3, 2, 8\]"):
        call(v=v[:2])
    with pytest.raises(ValueError, match=r"scales must be \[S\] = \[3\]"):
        call(scales=scales[:2])
    with pytest.raises(ValueError, match=r"index must be \[M\] = \[4\]"):
        call(index=index[:3])
    with pytest.raises(TypeError, match=r"a_bank must be float32 or x's dtype \(torch.float32\), got torch.float16"):
        call(a=a.half())
    with pytest.raises(TypeError, match="v_bank must be float32 or x's dtype"):
        call(v=v.double())
    with pytest.raises(ValueError, match="v_bank must be contiguous"):
        call(v=v.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(TypeError, match="scales must be float32, got torch.float16"):
        call(scales=scales.half())
    with pytest.raises(TypeError, match="index must be int32 or int64, got torch.float32"):
        call(index=index.float())
    with pytest.raises(TypeError, match="scales must be a tensor, got list"):
        call(scales=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"bias must be a tensor \[N\] = \[8\] or None"):
        call(bias=torch.zeros(7, device=d))
    with pytest.raises(TypeError, match="bias must be float32 or x's dtype"):
        call(bias=torch.zeros(8, dtype=torch.float16, device=d))
    with pytest.raises(ValueError, match="but index is on meta; move them to one device"):
        call(index=torch.zeros(4, dtype=torch.int32, device="meta"))


def test_split_choice(monkeypatch):
    """The cost model's case (M = 512, K = 4096, r = 16, 132 SMs): 32 row tiles x 4 K slices of 16 steps;
    a large M needs no split; never fewer than 4 BK steps per slice."""
    monkeypatch.setattr(adapters, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    assert adapters.split_for(512, 4096, 16, cuda) == 4
    assert adapters.split_for(4096, 4096, 16, cuda) == 1
    assert adapters.split_for(16, 512, 16, cuda) == 2  # 512 / (4 x 64)
    assert adapters.split_for(512, 4096, 16, torch.device("cpu")) == 1


def test_configurations():
    """Ten compiled variants (x dtype x bank dtype, shrink and expand), all in the ahead-of-time list
    (tests/test_compile.py compiles them for sm_80 and sm_90)."""
    names = [cfg.name for cfg in adapter_configs()]
    assert len(names) == len(set(names)) == 10
    assert set(names) <= {cfg.name for cfg in static_module("aot").all_configs()}


@pytest.mark.gpu
def test_cuda_graph_replays_a_new_index():
    """Captured once, the call replays with other slot ids written into the same index tensor."""
    q, x, b = problem(512, 256, 512, torch.bfloat16, 12, torch.bfloat16)
    a, v, scales = bank(16, 16, 512, 256, torch.bfloat16, 12)
    q, x, b, a, v, scales = (t.cuda() for t in (q, x, b, a, v, scales))
    index = torch.arange(512, device="cuda", dtype=torch.int32) // 32  # 16 sequences x 32 tokens
    nf4_matmul_adapters(x, q, a, v, scales, index, bias=b)  # the first call of a shape may time candidates
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_matmul_adapters(x, q, a, v, scales, index, bias=b)
    for new in (index.flip(0), torch.full_like(index, 3), torch.where(index % 2 == 0, -1, index)):
        index.copy_(new)
        graph.replay()
        assert torch.equal(y, nf4_matmul_adapters(x, q, a, v, scales, index, bias=b))


@pytest.mark.parametrize("m, dtype, k, decode", [(16, torch.bfloat16, 64, True), (1, torch.float16, 96, True),
                                                  (17, torch.bfloat16, 64, False), (4, torch.float32, 64, False),
                                                  (4, torch.bfloat16, 48, False)])  # fmt: skip
def test_decode_batches_take_the_gemv_pass_and_others_the_segmented_kernels(kernel_device, monkeypatch, m, dtype, k,
                                                                            decode):  # fmt: skip
    from nf4.kernels import gemv

    calls = {"gemv": 0, "segmented": 0}
    real_gemv, real_rows = gemv.launch_adapters, adapters.add_adapter_rows_
    monkeypatch.setattr(gemv, "launch_adapters", lambda *a: calls.__setitem__("gemv", calls["gemv"] + 1)
                        or real_gemv(*a))  # fmt: skip
    monkeypatch.setattr(adapters, "add_adapter_rows_", lambda *a: calls.__setitem__("segmented", calls["segmented"] + 1)
                        or real_rows(*a))  # fmt: skip
    q, x, b = problem(m, 48, k, dtype, seed=m + k)
    a, v, scales = bank(3, 5, k, 48, torch.float32, seed=k)
    index = torch.tensor([i % 4 - 1 for i in range(m)])
    run_and_check(kernel_device, q, x, a, v, scales, index, b)
    assert calls == ({"gemv": 1, "segmented": 0} if decode else {"gemv": 0, "segmented": 1})
