"""Per-kernel GPU time of nf4's streaming kernels, L2 flushed: what a static speed model is scored on.

Cases (bf16 weights [N, K], blocksize 64, double quantization): dequantize, quantize, and the decode
call (M = 1, `nf4_gemv`) at r = 0 and at r = 16 with a float32 adapter (A [r, K] fused, B^T [r, N]: a
LoRALinearNF4 decode call), at 8192 x 8192 and 4096 x 4096; and a mixed batch's decode call (issue 25):
M = 16 rows on one adapter (`decode_m16_r16`) against the same 16 rows each on its own of 16 adapters
(`decode_m16_bank16`, `nf4.kernels.adapters.nf4_matmul_adapters` over a float32 bank). Each case is
called `CALLS` times after a warm-up, each call after a 256 MB write that evicts the 60 MB L2, under
torch.profiler; a record per (case, kernel) holds the kernel's mean GPU time over the calls (`gpu_us`)
and its launches per call. The flush's own kernel is left out. The decode records also hold the output's
error over its bound (`error_over_bound`, <= 1 when right).

    python benchmarks/bench_kernels.py [--quick] [--out results.jsonl] [--ncu]

--ncu: two plain calls per case and no profiler, for `ncu` to wrap (benchmarks/gpu_check.sh passes the
kernel filter and metrics). Without a GPU the cases run at a tiny shape through Triton's interpreter:
the records then say device cpu and carry no GPU time; that checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run through Triton's interpreter (set before nf4 imports them)
    os.environ["TRITON_INTERPRET"] = "1"

import nf4  # noqa: E402
from nf4.kernels.gemv import nf4_gemv  # noqa: E402

SHAPES = [(8192, 8192), (4096, 4096)]
QUICK_SHAPES = [(256, 512)]
CALLS = 5
RANK = 16
FLUSH_BYTES = 256 * 1024 * 1024


def cases(n: int, k: int, device: torch.device) -> dict[str, callable]:
    gen = torch.Generator(device="cpu").manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    q = nf4.quantize(w, 64, True)
    x = torch.randn(1, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    a = (torch.randn(RANK, k, generator=gen) / k**0.5).to(device)
    v = (torch.randn(RANK, n, generator=gen) * 4).to(device)  # a LoRA term well above the error bound
    return {
        "dequantize": (lambda: nf4.dequantize(q), None),
        "quantize": (lambda: nf4.quantize(w, 64, True), None),
        "decode_r0": (lambda: nf4_gemv(x, q), lambda y: _error_over_bound(y, x, q)),
        f"decode_r{RANK}": (lambda: nf4_gemv(x, q, a=a, v=v), lambda y: _error_over_bound(y, x, q, a, v)),
        **mixed_batch_cases(q, n, k, gen, device),
    }


def mixed_batch_cases(q, n: int, k: int, gen, device: torch.device) -> dict[str, tuple]:
    """16 rows on one adapter (the fused decode call), and 16 rows each on its own of 16 adapters (a bank)."""
    from nf4.kernels.adapters import nf4_matmul_adapters

    m = slots = 16
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16)
    a_bank = (torch.randn(slots, RANK, k, generator=gen) / k**0.5).to(device)
    v_bank = (torch.randn(slots, RANK, n, generator=gen) * 4).to(device)
    scales = torch.ones(slots, device=device)
    index = torch.arange(m, dtype=torch.int32, device=device)
    return {
        f"decode_m16_r{RANK}": (lambda: nf4_gemv(x, q, a=a_bank[0], v=v_bank[0]),
                                lambda y: _error_over_bound(y, x, q, a_bank[0], v_bank[0])),
        "decode_m16_bank16": (lambda: nf4_matmul_adapters(x, q, a_bank, v_bank, scales, index),
                              lambda y: max(_error_over_bound(y[i : i + 1], x[i : i + 1], q, a_bank[i], v_bank[i])
                                            for i in range(m))),
    }  # fmt: skip


def _error_over_bound(y, x, q, a=None, v=None) -> float:
    """max |y - exact| / bound, exact in float64 from the dequantized W: the bound is 2**-8 of
    |x| @ |W|^T (+ |x @ A^T| @ |v|), two bf16 roundings (the codes and the output) with margin; <= 1 when
    the decode call is right."""
    w = nf4.dequantize(q).double()
    xd = x.double()
    exact, scale = xd @ w.T, xd.abs() @ w.abs().T
    if a is not None:
        u = xd @ a.double().T
        exact, scale = exact + u @ v.double(), scale + u.abs() @ v.double().abs()
    return ((y.double() - exact).abs() / (2.0**-8 * scale + 1e-30)).max().item()


def profile_case(fn, device: torch.device, calls: int) -> dict[str, tuple[float, int]]:
    """{kernel name: (mean GPU us per call, launches per call)} over `calls` calls, each after an L2 flush."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    flush.fill_(1)  # the flush's kernel name, to leave out below
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.fill_(0)
            fn()
        torch.cuda.synchronize(device)
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or "fill" in event.name.lower():
            continue
        entry = kernels.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.elapsed_us()
        entry[1] += 1
    return {name: (us / calls, n / calls) for name, (us, n) in kernels.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape (smoke test)")
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    parser.add_argument("--ncu", action="store_true", help="plain calls for ncu to wrap, no profiler")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK_SHAPES if args.quick or device.type != "cuda" else SHAPES
    records = []
    for n, k in shapes:
        for name, (fn, check) in cases(n, k, device).items():
            out = fn()  # compile, and the launcher's first-call work
            base = {"bench": "kernels", "case": name, "n": n, "k": k, "device": device.type}
            if check is not None:
                base["error_over_bound"] = check(out)
            if args.ncu or device.type != "cuda":
                t0 = time.perf_counter()
                fn()
                records.append({**base, "median_ms": (time.perf_counter() - t0) * 1e3})  # one call, wall time
                continue
            for kernel, (us, launches) in sorted(profile_case(fn, device, CALLS).items()):
                records.append({**base, "kernel": kernel, "gpu_us": round(us, 3), "launches_per_call": launches,
                                "calls": CALLS, "l2_flushed": True})  # fmt: skip
    print(f"{'case':<17} {'N x K':>11}  {'GPU us':>8}  {'err/bound':>9}  kernel")
    for r in records:
        us = f"{r['gpu_us']:8.2f}" if "gpu_us" in r else f"{'-':>8}"
        err = f"{r['error_over_bound']:9.3f}" if "error_over_bound" in r else f"{'':>9}"
        print(f"{r['case']:<17} {r['n']:>5}x{r['k']:<5}  {us}  {err}  {r.get('kernel', '(no GPU: not timed)')[:80]}")
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
