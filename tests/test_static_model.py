"""The per-pipe static model (benchmarks/static/model.py) scored against the one GPU run we have.

Backtest: the kernels of commit 2d6bb1ae850a as the H200 ran them on 2026-11-29 (triton 3.6, sm_90; SASS
recorded in benchmarks/static/fixtures/, see its README), each large-shape measurement of
benchmarks/results/2026-11-29-h200/README.md ("backtest numbers") predicted within ±20 %. The model is not fitted
to these numbers. Its constants:
- lanes per clock per SM of each pipe: CUDA C++ Programming Guide, "Throughput of Native Arithmetic
  Instructions" (FP32 128 on sm_90 / 64 on sm_80; integer add, logic, shift, compare, select, PRMT 64;
  IMAD 64; conversions and MUFU 16); 4 warp-instructions issued per SM per clock (4 schedulers);
- L1 / shared memory: one 128-byte wavefront per clock per SM; 32 banks of 4 bytes;
- H200: 132 SMs, 1.98 GHz (maximum boost clock of the H100/H200 SXM), 4.1 TB/s (copy bandwidth measured
  in the same run as the kernels);
- DRAM latency 0.4 µs (published H100 HBM3 figures, model.py's header).
"""

import functools

import pytest

from helpers import static_module, without_interpreter

model = static_module("model")
backtest = static_module("backtest")


@functools.cache
def rows() -> dict:
    """label -> (terms, measured µs) of every backtest launch (a few seconds: computed once, when used)."""
    return {label: (terms, measured) for label, terms, measured in backtest.rows()}


@pytest.mark.parametrize(
    "label",
    [
        "dequantize_bf16_dq0_8192x8192",
        "dequantize_bf16_dq0_4096x14336",
        "dequantize_bf16_dq1_8192x8192",
        "dequantize_bf16_dq1_4096x14336",
        "quantize_bf16_8192x8192",
        "matmul_m1_r16_split3_8192x8192",
    ],
)
def test_backtest_within_20_percent_of_the_h200(label):
    terms, measured = rows()[label]
    assert abs(terms.predicted_us / measured - 1) <= 0.20, (label, terms.bound, terms.predicted_us, measured)


def test_the_old_dequantize_and_quantize_were_alu_bound_not_memory_bound():
    """The 2026-11-29 H200 backtest: both were bound by the 64-lane integer pipe, above their DRAM time."""
    for label in ("dequantize_bf16_dq1_8192x8192", "quantize_bf16_8192x8192"):
        terms, _ = rows()[label]
        assert terms.bound[0] == "pipe alu" and terms.pipes_us["alu"] > terms.dram_us, terms
        assert terms.unresolved <= 1, terms


def test_the_old_decode_was_bound_by_its_staging_buffers_bank_conflicts():
    """The 2026-11-29 H200 backtest: the pair-table gathers' shared writes (LDGSTS) and their read-back (LDS.64)
    put the 32 lanes 256 bytes apart: 32 wavefronts each, 1024 of the loop's wavefronts per warp-iteration,
    and the launch is L1-bound far above its DRAM time."""
    terms, _ = rows()["matmul_m1_r16_split3_8192x8192"]
    launch = next(launch for launch, _ in backtest.launches() if launch.name == "matmul_m1_r16_split3_8192x8192")
    loop = model.sass._hot_loop_addresses(model.sass_instructions(launch.sass_text))
    staging = [a for a in terms.accesses if a.addr in loop and a.op in ("LDGSTS.E.64", "LDS.64")]
    assert len(staging) == 32 and all(a.lanes is not None for a in staging)
    assert all(model.shared_wavefronts("STS.64" if a.op == "LDGSTS.E.64" else a.op, a.lanes) == 32 for a in staging)
    assert terms.bound[0] == "L1" and terms.l1_us > 10 * terms.dram_us, terms


def test_pipe_rates_follow_the_programming_guide():
    assert model.LANES_PER_CLK[90]["fp32"] == 128 and model.LANES_PER_CLK[80]["fp32"] == 64
    assert all(model.LANES_PER_CLK[a]["alu"] == 64 and model.LANES_PER_CLK[a]["xu"] == 16 for a in (80, 90))
    ops = ("FFMA", "PRMT", "LOP3.LUT", "IMAD.SHL.U32", "MUFU.RCP", "F2FP.BF16.F32.PACK_AB", "BAR.SYNC")
    assert [model.pipe(op) for op in ops] == ["fp32", "alu", "alu", "fmaheavy", "xu", "xu", "issue"]


@pytest.mark.parametrize(
    "op,stride,width,expected",
    [
        ("STS", 4, 4, 1),  # consecutive words: one wavefront
        ("STS", 0, 4, 1),  # one word: broadcast
        ("STS", 256, 4, 32),  # 32 lanes on one bank: 32-way conflict (the old decode's staging buffer)
        ("STS", 8, 4, 2),  # every other word: two lanes per bank
        ("LDS.64", 8, 8, 2),  # 256 bytes: two half-warp phases
        ("LDS.128", 16, 16, 4),  # 512 bytes: four quarter-warp phases
        ("LDS.U16", 2, 2, 1),  # two lanes per word
    ],
)
def test_bank_conflicts_from_lane_addresses(op, stride, width, expected):
    assert model.shared_wavefronts(op, [stride * lane for lane in range(32)]) == expected


def test_ldsm_phases_are_its_matrices():
    rows = [16 * lane for lane in range(32)]  # 32 rows of 16 bytes, consecutive
    assert model.shared_wavefronts("LDSM.16.M88.4", rows) == 4
    assert model.shared_wavefronts("LDSM.16.M88.4", [256 * lane for lane in range(32)]) == 4 * 8


def test_the_emulator_follows_thread_index_arithmetic_into_shared_addresses():
    """tid -> (tid & 31) * 256 via SASS integer ops; the store then hits one bank 32 times."""
    text = "\n".join(
        f"        /*{16 * i:04x}*/                   {ins} ;"
        for i, ins in enumerate(
            [
                "S2R R0, SR_TID.X",
                "LOP3.LUT R1, R0, 0x1f, RZ, 0xc0, !PT",
                "IMAD.SHL.U32 R2, R1, 0x100, RZ",
                "UMOV UR4, 0x400",
                "STS [R2+UR4], R5",
                "LEA R3, R1, UR4, 0x2",
                "LDS R6, [R3]",
                "EXIT",
            ]
        )
    )
    launch = model.Launch("t", text, {}, {}, grid=132, num_warps=1, registers=16, shared_bytes=8192, dram_bytes=0)
    terms = model.analyze(launch)
    assert [(a.op, a.wavefronts) for a in terms.accesses] == [("STS", 32.0), ("LDS", 1.0)]
    assert terms.unresolved == 0 and terms.wavefronts_per_warp == 33


def _sass(lines: list[str]) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate(lines))


def test_a_loop_that_waits_for_each_load_costs_a_round_trip_per_iteration():
    """The x @ A^T shape of problem: each of 64 iterations loads, then uses the value before the next load
    issues (in-order issue): 64 round trips. The same 64 loads with two in flight (32 iterations of two
    loads, each used one iteration later) wait half as often."""
    serial = ["S2R R0, SR_TID.X", "LDG.E R2, desc[UR4][R4.64]", "FADD R3, R3, R2", "BRA 0x10", "EXIT"]
    two_deep = ["S2R R0, SR_TID.X", "FADD R3, R3, R2", "LDG.E R2, desc[UR4][R4.64]", "FADD R3, R3, R6",
                "LDG.E R6, desc[UR4][R4.64+0x4]", "BRA 0x10", "FADD R3, R3, R2", "EXIT"]  # fmt: skip
    for lines, trips, expected in ((serial, 64, 64), (two_deep, 32, 32)):
        instructions = model.sass_instructions(_sass(lines))
        counts = model.trip_counts(instructions, trips)
        path = list(model.walk(instructions, model.Warp({}, {})))
        assert model.round_trips(path, counts) == expected, lines


def test_the_walk_follows_a_branch_on_the_program_id():
    """A launch with two kinds of program (W slices, and the extra row of x @ A^T programs) is walked once
    per kind: the program id decides the branch, so each kind counts only its own instructions."""
    text = _sass([
        "S2R R0, SR_CTAID.X", "ISETP.GE.AND P0, PT, R0, 0x40, PT", "@P0 BRA 0x50", "FFMA R1, R1, R1, R1",
        "EXIT", "PRMT R2, R2, 0x7610, R2", "PRMT R2, R2, 0x7610, R2", "EXIT",
    ])  # fmt: skip
    w_program = model.Launch("w", text, {}, {}, grid=132, num_warps=4, registers=32, shared_bytes=0, dram_bytes=0)
    a_program = model.Launch("a", text, {}, {"_ctaid_x": 64}, grid=132, num_warps=4, registers=32, shared_bytes=0,
                             dram_bytes=0)  # fmt: skip
    assert set(model.program_cost(w_program).cycles) == {"fp32", "fma", "alu"}
    assert model.program_cost(w_program).cycles["alu"] == 32 / 64  # the ISETP
    assert model.program_cost(a_program).cycles == {"alu": 3 * 32 / 64}


@pytest.mark.slow  # compiles the decode kernel for sm_90 (~20 s on the CPU machine)
def test_todays_low_rank_programs_chain_no_longer_binds_the_decode_call():
    """The rebuilt decode (kernels/gemv.py): x @ A^T runs in its own programs (the first ceil(r / 16) row
    tiles of the grid, one per slice), each step loading A_BK columns of A and x together, so a program
    waits for ceil(k_per_split / A_BK) round trips in a row, not one per 16 columns (64 at 8192^2, 25.6 µs:
    what bound the old call). Under the model (installed triton, sm_90, 8192^2 M = 1 r = 16): the branch on
    the program id puts each kind in its own loop, and the low-rank programs' chain term stays below the
    W stream's DRAM term and its own chain, so the combined launch's chain is W's."""
    import json

    out = without_interpreter(
        "import json, math, model, today\n"
        "from nf4.kernels import gemv\n"
        "w, others, split = today._stream_launches(8192, 8192, 1, 16)\n"
        "(a, count), = others\n"
        "wt, at, both = model.analyze(w), model.analyze(a), model.analyze(w, others)\n"
        "kps = w.values['k_per_split']\n"
        "print(json.dumps(dict(split=split, count=count, a_y=a.values['_ctaid_y'], w_y=w.values['_ctaid_y'],\n"
        "    a_steps=math.ceil(kps / gemv.A_BK.value), a_rts=at.round_trips, a_chain=at.chain_us,\n"
        "    w_dram=wt.dram_us, w_chain=wt.chain_us, both_chain=both.chain_us, w_loop_trips=max(w.trips.values()),\n"
        "    a_loop_trips=max(a.trips.values()), chunks=kps // gemv.LUT_BK)))\n"
    )
    got = json.loads(out.strip().splitlines()[-1])
    assert got["count"] == got["split"] and (got["a_y"], got["w_y"]) == (0, 1), got  # one rank tile per slice
    assert got["a_loop_trips"] == got["a_steps"] and got["w_loop_trips"] == got["chunks"], got
    assert got["a_rts"] <= got["a_steps"] + 2, got  # one round trip per A_BK-column step, not per 16 columns
    assert got["a_chain"] < got["w_dram"] and got["a_chain"] < got["w_chain"] == got["both_chain"], got


@pytest.mark.slow  # compiles two kernels for sm_90 (~10 s on the CPU machine)
def test_doras_fused_passes_are_bound_by_dram_alone():
    """`nf4.kernels.dora` at 4096 x 4096 bf16 (benchmarks/static/dora_step.py's rows): under the model both
    kernels are bound by their bytes at the copy bandwidth, every other term (issue, pipes, L1, Little's
    law, the chain) below it. A grad kernel whose programs walk 128 rows in 8-row steps was Little's-law
    bound at 3x its DRAM time (256 bytes a warp in flight); one 32 x 256 tile a program keeps 8 KB."""
    import json

    out = without_interpreter(
        "import json, model, today\n"
        "m = n = 4096\n"
        "for cfg, values, grid, moved in (\n"
        "    ('dora_scale[bfloat16]', dict(M=m, N=n, has_extra=0, has_bias=0), (m // 8) * (n // 256), 4 * m * n),\n"
        "    ('dora_grad[bfloat16]', dict(M=m, N=n), (m // 32) * (n // 256), 6 * m * n + 4 * (m // 32) * n)):\n"
        "    t = model.analyze(today._launch(cfg, cfg, values, grid, moved, 1))\n"
        "    print(json.dumps(dict(name=cfg, bound=t.bound[0], dram=t.dram_us, little=t.littles_us,\n"
        "        chain=t.chain_us, issue=t.issue_us, l1=t.l1_us)))\n"
    )
    rows = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["dora_scale[bfloat16]", "dora_grad[bfloat16]"]
    for r in rows:
        assert r["bound"] == "DRAM" and max(r["little"], r["chain"], r["issue"], r["l1"]) <= r["dram"], r
        assert abs(r["dram"] - (4 if "scale" in r["name"] else 6.125) * 4096**2 / 4.1e12 * 1e6) < 0.1, r
