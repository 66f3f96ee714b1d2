"""The decode kernel (`nf4.kernels.gemv`, M <= 16) against the float64 oracle, its compiled variants,
and its inner loop's instruction budget.

Tolerance: at most twice the error torch makes computing the same thing in the same dtype (weight
dequantized to that dtype, torch's matmul, the low-rank term and bias in that dtype), plus two ulps at
the output's scale.
"""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nf4
from helpers import static_module, without_interpreter
from nf4 import reference
from nf4.kernels.gemv import gemv_configs, nf4_gemv, step_k

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
revision = static_module("revision")


def problem(m, n, k, r, dtype, bias, blocksize, double_quant, seed, v_dtype=None, bias_dtype=torch.float32):
    """x and u in `dtype`; v (B^T) in `v_dtype` (default `dtype`; float32 for a float32 adapter); the bias
    in `bias_dtype`: the epilogue reads v and the bias in their own dtypes."""
    g = torch.Generator().manual_seed(seed)
    q = nf4.quantize(torch.randn(n, k, generator=g), blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    u = (torch.randn(m, r, generator=g)).to(dtype) if r else None
    v = (torch.randn(r, n, generator=g) / 4).to(v_dtype or dtype) if r else None
    b = torch.randn(n, generator=g).to(bias_dtype) if bias else None
    return q, x, u, v, b


def check(y, q, x, u, v, b, lora_scale=1.0):
    dtype = x.dtype
    w = nf4.dequantize(q, torch.float32)
    exact = reference.matmul_ref(x.double(), w.double(), False, u, v, b, lora_scale=lora_scale)
    torch_y = x @ w.to(dtype).t()
    if u is not None:
        torch_y = torch_y + (u.to(dtype) @ v.to(dtype)) * lora_scale
    if b is not None:
        torch_y = torch_y + b.to(dtype)
    torch_err = (torch_y.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    err = (y.double() - exact).abs().max().item()
    assert y.dtype == dtype and y.shape == exact.shape
    assert err <= 2 * torch_err + 2 * ulp, (err, torch_err, ulp)


def run_and_check(device, q, x, u, v, b, split=None, a=None, lora_scale=1.0):
    """With `a` ([r, K]), u is x @ a^T computed by the kernel; the oracle uses it in float64."""
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = nf4_gemv(on(x), q.to(device), u=on(u), v=on(v), bias=on(b), split=split, a=on(a), lora_scale=lora_scale)
    if a is not None:
        u = x.double() @ a.double().t()
    check(y.cpu(), q, x, u, v, b, lora_scale)


@given(
    m=st.integers(1, 16),
    n=st.sampled_from([1, 3, 100, 257]),
    k=st.sampled_from([1, 2, 63, 130, 32, 64, 96, 192]),
    r=st.sampled_from([0, 1, 16, 17, 40]),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    blocksize=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
    double_quant=st.booleans(),
    split=st.sampled_from([None, 2, 3, 11]),
    f32_adapter=st.booleans(),
    bias_dtype=st.sampled_from([torch.float32, None]),
    fused_a=st.booleans(),
    lora_scale=st.sampled_from([1.0, 2.5, 0.375]),
    seed=st.integers(0, 2**16),
)
def test_gemv_matches_reference(
    kernel_device,
    m,
    n,
    k,
    r,
    dtype,
    bias,
    blocksize,
    double_quant,
    split,
    f32_adapter,
    bias_dtype,
    fused_a,
    lora_scale,
    seed,
):
    v_dtype = torch.float32 if f32_adapter else dtype
    q, x, u, v, b = problem(m, n, k, r, dtype, bias, blocksize, double_quant, seed, v_dtype, bias_dtype or dtype)
    a = None
    if fused_a and r:  # the adapter's A instead of u: x @ A^T computed by the kernel's extra row tile
        a, u = (torch.randn(r, k, generator=torch.Generator().manual_seed(seed)) / k**0.5).to(v_dtype), None
    run_and_check(kernel_device, q, x, u, v, b, split, a, lora_scale)


PATHS = [  # (K, blocksize): register table (fp16/bf16), 64-column steps, 32-column steps (blocksize 32 /
    (512, 64),  # K % 64 == 32), general path
    (128, 64),
    (96, 128),
    (64, 32),
    (130, 64),
    (63, 32),
]


@pytest.mark.parametrize("k,blocksize", PATHS, ids=[f"K={k}-bs={bs}" for k, bs in PATHS])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_every_code_path(kernel_device, k, blocksize, double_quant, dtype, m):
    q, x, u, v, b = problem(m, 300, k, 16, dtype, True, blocksize, double_quant, seed=k + blocksize)
    run_and_check(kernel_device, q, x, u, v, b, split=2, lora_scale=2.5)


def test_step_choice():
    assert step_k(8192, 64) == 256 and step_k(8192, 64, torch.float16) == 256  # the register table
    assert step_k(8192, 64, torch.float32) == 64 and step_k(8192, 128) == 64 and step_k(8320, 64) == 64
    assert step_k(8192, 32) == 32 and step_k(96, 64) == 32


@pytest.mark.parametrize("mma_v2", [False, True], ids=["wgmma-order", "mma.sync-order"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "m,n,k,split,fused_a",
    [(1, 130, 256, None, True), (7, 300, 1280, 2, False), (16, 64, 2560, None, True), (3, 129, 768, 3, True)],
    ids=["1x130x256", "7x300x1280-split2", "16x64x2560", "3x129x768-split3"],
)
def test_register_table_path(monkeypatch, kernel_device, m, n, k, split, fused_a, dtype, double_quant, mma_v2):
    """fp16/bf16, blocksize 64, K % 256 == 0: W read in fragment order, looked up in registers (the
    interpreter's twin here), the K order permuted as wgmma (or Triton's mma.sync layout) holds it; rows
    past N (tiles of 128), programs of 1 to 4 chunks of 256 codes (K = 2560 is 10 chunks: at least 3
    slices), the adapter's A fused or u given."""
    from nf4.kernels import gemv

    monkeypatch.setattr(gemv, "mma_v2", lambda device: mma_v2)
    gemv._plan.cache_clear()
    q, x, u, v, b = problem(m, n, k, 16, dtype, True, 64, double_quant, seed=m + n + k, v_dtype=torch.float32)
    a = None
    if fused_a:
        a, u = torch.randn(16, k, generator=torch.Generator().manual_seed(k)) / k**0.5, None
    try:
        run_and_check(kernel_device, q, x, u, v, b, split, a)
    finally:
        gemv._plan.cache_clear()


def test_register_table_slices_hold_at_most_four_chunks():
    """A program decodes the absmax of its slice before its loop (4 chunks of 256 codes at most): the plan
    raises a smaller split, and the split candidates never exceed it."""
    from nf4.kernels import gemv

    plan = gemv._plan(1, 256, 4096, torch.bfloat16, torch.device("cpu"), 64, True, 1, 0)
    assert plan.split == 4 and plan.scalars[2] == 1024
    assert all(gemv.cdiv(8192, s) <= 1024 for s in gemv.split_candidates(8192, gemv.LUT_BK))


def test_blocks_crossing_rows_and_many_splits(kernel_device):
    # K = 96 with blocksize 64: every other block straddles two rows; split 5 leaves a short last slice
    q, x, u, v, b = problem(4, 70, 96 * 3, 3, torch.bfloat16, True, 64, True, seed=7)
    run_and_check(kernel_device, q, x, u, v, b, split=5)


def test_epilogue_steps_and_rank_chunks(kernel_device):
    # split 20 (three epilogue steps of 8 slices, the last one partial), r = 40 (three chunks of 16 ranks,
    # the last one partial), B^T float32 as a float32 adapter gives it,
    # the bf16 bias; x scaled down so that the low-rank term dominates (a missing rank chunk shows)
    q, x, u, v, b = problem(3, 70, 64 * 20, 40, torch.bfloat16, True, 64, True, 11, torch.float32, torch.bfloat16)
    run_and_check(kernel_device, q, x * 0.01, u, v, b * 0.01, split=20, lora_scale=0.375)
    # the same with u = x @ A^T from the kernel (float32 A): its slices summed 8 at a time too
    a = torch.randn(40, 64 * 20, generator=torch.Generator().manual_seed(5)) * 4
    run_and_check(kernel_device, q, x * 0.01, None, v, b * 0.01, split=20, a=a, lora_scale=2.5)


def test_validation(kernel_device):
    q = nf4.quantize(torch.randn(8, 64)).to(kernel_device)
    x = torch.randn(17, 64, device=kernel_device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_gemv(x, q)
    with pytest.raises(ValueError, match="K = 64"):
        nf4_gemv(x[:2, :32], q)
    with pytest.raises(ValueError, match="both u"):
        nf4_gemv(x[:2], q, u=torch.zeros(2, 4, device=kernel_device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4_gemv(x[:2].double(), q)
    assert nf4_gemv(x[:0], q).shape == (0, 8)


def test_inputs_not_modified(kernel_device):
    q, x, u, v, b = problem(3, 10, 64, 2, torch.float16, True, 64, True, seed=3)
    before = [t.clone() for t in (x, u, v, b, q.packed, q.absmax)]
    nf4_gemv(x.to(kernel_device), q.to(kernel_device), u=u.to(kernel_device), v=v.to(kernel_device), bias=b)
    assert all(torch.equal(a, c) for a, c in zip(before, (x, u, v, b, q.packed, q.absmax), strict=True))


def test_configuration_names():
    """The compiles themselves (sm_80 and sm_90, triton 3.6 and 3.9, every specialisation) are in
    tests/test_compile.py, which compiles `benchmarks/static/aot.py`'s `all_configs()`, these included."""
    all_configs = static_module("aot").all_configs

    names = [cfg.name for cfg in gemv_configs()]
    assert len(set(names)) == len(names) and all(name.startswith("nf4_gemv[") for name in names)
    assert set(names) <= {cfg.name for cfg in all_configs()}


def test_inner_loop_fits_the_issue_and_l1_budgets():
    """sm_90, the register-table loop (bf16 and fp16, double quant or not, with the low-rank program, as a
    LoRALinearNF4 decode call launches it): at most `sass.BUDGET` (~8.2) lane-instructions
    and L1_TARGET (0.8) of the L1 budget per byte of W, no data-dependent load from global memory, at
    most one byte moved through shared memory per byte of W (the tensor-core operand x apart), W read
    8 bytes at a time straight into registers."""
    out = without_interpreter(
        "import json\n"
        "from sass import BUDGET, L1_TARGET, gemv_loop_report\n"
        "for dt, dq in (('bf16', True), ('bf16', False), ('fp16', True)):\n"
        "    r = gemv_loop_report(dt, dq, 90)\n"
        "    print(json.dumps(dict(dt=dt, dq=dq, per_byte=r.per_byte, l1=r.l1_fraction, lookups=r.global_lookups,"
        " shared=r.shared_bytes_per_byte, w_load=r.w_load, table=r.table, budget=BUDGET, target=L1_TARGET)))\n"
    )
    for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
        assert r["per_byte"] <= r["budget"] and r["l1"] <= r["target"], r
        assert r["lookups"] == 0 and r["table"] == "registers" and r["shared"] <= 1.0, r
        assert r["w_load"] == "LDG.E.64", r


@pytest.mark.skipif(not revision.available(revision.BASE), reason=f"revision {revision.BASE} is not in this clone")
def test_l1_model_flags_the_loop_of_2d550bf():
    """The decode kernel of 2d550bfb5869, built from git: its sm_90 bf16 loop copies 64 pair-table entries
    per thread and step into shared memory with 4-byte LDGSTS (not LDG) and reads them back with LDSM:
    data-dependent loads from global memory, several times the L1 budget and more than one byte of
    shared-memory traffic per byte of W. LDGDEPBAR (the commit of the copies) is not counted as a load."""
    r = static_module("sass").revision_loop_report(revision.BASE, "bf16", True, 90, bk=64)
    assert r.l1_fraction > 2 and r.table == "global" and r.lookups["pairs_ptr"] == 64, r
    assert r.shared_bytes_per_byte > 4, r
    kinds = {m.op: m.kind for m in r.memory}
    assert kinds["LDGSTS.E"] == "async" and "LDGDEPBAR" not in kinds, kinds
    assert all(m.lookup == "pairs_ptr" for m in r.memory if m.op == "LDGSTS.E"), r.memory
    assert r.per_byte < 8.2  # the issue budget alone did not show it


def test_epilogue_keeps_the_split_loads_in_flight():
    """sm_90: the epilogue's split-K loop issues its SPLITS_PER_STEP slices' loads together, 128 bits
    wide, with no barrier or shared-memory store between them (the first version waited for every
    slice: 32-bit loads, each followed by its add; ~15 us at 8192x8192 M = 1, benchmarks/static/sass.py)."""
    out = without_interpreter("import json\nfrom sass import epilogue_report\nprint(json.dumps(epilogue_report()))\n")
    report = json.loads(out.strip().splitlines()[-1])
    from nf4.kernels.gemv import SPLITS_PER_STEP

    assert report["wide_loads"] >= SPLITS_PER_STEP.value, report
    assert report["narrow_loads"] == 0 and report["barriers"] == 0 and report["shared_stores"] == 0, report


@pytest.mark.parametrize("n,k,m", [(8192, 8192, 1), (14336, 4096, 1), (4096, 4096, 1), (8192, 8192, 16)])
def test_split_choice_keeps_w_in_flight_and_partial_sums_small(n, k, m):
    """The split-K factor chosen for the H200 (`choose_split`, by `model_us`): enough programs that each
    SM keeps its share of the bandwidth x DRAM latency of W in flight (Little's law; the register-table
    path holds LUT_RESIDENT programs per SM), while the float32 partial sums written and read back stay
    under a third of W's bytes and the epilogue waits for at most 6 L2 round trips. (The first choice,
    8 programs per SM regardless of M, gave 32 slices at 8192x8192: partial sums as large as W at M = 16
    and 51 epilogue round trips.)"""
    from nf4.kernels import gemv

    bk = step_k(k, 64)
    assert bk == gemv.LUT_BK
    split = gemv.choose_split(n, k, m, bk, gemv.H200_SMS)
    assert split == gemv.effective_split(k, split, bk) and gemv.cdiv(k, split) <= gemv.LUT_CHUNKS * bk
    resident = min(gemv.cdiv(n, gemv.LUT_BN) * split / gemv.H200_SMS, gemv.LUT_RESIDENT)
    in_flight_per_sm = resident * gemv.in_flight_bytes(gemv.LUT_BN, bk, 1)
    assert in_flight_per_sm >= gemv.BANDWIDTH / gemv.H200_SMS * gemv.DRAM_LATENCY_US * 1e-6
    assert 8 * split * m * n <= n * k / 2 / 3
    assert gemv.epilogue_round_trips(split, 16) <= 6
    assert gemv.split_for(n, k, m, bk, torch.device("cpu")) == 1  # the interpreter: one slice (raised to 4 chunks)
