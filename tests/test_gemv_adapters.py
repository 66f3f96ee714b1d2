"""The decode kernel's adapter-bank path (`nf4.kernels.gemv.launch_adapters`, M <= 16): each row's own
adapter, its A gathered by the low-rank programs and its B^T and scale by the epilogue, against each
row run alone in float64.

Tolerance (as tests/test_gemv.py): at most twice the error torch makes computing the same rows in x's
dtype (weight dequantized to it, each row's low-rank term in it), plus two ulps at the output's scale.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nf4
from nf4 import reference
from nf4.kernels import gemv
from nf4.kernels.gemv import adapters_fuse, launch_adapters, nf4_gemv

HALF = (torch.float16, torch.bfloat16)


def bank_problem(m, n, k, slots, rank, dtype, bank_dtype, bias, blocksize, double_quant, index, seed, ranks=None):
    """x [m, k] in `dtype`; a bank of `slots` adapters of rank `rank` (or `ranks[s]`, zero-padded to
    `rank`), A ~ N(0, 1/k) and B^T ~ N(0, 1/16) in `bank_dtype`; scales in [0.25, 2.5]; index as given."""
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    a_bank = torch.randn(slots, rank, k, generator=g) / k**0.5
    v_bank = torch.randn(slots, rank, n, generator=g) / 4
    for s, used in enumerate(ranks or ()):  # a smaller adapter padded to the bank's rank: zeros add 0
        a_bank[s, used:] = 0
        v_bank[s, used:] = 0
    scales = 0.25 + 2.25 * torch.rand(slots, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    index = torch.tensor(index, dtype=torch.int32)
    return q, x, a_bank.to(bank_dtype), v_bank.to(bank_dtype), scales, index, b


def check_rows(y, q, x, a_bank, v_bank, scales, index, b):
    """Each row against that row alone with its adapter: float64 (the bound), and x's dtype (torch's error)."""
    dtype = x.dtype
    w = nf4.dequantize(q, torch.float32)
    exact, torch_y = [], []
    for row, i in zip(x, index.tolist(), strict=True):
        e = row.double() @ w.double().t() + (0 if b is None else b.double())
        t = row @ w.to(dtype).t() + (0 if b is None else b.to(dtype))
        if i >= 0:
            e = e + scales[i].double() * (row.double() @ a_bank[i].double().t()) @ v_bank[i].double()
            t = t + scales[i].to(dtype) * (row @ a_bank[i].to(dtype).t()) @ v_bank[i].to(dtype)
        exact.append(e)
        torch_y.append(t)
    exact, torch_y = torch.stack(exact), torch.stack(torch_y)
    # the shared oracle agrees with the per-row loop (float32)
    base = x.float() @ w.t() + (0 if b is None else b)
    oracle = base + reference.adapter_rows_ref(x.float(), a_bank, v_bank, scales, index)
    torch_err = (torch_y.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (oracle.double() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()
    err = (y.double() - exact).abs().max().item()
    assert y.dtype == dtype and y.shape == exact.shape
    assert err <= 2 * torch_err + 2 * ulp, (err, torch_err, ulp)


def run(device, q, x, a_bank, v_bank, scales, index, b, split=None):
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = launch_adapters(on(x), q.to(device), on(a_bank), on(v_bank), on(scales), on(index), on(b), split=split)
    return y.cpu()


PATHS = [(512, 64), (128, 64), (96, 128)]  # register table (fp16/bf16), 64-column steps, 32-column steps
CASES = [  # (m, slots, R, index): every row its own slot; one slot scattered with base-only rows; S = 1
    (16, 16, 20, list(range(15, -1, -1))),
    (16, 3, 16, [1, -1, 1, 0, 2, 1, -1, -1, 0, 1, 2, 2, 1, 0, -1, 1]),
    (1, 1, 17, [0]),
    (5, 4, 33, [3, -1, 3, 0, 2]),
]


@pytest.mark.parametrize("k,blocksize", PATHS, ids=[f"K={k}-bs={bs}" for k, bs in PATHS])
@pytest.mark.parametrize("m,slots,rank,index", CASES, ids=["16-distinct", "16-scattered", "1-S1", "5-R33"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_adapters_match_each_row_alone(kernel_device, k, blocksize, m, slots, rank, index, dtype):
    """Split-K 3 (the u slices summed), ranks not multiples of 16 or 8, the bank in float32 or x's dtype,
    bias and double quantization alternating."""
    seed = k + m + rank
    bank_dtype = torch.float32 if seed % 2 else dtype
    problem = bank_problem(
        m, 70, k, slots, rank, dtype, bank_dtype, seed % 3 != 0, blocksize, seed % 4 < 2, index, seed
    )
    check_rows(run(kernel_device, *problem, split=3), *problem)


@given(
    m=st.integers(1, 16),
    n=st.sampled_from([1, 64, 130]),
    k=st.sampled_from([32, 64, 256, 512]),
    blocksize=st.sampled_from([32, 64, 128]),
    slots=st.integers(1, 5),
    rank=st.integers(1, 24),
    dtype=st.sampled_from(HALF),
    f32_bank=st.booleans(),
    bias=st.booleans(),
    double_quant=st.booleans(),
    split=st.sampled_from([None, 1, 2, 5]),
    data=st.data(),
)
def test_adapters_random(kernel_device, m, n, k, blocksize, slots, rank, dtype, f32_bank, bias, double_quant, split,
                         data):  # fmt: skip
    """Random batches: any slot or -1 per row, adapters of random ranks padded to the bank's R."""
    index = data.draw(st.lists(st.integers(-1, slots - 1), min_size=m, max_size=m), label="index")
    ranks = data.draw(st.lists(st.integers(0, rank), min_size=slots, max_size=slots), label="ranks")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    bank_dtype = torch.float32 if f32_bank else dtype
    problem = bank_problem(m, n, k, slots, rank, dtype, bank_dtype, bias, blocksize, double_quant, index, seed, ranks)
    check_rows(run(kernel_device, *problem, split=split), *problem)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_base_only_rows_equal_the_base_call_bit_for_bit(kernel_device, dtype):
    """Rows with index -1 get exactly the base result (`nf4_gemv` without an adapter, same split): nothing
    of the other rows' adapters leaks into them; a batch of base-only rows is the base call."""
    index = [0, -1, 2, -1, 1, -1, -1, 0]
    q, x, a_bank, v_bank, scales, idx, b = bank_problem(8, 70, 256, 3, 16, dtype, torch.float32, True, 64, True,
                                                        index, seed=5)  # fmt: skip
    on = lambda t: t.to(kernel_device)  # noqa: E731
    base = nf4_gemv(on(x), q.to(kernel_device), bias=on(b), split=2).cpu()
    mixed = run(kernel_device, q, x, a_bank, v_bank, scales, idx, b, split=2)
    none = run(kernel_device, q, x, a_bank, v_bank, scales, torch.full((8,), -1, dtype=torch.int32), b, split=2)
    base_rows = idx < 0
    assert torch.equal(mixed[base_rows], base[base_rows]) and torch.equal(none, base)
    assert not torch.equal(mixed[~base_rows], base[~base_rows])


def test_int64_index_gives_the_int32_result(kernel_device):
    index = [2, -1, 0, 1]
    q, x, a_bank, v_bank, scales, idx, b = bank_problem(4, 40, 64, 3, 5, torch.bfloat16, torch.bfloat16, True, 64,
                                                        False, index, seed=9)  # fmt: skip
    y32 = run(kernel_device, q, x, a_bank, v_bank, scales, idx, b)
    assert torch.equal(run(kernel_device, q, x, a_bank, v_bank, scales, idx.long(), b), y32)
    check_rows(y32, q, x, a_bank, v_bank, scales, idx, b)


class _Spy:
    """Records the grid and meta-parameters of a kernel's launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch_(*args, **meta):
            self.calls.append((grid, meta))
            return self.kernel[grid](*args, **meta)

        return launch_


@pytest.mark.parametrize("mma_v2", [False, True], ids=["wgmma-order", "mma.sync-order"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_register_table_path(monkeypatch, kernel_device, dtype, mma_v2):
    """fp16/bf16, blocksize 64, K % 256 == 0: the adapter launch runs the register-table kernel (LUT, with
    the low-rank programs) and M * ceil(R / 16) of them per slice before the W tiles (128 rows, or 64 with
    mma.sync), then the epilogue's gathered path; rows past N, 3 slices of the 10 chunks."""
    monkeypatch.setattr(gemv, "mma_v2", lambda device: mma_v2)
    main, epilogue = _Spy(gemv._nf4_gemv_kernel), _Spy(gemv._nf4_gemv_epilogue_kernel)
    monkeypatch.setattr(gemv, "_nf4_gemv_kernel", main)
    monkeypatch.setattr(gemv, "_nf4_gemv_epilogue_kernel", epilogue)
    gemv._plan.cache_clear()
    index = [1, 0, -1, 1, 2, 2, 0]
    problem = bank_problem(7, 130, 2560, 3, 18, dtype, torch.float32, True, 64, True, index, seed=3)
    try:
        check_rows(run(kernel_device, *problem, split=3), *problem)
    finally:
        gemv._plan.cache_clear()
    ((grid, meta),) = main.calls
    bn = gemv.LUT_BN_V2 if mma_v2 else gemv.LUT_BN
    assert meta["LUT"] and meta["HAS_A"] and meta["MMA_V2"] == mma_v2 and meta["BK"] == gemv.LUT_BK
    assert grid == (3, 7 * 2 + gemv.cdiv(130, bn))  # slices of 4, 4 and 2 chunks; 2 rank tiles a row
    ((_, epi_meta),) = epilogue.calls
    assert epi_meta["FUSED_U"]


def test_applies_where_the_low_rank_programs_are_compiled():
    assert adapters_fuse(torch.bfloat16, 8192) and adapters_fuse(torch.float16, 96)
    assert not adapters_fuse(torch.float32, 8192) and not adapters_fuse(torch.bfloat16, 130)


def test_validation():
    q, x, a_bank, v_bank, scales, index, _ = bank_problem(2, 8, 64, 2, 4, torch.float16, torch.float32, False, 64,
                                                          False, [0, 1], seed=1)  # fmt: skip
    with pytest.raises(ValueError, match="fp16/bf16 x with K % 32 == 0"):
        launch_adapters(x.float(), q, a_bank, v_bank, scales, index, None)
    with pytest.raises(ValueError, match=r"a_bank \[S, R, 64\] and v_bank \[S, R, 8\]"):
        launch_adapters(x, q, a_bank[:, :, :32], v_bank, scales, index, None)
    with pytest.raises(ValueError, match="share S >= 1 and R >= 1"):
        launch_adapters(x, q, a_bank[:, :0], v_bank[:, :0], scales, index, None)
    with pytest.raises(TypeError, match="v_bank must be float32 or x's dtype"):
        launch_adapters(x, q, a_bank, v_bank.to(torch.bfloat16), scales, index, None)
    with pytest.raises(ValueError, match=r"scales float32 \[2\]"):
        launch_adapters(x, q, a_bank, v_bank, scales.half(), index, None)
    with pytest.raises(ValueError, match=r"index int32 or int64 \[2\]"):
        launch_adapters(x, q, a_bank, v_bank, scales, index[:1], None)
