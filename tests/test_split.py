"""The split-K choice of the decode kernel (`choose_split`), pinned by its documented cost model.

An independent re-implementation of `memory_us`' documented formula (bytes of codes, absmax, x, A, B,
output, bias and the float32 partial sums; the Little's-law efficiency from the bytes one program keeps
in flight; the epilogue's L2 round trips and two launches) picks the argmin over the documented split
candidates on a grid of decode shapes; `choose_split` must pick the same on every one. The hardware
figures (bandwidth, latencies, programs per SM) are read from the module: the bytes are what is pinned.
"""

import math

import pytest
import torch

from nf4.kernels import gemv

R = 16  # MODEL_RANK: the rank the choice assumes
BLOCKSIZE = 64


def candidates(k: int, bk: int) -> list[int]:
    """Split factors of whole bk-code steps: at least 4 steps per slice; on the register-table path
    (bk = 256) at most 4 steps per slice and at least one."""

    def effective(s):
        return math.ceil(k / (math.ceil(math.ceil(k / s) / bk) * bk))

    if bk == 256:
        requests = range(math.ceil(k / (4 * bk)), k // bk + 1)
    else:
        requests = range(1, max(1, k // (bk * 4)) + 1)
    return sorted({effective(s) for s in requests})


def predicted_us(n: int, k: int, m: int, split: int, bk: int, sms: int) -> tuple[float, float]:
    lut = bk == 256
    rows = gemv.LUT_BN if lut else 256  # rows of W per program: 256 bf16 rows on the streaming path
    stages = 1 if lut else (3 if bk == 64 else 2)
    in_flight = rows * (bk / 2) * max(1, stages - 1)  # bk codes of a row are bk / 2 bytes
    codes = n * k / 2
    absmax = n * k / BLOCKSIZE * (1 + 4 / 256)  # uint8 codes + a float32 per 256 blocks
    io = 2 * m * k + 4 * R * (k + n) + 2 * m * n + 2 * n
    partials = 2 * 4 * split * m * (n + R)  # float32, written then read back
    programs = math.ceil(n / rows) * split
    resident = min(programs / sms, gemv.LUT_RESIDENT) if lut else programs / sms
    need = gemv.BANDWIDTH / gemv.H200_SMS * gemv.DRAM_LATENCY_US * 1e-6
    eff = min(1.0, resident * in_flight / need)
    memory = (codes + absmax + io + partials) / (gemv.BANDWIDTH * eff) * 1e6
    per_step = gemv.SPLITS_PER_STEP.value
    trips = math.ceil(split / per_step) + math.ceil(R / 16) * (1 + math.ceil(split / per_step)) + 1
    return memory, trips * gemv.L2_ROUND_TRIP_US + 2 * gemv.LAUNCH_US


def expected_split(n, k, m, bk, sms) -> int:
    return min((sum(predicted_us(n, k, m, s, bk, sms)), s) for s in candidates(k, bk))[1]


SHAPES = [(n, k) for n in (1024, 2048, 4096, 8192, 14336, 28672) for k in (1024, 2048, 4096, 8192, 14336)]


@pytest.mark.parametrize("sms", [132, 114, 108])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_choose_split_is_the_argmin_of_the_documented_cost(m, sms):
    wrong = []
    for n, k in SHAPES:
        for bk in sorted({gemv.step_k(k, BLOCKSIZE), 64}):
            got, want = gemv.choose_split(n, k, m, bk, sms), expected_split(n, k, m, bk, sms)
            if got != want:
                wrong.append(((n, k, m, bk), got, want))
    assert not wrong, f"(n, k, m, bk), chosen, documented argmin: {wrong[:10]} ({len(wrong)} in all)"


@pytest.mark.parametrize("n,k,m,bk", [(8192, 8192, 1, 256), (4096, 14336, 16, 256), (2048, 4096, 4, 64)])
def test_memory_and_fixed_terms_equal_the_documented_bytes(n, k, m, bk):
    for split in candidates(k, bk):
        assert gemv.split_candidates(k, bk) == candidates(k, bk)
        memory, fixed = gemv.memory_us(n, k, m, split=split, sms=gemv.H200_SMS, bk=bk)
        want_memory, want_fixed = predicted_us(n, k, m, split, bk, gemv.H200_SMS)
        assert memory == pytest.approx(want_memory, rel=1e-12) and fixed == pytest.approx(want_fixed, rel=1e-12)
        assert gemv.model_us(n, k, m, split=split, bk=bk) == pytest.approx(want_memory + want_fixed, rel=1e-12)


def test_documented_example_and_the_cpu():
    bk = gemv.step_k(8192, BLOCKSIZE)
    assert [gemv.choose_split(8192, 8192, m, bk, gemv.H200_SMS) for m in (1, 16)] == [8, 8]
    assert gemv.split_for(8192, 8192, 1, bk, torch.device("cpu")) == 1
