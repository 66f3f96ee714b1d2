"""Static speed model of the decode kernel (`nf4.kernels.gemv`) from its SASS, without a GPU.

The decode kernel is bound by streaming W, so what matters is whether the instructions it issues per
byte of W fit in the time the memory system takes to deliver that byte. On the H200:

    lane-instructions per second  = 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 3.35e13
    bytes of W per second         = 4.1e12 (measured copy bandwidth, gpu-findings.md)
    budget                        = 3.35e13 / 4.1e12 ~ 8.2 lane-instructions per byte of W

Units. A SASS instruction in the loop body is issued once per iteration by every warp and executed by
its 32 lanes: 32 lane-instructions. A warp consumes `bytes_per_iteration / warps` bytes of W per
iteration, so per byte of W the loop costs

    lane-instructions / byte = 32 x count / (bytes_per_iteration / warps) = count / bytes_per_thread

with `bytes_per_thread = bytes_per_iteration / (32 x warps)`: the SASS count of the loop divided by the
bytes of W one thread streams per iteration. (A predicated-off instruction still takes its issue slot,
so the count is what the schedulers see; instructions outside the loop are amortised over the whole
K-slice and ignored.) `analyze` finds the hot loop as the backward branch (`BRA` to a lower address)
whose body holds the most instructions, counts them, and reports the load width of W (`LDG.E.128`,
or `LDGSTS.E.128` when Triton's pipeliner copies W through shared memory) and where the decode table
is read from: `LDS` (shared), `LDG` (global, through L1) or registers (no load per byte).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from nf4.kernels.aot import _tool, specialize
from nf4.kernels.common import LaunchConfig

SMS = 132
SCHEDULERS = 4
LANES = 32
CLOCK_HZ = 1.98e9
BANDWIDTH = 4.1e12  # bytes/s, measured copy bandwidth of the H200 (read + write)
LANE_INSTRUCTIONS_PER_S = SMS * SCHEDULERS * LANES * CLOCK_HZ
BUDGET = LANE_INSTRUCTIONS_PER_S / BANDWIDTH
"""~8.2 lane-instructions per byte of W: above it the loop is instruction-bound, below memory-bound."""


@dataclass(frozen=True)
class LoopReport:
    """The hot loop of one compiled kernel."""

    instructions: int  # SASS instructions in the loop body, the backward branch included
    bytes_per_thread: float  # bytes of W one thread streams per iteration
    w_load: str  # the widest load opcode of W in the loop (e.g. LDG.E.128)
    table: str  # "LDS" (shared), "LDG" (global / L1) or "registers"
    gathers: int  # loads in the loop that read the decode table
    opcodes: dict[str, int]  # opcode -> count in the loop

    @property
    def per_byte(self) -> float:
        """Lane-instructions per byte of W (see the module docstring)."""
        return self.instructions / self.bytes_per_thread

    @property
    def wide_loads(self) -> bool:
        return self.w_load.endswith(".128")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def disassemble(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction of `cubin`, via the cuobjdump in Triton's wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return [(int(addr, 16), ins.strip()) for addr, ins in _LINE.findall(text)]


def opcode(instruction: str) -> str:
    """The opcode with its modifiers, predicate removed: `@!P5 LDG.E.128 R4, [...]` -> `LDG.E.128`."""
    parts = instruction.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def loops(instructions: list[tuple[int, str]]) -> list[list[str]]:
    """The body of every loop: from the target of a backward `BRA` to the branch itself."""
    found = []
    for addr, ins in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            found.append([i for a, i in instructions if target <= a <= addr])
    return found


def hot_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The body of the largest loop."""
    return max(loops(instructions), key=len, default=[])


def analyze(cubin: bytes, bytes_per_thread: float) -> LoopReport:
    """Count the hot loop of `cubin`, which streams `bytes_per_thread` bytes of W per thread per iteration."""
    body = hot_loop(disassemble(cubin))
    if not body:
        raise ValueError("no backward branch: the kernel has no loop")
    ops = [opcode(i) for i in body]
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    w_loads = sorted({op for op in ops if op.startswith(("LDG", "LDGSTS")) and ".128" in op})
    w_load = w_loads[0] if w_loads else max((op for op in ops if op.startswith("LDG")), default="none", key=len)
    # The decode table is read with one narrow load per byte (or per pair of bytes) of W: count narrow
    # loads by kind; the kind with at least one per two bytes is where the table lives.
    lds = sum(n for op, n in counts.items() if op.startswith("LDS") and not op.startswith("LDSM") and ".128" not in op)
    ldg = sum(n for op, n in counts.items() if op.startswith(("LDG", "LDGSTS")) and ".128" not in op)
    if ldg >= bytes_per_thread / 2 and ldg >= lds:
        table, gathers = "LDG", ldg
    elif lds >= bytes_per_thread / 2:
        table, gathers = "LDS", lds
    else:
        table, gathers = "registers", 0
    return LoopReport(len(body), bytes_per_thread, w_load, table, gathers, counts)


def compile_cubin(cfg: LaunchConfig, arch: int = 90, variant: str = "aligned") -> bytes:
    """The cubin of `cfg` for sm_{arch}, specialised as `variant` (see `nf4.kernels.aot.specialize`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(cfg, variant)
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options).asm["cubin"]


def gemv_loop_report(
    dtype_name: str = "bf16", double_quant: bool = True, arch: int = 90, bk: int = 64, a: str | None = "fp32"
) -> LoopReport:
    """The loop report of the aligned decode kernel for `dtype_name` activations and `bk`-element steps
    (64: blocksize >= 64, the common case; 32: blocksize 32), compiled with the low-rank program for an
    adapter in `a` ("fp32", the default adapter dtype: what a LoRALinearNF4 decode call launches) or
    without one (None)."""
    from nf4.kernels.gemv import gemv_configs

    name = f"nf4_gemv[{dtype_name},aligned=1,dq={int(double_quant)},"
    suffix = f",BK={bk}]" if a is None else f",BK={bk},A={a}]"
    cfg = next(c for c in gemv_configs() if c.name.startswith(name) and c.name.endswith(suffix))
    threads = 32 * cfg.options["num_warps"]
    return analyze(compile_cubin(cfg, arch), cfg.constexprs["BN"] * (bk // 2) / threads)


def predict_us(
    n: int,
    k: int,
    m: int = 1,
    per_byte: float = BUDGET,
    r: int = 16,
    blocksize: int = 64,
    double_quant: bool = True,
    split: int | None = None,
) -> float:
    """Predicted GPU time (us, CUDA-graph replay) of a LoRALinearNF4 decode call on the H200 (bf16, float32
    adapter of rank r): `nf4.kernels.gemv.model_us` with the streaming loop's issue time from its SASS,
    `per_byte` lane-instructions per byte of W (`LoopReport.per_byte`), and by default the split-K factor
    the launcher chooses there (`split_on_h200`)."""
    from nf4.kernels.gemv import model_us

    if split is None:
        split = split_on_h200(n, k, m, blocksize)
    issue_us = n * k / 2 * per_byte / LANE_INSTRUCTIONS_PER_S * 1e6
    return model_us(n, k, m, r, split, SMS, blocksize, double_quant, issue_us)


SHAPES = ((8192, 8192, 1), (14336, 4096, 1), (4096, 4096, 1), (8192, 8192, 16))
"""(N, K, M) of the issue's goals (out x in features, rows)."""


def split_on_h200(n: int, k: int, m: int = 1, blocksize: int = 64) -> int:
    """The split-K factor `nf4_gemv` launches with on the H200 (132 multiprocessors)."""
    from nf4.kernels.gemv import choose_split, step_k

    return choose_split(n, k, m, step_k(k, blocksize), SMS)


def epilogue_report(arch: int = 90) -> dict:
    """The split-K sum loop of `nf4_gemv`'s epilogue (bf16 activations, float32 B^T as a float32 adapter
    gives it, bf16 bias, u from the streaming kernel's slices): its 128-bit loads (issued together:
    SPLITS_PER_STEP slices x 2 per thread) and its barriers / shared-memory stores (a layout conversion
    inside the loop would wait for each slice's load before issuing the next)."""
    from nf4.kernels.gemv import EPILOGUE_BN, gemv_configs

    (cfg,) = [
        c for c in gemv_configs() if c.name == f"nf4_gemv[epilogue,bf16,v=fp32,bias=bf16,BN={EPILOGUE_BN},fused_u]"
    ]
    body = max(loops(disassemble(compile_cubin(cfg, arch))), key=lambda b: sum(".128" in opcode(i) for i in b))
    ops = [opcode(i) for i in body]
    return {
        "name": cfg.name,
        "instructions": len(body),
        "wide_loads": sum(op.startswith("LDG") and op.endswith(".128") for op in ops),
        "narrow_loads": sum(op.startswith("LDG") and not op.endswith(".128") for op in ops),
        "barriers": sum(op.startswith("BAR") for op in ops),
        "shared_stores": sum(op.startswith("STS") for op in ops),
    }


def _straight_line_report(cfg: LaunchConfig, elements: int, bytes_per_element: float, arch: int) -> dict:
    """Instructions per element of a loop-free kernel (each thread runs its SASS once for its share of
    the program's `elements`), the budget the H200 issues while 4.1 TB/s moves `bytes_per_element`, and
    the global load / store widths."""
    ops = [opcode(i) for _, i in disassemble(compile_cubin(cfg, arch))]
    per_thread = elements / (32 * cfg.options["num_warps"])
    return {
        "name": cfg.name,
        "instructions": len(ops),
        "elements_per_thread": per_thread,
        "per_element": len(ops) / per_thread,
        "budget_per_element": BUDGET * bytes_per_element,
        "loads": sorted({op for op in ops if op.startswith("LDG")}),
        "stores": sorted({op for op in ops if op.startswith("STG")}),
    }


_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def dequantize_report(dtype_name: str = "bf16", double_quant: bool = True, blocksize: int = 64, arch: int = 90) -> dict:
    """Static cost of the dequantize kernel (`nf4.kernels.dequantize`, no loop): per element it reads half
    a byte of codes and its share of the absmax and writes the output (2 or 4 bytes)."""
    from nf4.kernels.dequantize import dequantize_configs

    name = f"dequantize_nf4[bs={blocksize},{dtype_name},dq={int(double_quant)}]"
    cfg = next(c for c in dequantize_configs() if c.name == name)
    moved = 0.5 + _BYTES[dtype_name] + (1 if double_quant else 4) / blocksize
    return _straight_line_report(cfg, cfg.constexprs["BLOCKS"] * blocksize, moved, arch)


def quantize_report(dtype_name: str = "bf16", blocksize: int = 64, arch: int = 90) -> dict:
    """Static cost of the quantize kernel (`nf4.kernels.quantize`, no loop): per element it reads the
    input (2 or 4 bytes) and writes half a byte of codes and its share of the float32 absmax."""
    from nf4.kernels.quantize import quantize_configs

    name = f"quantize_nf4[bs={blocksize},{dtype_name}]"
    cfg = next(c for c in quantize_configs() if c.name == name)
    moved = _BYTES[dtype_name] + 0.5 + 4 / blocksize
    return _straight_line_report(cfg, cfg.constexprs["BLOCKS"] * blocksize, moved, arch)


if __name__ == "__main__":
    report = gemv_loop_report("bf16", True, 90)
    print(
        f"sm_90 bf16 dq: loop of {report.instructions} SASS instructions for {report.bytes_per_thread:g} B of W "
        f"per thread = {report.per_byte:.2f} lane-instructions per byte (budget {BUDGET:.1f}); "
        f"W loads {report.w_load}; table in {report.table} ({report.gathers} gathers per iteration)"
    )
    print(f"{'N x K':>12} {'M':>3} {'split':>5} {'predicted us':>12}")
    for n, k, m in SHAPES:
        split = split_on_h200(n, k, m)
        t = predict_us(n, k, m, report.per_byte, split=split)
        print(f"{f'{n}x{k}':>12} {m:>3} {split:>5} {t:>12.1f}")
