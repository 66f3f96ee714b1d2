"""The per-pipe model (`model.py`) applied to this checkout's kernels, sm_90, H200 constants.

    python benchmarks/static/today.py            (without TRITON_INTERPRET; PYTHONPATH=<triton 3.6> for 3.6)

Rows (issue 22): a LoRALinearNF4 decode call (bf16 x, double-quantized W, blocksize 64, float32 adapter
of rank r, no bias, L2 flushed) at 8192 x 8192 M = 1 r = 16 and r = 0, M = 16 r = 16, 4096 x 4096 M = 1
r = 16, and (issue 25, `gemv.launch_adapters`) 8192 x 8192 M = 16 over 16 distinct float32 adapters of rank 16:
the streaming kernel then the epilogue, plus `model.LAUNCH_US` per kernel; dequantize and
quantize at 8192 x 8192. The streaming kernel's grid is (split, ceil(r / 16) + N / 128): the first
ceil(r / 16) row tiles are low-rank programs (x @ A^T of one slice and 16 ranks, `gemv.A_BK` columns a
step), the rest W programs (one 256-code chunk a step); each kind is walked along its own branch (its
program id in `Launch.values`) with its own loop's trip count, and `model.analyze` adds both kinds up
on one SM. A second table gives each kind alone. Each kernel is compiled with the installed triton as
the runtime specialises it at those arguments (`record.compile_launch`), with the launcher's own
split-K choice (`nf4.kernels.gemv.choose_split` on 132 SMs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aot  # noqa: E402
import model  # noqa: E402
import record  # noqa: E402


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(label: str, cfg_name: str, values: dict, grid: int, dram_bytes: float, trips) -> model.Launch:
    cfg = next(c for c in aot.all_configs() if c.name == cfg_name)
    rec = record.compile_launch(cfg, values)
    return model.Launch(label, rec["sass"], {int(k): v for k, v in rec["params"].items()}, values, grid,
                        rec["num_warps"], rec["registers"], rec["shared_bytes"], dram_bytes, trips)  # fmt: skip


def _loops(launch: model.Launch) -> list[tuple[int, int]]:
    return sorted(model.loops_of(model.sass_instructions(launch.sass_text)))


def _roles(loops: list[tuple[int, int]], entered: list[int]) -> tuple[int, int, int]:
    """Indices (in address order) of the lone loop, and of the outer and inner loop of the nested pair,
    among the three loops `entered` (the compilers place them in either order)."""
    pairs = [(i, j) for i in entered for j in entered
             if i != j and loops[i][0] <= loops[j][0] <= loops[j][1] <= loops[i][1]]  # fmt: skip
    assert len(entered) == 3 and len(pairs) == 1, (loops, entered)
    outer, inner = pairs[0]
    return (set(entered) - {outer, inner}).pop(), outer, inner


def _stream_launches(n: int, k: int, m: int, r: int, bank: bool = False
                     ) -> tuple[model.Launch, list[tuple[model.Launch, int]], int]:  # fmt: skip
    """The streaming kernel of a decode call as the model sees it: the W programs' Launch (its `dram_bytes`
    the whole kernel's), the low-rank programs as `others` [(Launch, how many)] (empty at r = 0), and
    the split. Grid (split, ceil(r / 16) + N / BN): program (s, j) with j < ceil(r / 16) computes x @ A^T
    for ranks 16 j .. of slice s, A_BK columns a step; the rest stream W, one 256-code chunk a step.
    `bank` (`gemv.launch_adapters`, every row its own float32 adapter): M ceil(r / 16) low-rank programs
    per slice, each one row's x @ a_bank[index[row]]^T for 16 ranks; A read once per row."""
    from nf4.kernels import gemv

    bk, bn = gemv.LUT_BK, gemv.LUT_BN
    split = max(gemv.choose_split(n, k, m, bk, model.SMS), cdiv(k, gemv.LUT_CHUNKS * bk))
    kps = cdiv(cdiv(k, split), bk) * bk
    split = cdiv(k, kps)
    a_tiles = cdiv(r, 16) * (m if bank else 1)
    values = dict(M=m, N=n, K=k, KB=k // 2, stride_xm=k, log2_bs=6, n_blocks=n * k // 64, k_per_split=kps,
                  kb_per_split=kps // 2, r=r, stride_as=r * k, stride_ar=k, stride_ak=1,
                  has_index=int(bank))  # fmt: skip
    w_bytes = n * k / 2 + n * k / 64 * (1 + 4 / 256)  # packed codes, absmax codes, nested absmax
    a_bytes = 4 * r * k * (m if bank else 1) + 4 * split * m * r  # float32 A read once (a row), x @ A^T's slices
    moved = w_bytes + 2 * m * k + 4 * split * m * n + a_bytes  # + x, W's partial sums written
    a_name = ",A=fp32" if r else ""
    name = f"nf4_gemv[bf16,aligned=1,dq=1,BN={bn},BK={bk},mma=v3{a_name}]"
    call = f"{n}x{k} M={m} r={r}" + (f" {m} adapters" if bank else "")
    w = _launch(f"{call}: stream", name, {**values, "_ctaid_x": 0, "_ctaid_y": a_tiles}, cdiv(n, bn) * split, moved, 1)
    loops = _loops(w)
    a_step = gemv.A_BK.value
    w_trips, a_trips = kps // bk, cdiv(kps, a_step)
    if not r:
        assert len(loops) == 1, loops
        w.trips = {0: w_trips}
        return w, [], split
    # three loops, the W chunk loop and x @ A^T's column loops (all rows' A, or one row's bank slot), in
    # any address order: each kind's walk reaches only its own, so the loop its walk enters is its own
    assert len(loops) == 3, loops
    a = model.Launch(f"{call}: x@A^T only", w.sass_text, w.params, {**values, "_ctaid_x": 0, "_ctaid_y": 0},
                     a_tiles * split, w.num_warps, w.registers, w.shared_bytes, 2 * m * k + a_bytes)  # fmt: skip
    (w_loop,), (a_loop,) = (_entered(lc, loops) for lc in (w, a))
    assert w_loop != a_loop, (loops, w_loop, a_loop)
    w.trips, a.trips = {w_loop: w_trips, a_loop: 1}, {a_loop: a_trips, w_loop: 1}
    return w, [(a, a_tiles * split)], split


def _entered(launch: model.Launch, loops: list[tuple[int, int]], count: int = 1) -> list[int]:
    """Indices of the `count` loops whose bodies the walk of `launch`'s program executes."""
    instructions = model.sass_instructions(launch.sass_text)
    warp, seen = model.Warp(launch.params, launch.values), set()
    for a, ins in model.walk(instructions, warp):  # the walk reads the predicates the warp's steps set
        seen.add(a)
        warp.step(ins)
    entered = [i for i, (lo, hi) in enumerate(loops) if lo in seen and hi in seen]
    assert len(entered) == count, (launch.name, loops, entered)
    return entered


def decode_call(n: int, k: int, m: int, r: int, bank: bool = False) -> tuple[list, list]:
    """The two launches of a decode call, each with its terms (launch cost included); and, with r > 0, the
    streaming kernel's two kinds of program each alone (its W programs, its low-rank programs: their own
    terms, which the stream row adds up on one SM, launch cost not included). `bank`: every row its own
    float32 adapter (`gemv.launch_adapters`: M distinct slots, gathered A and B^T)."""
    from nf4.kernels import gemv

    w, others, split = _stream_launches(n, k, m, r, bank)
    label = w.name
    stream = model.analyze(w, others)
    kinds = [(f"{label[: -len('stream')]}W only", model.analyze(w), None)] if others else []
    kinds += [(lc.name, model.analyze(lc), None) for lc, _ in others]  # its grid: that kind's count
    lo, hi = _loops(w)[max(w.trips, key=w.trips.get)]
    assert stream.instructions_per_warp >= max(w.trips.values()) * (hi - lo) / 16, "the walk missed the W loop"
    stream.launch_us = model.LAUNCH_US
    fused = bool(r)
    ep_name = f"nf4_gemv[epilogue,bf16,v={'fp32' if r else 'bf16'},bias=bf16,BN={gemv.EPILOGUE_BN}"
    ep_name += ",fused_u]" if fused else "]"
    ev = dict(M=m, N=n, r=r, split=split, stride_split=m * n, stride_um=0, stride_ur=0, stride_vs=r * n, stride_vr=n,
              stride_vn=1, has_bias=0, has_index=int(bank))  # fmt: skip
    # partial sums (from L2 mostly), B (one per row with a bank), out
    ep_bytes = 4 * split * m * (n + r) + 4 * r * n * (m if bank else 1) + 2 * m * n
    steps = cdiv(split, gemv.SPLITS_PER_STEP.value)
    ep = _launch(f"{label[: -len('stream')]}epilogue", ep_name, ev, cdiv(n, gemv.EPILOGUE_BN), ep_bytes, {})
    ep_loops = _loops(ep)
    if fused:  # the slices' sum, and the rank loop holding u's sum over the slices (shared B, or gathered:
        # 16 or `gemv.GATHER_RANKS` ranks a step)
        assert len(ep_loops) == 5, ep_loops
        lone, outer, inner = _roles(ep_loops, _entered(ep, ep_loops, 3))
        ep.trips = {lone: steps, outer: cdiv(r, gemv.GATHER_RANKS if bank else 16), inner: steps}
    else:  # the slices' sum; the walk skips the rank loop (its guard r > 0 is known false)
        assert len(ep_loops) == 2, ep_loops
        ep.trips = {0: steps, 1: steps}
    epilogue = model.analyze(ep)
    epilogue.launch_us = model.LAUNCH_US
    return [(label, stream, None), (ep.name, epilogue, None)], kinds


def elementwise(n: int) -> list[tuple[str, model.Terms, None]]:
    out = []
    for dq in (0, 1):
        cfg = next(c for c in aot.all_configs() if c.name == f"dequantize_nf4[bs=64,bf16,dq={dq}]")
        moved = n / 2 + 2 * n + n / 64 * (1 if dq else 4)
        per_program = cfg.constexprs["BLOCKS"] * 64
        lc = _launch(f"dequantize bf16 dq={dq} {n}", cfg.name, {"n_elements": n, "n_bytes": n // 2},
                     cdiv(n, per_program), moved, 1)  # fmt: skip
        out.append((lc.name, model.analyze(lc), None))
    cfg = next(c for c in aot.all_configs() if c.name == "quantize_nf4[bs=64,bf16]")
    lc = _launch(f"quantize bf16 {n}", cfg.name, {"n_elements": n, "n_bytes": n // 2},
                 cdiv(n, cfg.constexprs["BLOCKS"] * 64), 2 * n + n / 2 + 4 * n / 64, 1)  # fmt: skip
    out.append((lc.name, model.analyze(lc), None))
    return out


CALLS = ((8192, 8192, 1, 16), (8192, 8192, 1, 0), (8192, 8192, 16, 16), (4096, 4096, 1, 16))
BANK_CALLS = ((8192, 8192, 16, 16),)
"""Decode calls of a mixed batch (`gemv.launch_adapters`): M rows, M distinct float32 adapters of rank r."""


def main() -> None:
    import triton

    print(f"# per-pipe model (benchmarks/static/model.py), sm_90, triton {triton.__version__}, H200 constants")
    rows, calls, kinds = [], [], []
    for bank, (n, k, m, r) in [(False, c) for c in CALLS] + [(True, c) for c in BANK_CALLS]:
        parts, alone = decode_call(n, k, m, r, bank)
        rows += parts
        kinds += alone
        label = f"{n}x{k} M={m} r={r}" + (f", {m} distinct adapters" if bank else "")
        calls.append((label, sum(t.predicted_us for _, t, _ in parts)))
    rows += elementwise(8192 * 8192)
    print(model.format_rows(rows))
    print()
    print("# the streaming kernel's kinds of program, each alone (DRAM of `W only`: the whole kernel's bytes)")
    print(model.format_rows(kinds))
    print()
    for label, us in calls:
        print(f"decode call {label}: {us:.1f} µs (stream + epilogue, each with its launch)")
    for label, t, _ in rows[-3:]:
        print(f"{label}: bound by {t.bound[0]}, {t.dram_us / t.predicted_us:.0%} of the copy bandwidth")


if __name__ == "__main__":
    main()
