"""The per-pipe model (`model.py`) applied to this checkout's kernels, sm_90, H200 constants.

    python benchmarks/static/today.py            (without TRITON_INTERPRET; PYTHONPATH=<triton 3.6> for 3.6)

Rows (issue 22): a LoRALinearNF4 decode call (bf16 x, double-quantized W, blocksize 64, float32 adapter
of rank r, no bias, L2 flushed) at 8192 x 8192 M = 1 r = 16 and r = 0, M = 16 r = 16, 4096 x 4096 M = 1
r = 16: the streaming kernel (W programs, and with r > 0 the extra row of x @ A^T programs, each kind
walked along its own branch) then the epilogue, plus `model.LAUNCH_US` per kernel; dequantize and
quantize at 8192 x 8192. Each kernel is compiled with the installed triton as the runtime specialises
it at those arguments (`record.compile_launch`), with the launcher's own split-K choice
(`nf4.kernels.gemv.choose_split` on 132 SMs).
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


def _roles(loops: list[tuple[int, int]]) -> tuple[int, int, int]:
    """Indices (in address order) of the lone loop, and of the outer and inner loop of the nested pair,
    among three loops (the compilers place them in either order)."""
    pairs = [(i, j) for i, a in enumerate(loops) for j, b in enumerate(loops)
             if i != j and a[0] <= b[0] <= b[1] <= a[1]]  # fmt: skip
    assert len(loops) == 3 and len(pairs) == 1, loops
    outer, inner = pairs[0]
    return ({0, 1, 2} - {outer, inner}).pop(), outer, inner


def decode_call(n: int, k: int, m: int, r: int) -> list[tuple[str, model.Terms, None]]:
    """The two launches of a decode call, each with its terms (launch cost included)."""
    from nf4.kernels import gemv

    bk, bn = gemv.LUT_BK, gemv.LUT_BN
    split = max(gemv.choose_split(n, k, m, bk, model.SMS), cdiv(k, gemv.LUT_CHUNKS * bk))
    kps = cdiv(cdiv(k, split), bk) * bk
    split = cdiv(k, kps)
    values = dict(M=m, N=n, K=k, KB=k // 2, stride_xm=k, log2_bs=6, n_blocks=n * k // 64, k_per_split=kps,
                  kb_per_split=kps // 2, r=r, stride_ar=k, stride_ak=1)  # fmt: skip
    w_bytes = n * k / 2 + n * k / 64 * (1 + 4 / 256)
    moved = w_bytes + 2 * m * k + 4 * r * k + 4 * split * m * (n + r)  # W, absmax, x, A, partial sums written
    a_name = ",A=fp32" if r else ""
    name = f"nf4_gemv[bf16,aligned=1,dq=1,BN={bn},BK={bk},mma=v3{a_name}]"
    label = f"{n}x{k} M={m} r={r}: stream"
    w = _launch(label, name, values, cdiv(n, bn) * split, moved, {0: kps // bk})
    loops = _loops(w)
    others = []
    if r:  # the W loop, and x @ A^T's rank loop holding its K loop (A_BK columns a step)
        lone, outer, inner = _roles(loops)
        w.trips = {lone: kps // bk}
        a_trips = {outer: cdiv(r, 16), inner: kps // gemv.A_BK.value}
        a = model.Launch(label, w.sass_text, w.params, {**values, "_ctaid_x": cdiv(n, bn)}, split, w.num_warps,
                         w.registers, w.shared_bytes, 0, a_trips)  # fmt: skip
        others.append((a, split))
    else:
        assert len(loops) == 1, loops
    stream = model.analyze(w, others)
    w_loop = loops[lone] if r else loops[0]
    assert stream.instructions_per_warp >= (kps // bk) * (w_loop[1] - w_loop[0]) / 16, "the walk missed the W loop"
    stream.launch_us = model.LAUNCH_US
    fused = bool(r)
    ep_name = f"nf4_gemv[epilogue,bf16,v={'fp32' if r else 'bf16'},bias=bf16,BN={gemv.EPILOGUE_BN}"
    ep_name += ",fused_u]" if fused else "]"
    ev = dict(M=m, N=n, r=r, split=split, stride_split=m * n, stride_um=0, stride_ur=0, stride_vr=n, stride_vn=1,
              has_bias=0)  # fmt: skip
    ep_bytes = 4 * split * m * (n + r) + 4 * r * n + 2 * m * n  # partial sums (from L2 mostly), B, out
    steps = cdiv(split, gemv.SPLITS_PER_STEP.value)
    ep = _launch(f"{n}x{k} M={m} r={r}: epilogue", ep_name, ev, cdiv(n, gemv.EPILOGUE_BN), ep_bytes, {})
    ep_loops = _loops(ep)
    if fused:  # the slices' sum, and the rank loop holding u's sum over the slices
        lone, outer, inner = _roles(ep_loops)
        ep.trips = {lone: steps, outer: cdiv(r, 16), inner: steps}
    else:  # the slices' sum; the walk skips the rank loop (its guard r > 0 is known false)
        assert len(ep_loops) == 2, ep_loops
        ep.trips = {0: steps, 1: steps}
    epilogue = model.analyze(ep)
    epilogue.launch_us = model.LAUNCH_US
    return [(label, stream, None), (ep.name, epilogue, None)]


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


def main() -> None:
    import triton

    print(f"# per-pipe model (benchmarks/static/model.py), sm_90, triton {triton.__version__}, H200 constants")
    rows, calls = [], []
    for n, k, m, r in CALLS:
        parts = decode_call(n, k, m, r)
        rows += parts
        calls.append((f"{n}x{k} M={m} r={r}", sum(t.predicted_us for _, t, _ in parts)))
    rows += elementwise(8192 * 8192)
    print(model.format_rows(rows))
    print()
    for label, us in calls:
        print(f"decode call {label}: {us:.1f} µs (stream + epilogue, each with its launch)")
    for label, t, _ in rows[-3:]:
        print(f"{label}: bound by {t.bound[0]}, {t.dram_us / t.predicted_us:.0%} of the copy bandwidth")


if __name__ == "__main__":
    main()
