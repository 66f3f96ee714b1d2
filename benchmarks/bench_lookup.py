"""Table lookups, and the decode kernel before and after issue 17: what one GPU run needs to check the L1
model of benchmarks/static/sass.py (`python benchmarks/static/sass.py`, decode_prediction.txt).

1. lookup: packed NF4 bytes streamed once, every byte looked up in the 256-entry pair table (both codes
   of a byte in the activation dtype, `nf4.kernels.gemv.activation_pair_table`), the results xor-ed into
   a checksum:
   - read:     no lookup (the bytes only): the ceiling;
   - global:   the table in global memory, read through L1 (what the decode loop of 2d550bfb5869 did):
               ~3.3 wavefronts per warp-wide 4-byte gather by the model's bank-conflict simulation;
   - shared:   `tl.gather` on the table held as a tensor (Triton stages it in shared memory);
   - register: the 16 values in registers, PRMT (`nf4.kernels.lut.pair_lookup_asm`), no memory access.
   Reported: GB/s of bytes looked up and the fraction of `read`; the checksums must agree.
2. decode: a LoRALinearNF4 decode call (bf16 x, double-quantized W, float32 adapter of rank 16: the
   streaming kernel, which also computes x @ A^T, and the epilogue) by the kernel of git revision --base
   (default 2d550bfb5869; built from git by benchmarks/static/revision.py and run in its own process)
   and by the current one, at the shapes of the prediction, with the largest difference of their outputs.
On a GPU the times are CUDA-graph replays with the L2 flushed (harness.py). Without one (the dry run of
`gpu_check.sh`) the kernels run in Triton's interpreter at tiny sizes, the register path as its twin.

    python benchmarks/bench_lookup.py [--quick] [--out results.jsonl] [--base REV]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the CPU can only interpret kernels

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from harness import Results, Timer, Timing, bench_main, format_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "static"))
import revision  # noqa: E402

import nf4  # noqa: E402
from nf4.kernels import gemv, lut  # noqa: E402
from nf4.kernels.common import INTERPRET  # noqa: E402

MODES = ("read", "global", "shared", "register")
LOOKUP_BYTES = {"gpu": 1 << 28, "cpu": 1 << 14}
DECODE_SHAPES = {"gpu": [(8192, 8192, 1), (4096, 4096, 1), (14336, 4096, 1), (8192, 8192, 16)], "cpu": [(128, 512, 1)]}
RANK = 16


@triton.jit
def _lookup_kernel(words_ptr, pairs_ptr, out_ptr, words_per_program, MODE: tl.constexpr, ASM: tl.constexpr,
                   ROWS: tl.constexpr):  # fmt: skip
    """Xor of the pair words of every byte of the program's `words_per_program` int32 words, looked up as
    MODE says (0 read, 1 global, 2 shared, 3 register); ROWS x 4 x 2 words per step."""
    offs = tl.arange(0, ROWS)[:, None, None] * 8 + tl.arange(0, 4)[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    base = words_ptr + tl.program_id(0).to(tl.int64) * words_per_program
    acc = tl.zeros((ROWS, 4, 2), tl.int32)
    if MODE == 2:
        table = tl.load(pairs_ptr + tl.arange(0, 256))
    for start in range(0, words_per_program, ROWS * 8):
        w = tl.load(base + start + offs)
        if MODE == 0:
            acc ^= w
        elif MODE == 1:
            p0, p1, p2, p3 = lut.pair_lookup(w, pairs_ptr, "")
            acc ^= p0 ^ p1 ^ p2 ^ p3
        elif MODE == 2:
            flat = tl.reshape(w, (ROWS * 8,))
            p = tl.gather(table, flat & 0xFF, 0) ^ tl.gather(table, (flat >> 8) & 0xFF, 0)
            p ^= tl.gather(table, (flat >> 16) & 0xFF, 0) ^ tl.gather(table, (flat >> 24) & 0xFF, 0)
            acc ^= tl.reshape(p, (ROWS, 4, 2))
        else:
            p0, p1, p2, p3 = lut.pair_lookup(w, pairs_ptr, ASM)
            acc ^= p0 ^ p1 ^ p2 ^ p3
    total = tl.reduce(tl.reshape(acc, (ROWS * 8,)), 0, _xor)
    tl.store(out_ptr + tl.program_id(0), total)


@triton.jit
def _xor(a, b):
    return a ^ b


def lookup(words: torch.Tensor, mode: str, programs: int) -> torch.Tensor:
    """Per-program checksums of `words` (int32) looked up as `mode` says."""
    table = gemv._constants(words.device, torch.bfloat16)["pairs"]
    out = torch.empty(programs, dtype=torch.int32, device=words.device)
    asm = "" if INTERPRET else lut.PAIR_ASM[torch.bfloat16]
    _lookup_kernel[(programs,)](words, table, out, words.numel() // programs, MODE=MODES.index(mode), ASM=asm,
                                ROWS=64, num_warps=4)  # fmt: skip
    return out


_BASE_DECODE = """\
import dataclasses, sys, torch
from harness import Timer
import nf4
from nf4.kernels import gemv
cases, device, quick, min_seconds = torch.load(sys.argv[1], weights_only=True)
timer = Timer(torch.device(device), quick)
done = []
for w, x, a, v in cases:
    q = nf4.quantize(w.to(device), 64, True)
    x, a, v = x.to(device), a.to(device), v.to(device)
    call = lambda: gemv.nf4_gemv(x, q, a=a, v=v, lora_scale=0.5)
    done.append((call().float().cpu(), dataclasses.asdict(timer(call, min_seconds=min_seconds))))
torch.save(done, sys.argv[2])
"""


def base_decode(rev: str, cases: list, device: torch.device, quick: bool, min_seconds: float) -> list:
    """(output, Timing) of the decode call of revision `rev` on each (w, x, a, v) of `cases`: W quantized
    and the kernel run by that revision, in a subprocess (both versions are the package `nf4`)."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((cases, str(device), quick, min_seconds), f"{tmp}/in.pt")
        revision.python(rev, _BASE_DECODE, f"{tmp}/in.pt", f"{tmp}/out.pt", path=(str(Path(__file__).parent),))
        return [(out, Timing(**t)) for out, t in torch.load(f"{tmp}/out.pt", weights_only=True)]


def run(device: torch.device, quick: bool, results: Results, base: str = revision.BASE) -> list[dict]:
    timer = Timer(device, quick)
    kind = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    nbytes = LOOKUP_BYTES["cpu" if quick else kind]
    programs = 4 * 132 if kind == "gpu" else 2
    count = nbytes // 4 // (programs * 512) * programs * 512  # whole steps of 512 words per program
    words = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, device=device)
    reference = None
    times = {}
    for mode in MODES:
        check = lookup(words, mode, programs)
        agrees = None
        if mode != "read":
            reference = check if reference is None else reference
            agrees = bool(torch.equal(check, reference))
        t = timer(lambda mode=mode: lookup(words, mode, programs), min_seconds=0.1 if kind == "gpu" else 0.0)
        times[mode] = t.median_ms
        gbs = words.numel() * 4 / (t.median_ms * 1e-3) / 1e9
        rows.append(results.add("lookup", {"case": mode, "bytes": words.numel() * 4}, mode, t, gb_per_s=gbs,
                                checksum_agrees=agrees))  # fmt: skip
    for r in rows:
        r["of_read"] = times["read"] / r["median_ms"]

    shapes = DECODE_SHAPES["cpu" if quick else kind]
    min_seconds = 0.1 if kind == "gpu" else 0.0
    cases = []
    for n, k, m in shapes:
        g = torch.Generator(device="cpu").manual_seed(n + k + m)
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        cases.append((w, x, torch.randn(RANK, k, generator=g) / k**0.5, torch.randn(RANK, n, generator=g) / 4))
    if revision.available(base):
        old = base_decode(base, cases, device, quick, min_seconds)
    else:  # the lookups still count; the decode kernel is timed alone
        print(f"decode: revision {base} is not in this checkout (no git history?); the current kernel only")
        old = [(None, None)] * len(cases)
    for (n, k, m), (w, x, a, v), (old_out, old_t) in zip(shapes, cases, old, strict=True):
        q, x, a, v = nf4.quantize(w.to(device), 64, True), x.to(device), a.to(device), v.to(device)
        call = lambda: gemv.nf4_gemv(x, q, a=a, v=v, lora_scale=0.5)  # noqa: E731
        out = call().float().cpu()
        diff = None if old_out is None else (out - old_out).abs().max().item()
        timings = [(revision.label(base), old_t)] if old_t else []
        for impl, t in [*timings, ("current", timer(call, min_seconds=min_seconds))]:
            rows.append(results.add("decode", {"case": f"{n}x{k} M={m}", "shape": [n, k], "m": m}, impl, t,
                                    gb_per_s=n * k / 2 / (t.median_ms * 1e-3) / 1e9, max_diff_vs_old=diff,
                                    speedup_vs_old=old_t.median_ms / t.median_ms if old_t else None,
                                    output_max=(out if old_out is None else old_out).abs().max().item()))  # fmt: skip
    return rows


COLUMNS = [
    ("bench", "bench", ""),
    ("case", "case", ""),
    ("impl", "impl", ""),
    ("median ms", "median_ms", ".4f"),
    ("eager ms", "eager_ms", ".4f"),
    ("graph", "graph", ""),
    ("GB/s", "gb_per_s", ".1f"),
    ("of read", "of_read", ".2f"),
    ("x vs old", "speedup_vs_old", ".2f"),
    ("checksum ok", "checksum_agrees", ""),
    ("max |new-old|", "max_diff_vs_old", ".3g"),
]


def table(rows: list[dict]) -> str:
    return format_table(rows, COLUMNS)


def add_arguments(parser) -> None:
    parser.add_argument("--base", default=revision.BASE, metavar="REV",
                        help=f"the git revision (or a folder written by static/revision.py) whose decode kernel "
                             f"is timed beside the current one (default {revision.BASE})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(bench_main(__doc__, run, table, add_arguments=add_arguments))
