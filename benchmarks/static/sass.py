"""Instruction and L1 counts of the kernels' SASS, without a GPU: instruction issue, the L1 / shared-memory
data path, and DRAM. Its prediction (`decode_terms`: every instruction at full issue rate, no conflicts of
regular shared accesses, no latency chains) was 1.3-5.8x too fast against the H200; `model.py` (per pipe,
backtested in tests/test_static_model.py) replaces it for predictions.

Issue. A SASS instruction of a loop body is issued once per iteration by every warp and executed by its
32 lanes. On the H200

    lane-instructions per second = 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz = 3.35e13
    bytes of W per second        = 4.1e12 (measured copy bandwidth: benchmarks/results/2026-11-29-h200/)
    BUDGET                       = 3.35e13 / 4.1e12 ~ 8.2 lane-instructions per byte of W

and a loop that streams `bytes_per_thread` bytes of W per thread per iteration costs `count /
bytes_per_thread` lane-instructions per byte (a predicated-off instruction still takes its slot).

L1 / shared memory. One SRAM per SM serves L1 and shared memory; its data stage handles one 128-byte
"wavefront" per cycle. While HBM streams W at 4.1 TB/s an SM receives 4.1e12 / 132 / 1.98e9 = 15.7 bytes
of W per cycle, so the loop may spend

    L1_BUDGET = 132 x 1.98e9 / 4.1e12 ~ 0.064 wavefronts per byte of W     (plan for <= 0.8 of it)

Each memory instruction of the loop costs, per warp (`memory_ops`):
- global or shared load / store, 32 lanes x `width` bytes: max(1, 32 x width / 128) wavefronts;
- LDGSTS (async copy): its global read and its shared write, twice that;
- LDSM / STSM .xN (8x8 matrices): N; SHFL: 1 (assumed to use the same crossbar);
- HGMMA: the shared-memory operands' bytes / 128, a quarter per warp of the warpgroup (B, 16 x N
  elements, always; A, 64 x 16, unless it comes from registers);
- a data-dependent lookup (a load whose address derives from loaded data, into one of the constant
  tables `TABLES`): its bank conflicts, by `lookup_wavefronts`: lanes draw indices i.i.d. from what
  N(0, 1) weights quantize to, each phase of lanes (32 x 4 B, 16 x 8 B, 8 x 16 B) costs the largest
  number of distinct 4-byte words any bank holds, broadcast free.
Which load reads what comes from a dataflow pass over the SASS (`address_sources`): kernel parameters
(`c[0x0][...]`, mapped to names through the cubin's parameter table) and loaded data propagate through
every instruction to the address registers of each load. Not modelled: conflicts of regular accesses
(e.g. lanes of one warp reading several rows of W at one offset within their lines: taken as ideal),
the tag stage, L2 and DRAM queueing.

Prediction (`decode_terms`): max(DRAM, issue, L1) + epilogue round trips + launches, where DRAM is
`nf4.kernels.gemv.model_us`'s memory term (bytes, Little's-law efficiency), issue the loop's
lane-instructions at 3.35e13 per second and L1 its wavefronts at one per cycle per SM.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

from aot import _tool, specialize

from nf4.kernels.common import LaunchConfig

SMS = 132
SCHEDULERS = 4
LANES = 32
CLOCK_HZ = 1.98e9
BANDWIDTH = 4.1e12  # bytes/s, measured copy bandwidth of the H200 (read + write)
LANE_INSTRUCTIONS_PER_S = SMS * SCHEDULERS * LANES * CLOCK_HZ
BUDGET = LANE_INSTRUCTIONS_PER_S / BANDWIDTH
"""~8.2 lane-instructions per byte of W: above it the loop is instruction-bound, below memory-bound."""
WAVEFRONTS_PER_S = SMS * CLOCK_HZ
L1_BUDGET = WAVEFRONTS_PER_S / BANDWIDTH
"""~0.064 L1 data-stage wavefronts per byte of W: above it the loop is bound by L1 / shared memory."""
L1_TARGET = 0.8
"""The fraction of L1_BUDGET a hot loop may use (margin for what the model leaves out)."""

TABLES = ("pairs_ptr", "code_ptr", "nested_code_ptr", "table_ptr", "thresholds_ptr")
"""Kernel parameters that are small constant tables: a load from one at a data-dependent index is a lookup."""


# --------------------------------------------------------------------------------------------------
# SASS


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


@dataclass(frozen=True)
class Compiled:
    """A cubin's instructions and the names of its kernel parameters by constant-bank offset."""

    instructions: list[tuple[int, str]]
    params: dict[int, str] = field(default_factory=dict)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction of `cubin`, via the cuobjdump in Triton's wheel."""
    return [(int(addr, 16), ins.strip()) for addr, ins in _LINE.findall(_cuobjdump(cubin, "-sass"))]


def param_offsets(cubin: bytes, names: list[str]) -> dict[int, str]:
    """Constant-bank offset -> name of each kernel parameter (`names`: the non-constexpr ones, in order),
    from the cubin's EIATTR_PARAM_CBANK (bank base) and EIATTR_KPARAM_INFO (ordinal, offset) records."""
    elf = _cuobjdump(cubin, "-elf")
    base = re.search(r"EIATTR_PARAM_CBANK\s+Format:\s+\S+\s+Value:\s+\S+\s+0x([0-9a-f]+)", elf)
    start = int(base.group(1), 16) & 0xFFFF if base else 0
    out = {}
    for ordinal, offset in re.findall(r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x([0-9a-f]+)", elf):
        if int(ordinal, 16) < len(names):
            out[start + int(offset, 16)] = names[int(ordinal, 16)]
    return out


def opcode(instruction: str) -> str:
    """The opcode with its modifiers, predicate removed: `@!P5 LDG.E.128 R4, [...]` -> `LDG.E.128`."""
    parts = instruction.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def operands(instruction: str) -> list[str]:
    """The operands of an instruction, predicate guard and opcode removed."""
    text = instruction.split(None, 1)[1] if instruction.startswith("@") else instruction
    parts = text.split(None, 1)
    return [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []


def loops(instructions: list[tuple[int, str]]) -> list[list[str]]:
    """The body of every loop: from the target of a backward `BRA` to the branch itself."""
    found = []
    for addr, ins in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            found.append([i for a, i in instructions if target <= a <= addr])
    return found


def innermost_loops(instructions: list[tuple[int, str]]) -> list[list[str]]:
    """The bodies of `loops` that hold no other loop."""
    spans = []
    for addr, ins in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in spans if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans)]
    return [[i for a, i in instructions if lo <= a <= hi] for lo, hi in inner]


def hot_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The body of the largest loop."""
    return max(loops(instructions), key=len, default=[])


# --------------------------------------------------------------------------------------------------
# dataflow: what each load's address is computed from

_REG = re.compile(r"\b(U?R(?:\d+|Z))(?:\.64)?\b")
_CBANK = re.compile(r"c\[0x0\]\[0x([0-9a-f]+)\]")
_NO_DEST = ("ST", "BAR", "BRA", "DEPBAR", "WARPGROUP", "FENCE", "MEMBAR", "LDGDEPBAR", "EXIT", "NOP", "CALL",
            "RET", "RED", "ISETP", "FSETP", "DSETP", "PLOP3", "UISETP", "WARPSYNC", "BSYNC", "BSSY", "YIELD",
            "LDGSTS", "SYNCS", "ELECT", "VOTEU", "UPLOP3", "ERRBAR", "CCTL", "ARRIVES")  # fmt: skip
_LOADS = ("LDG", "LDS", "LDSM", "LD.", "LDL", "ATOM", "ATOMS", "SHFL")


def _wide(op: str) -> int:
    """Registers an instruction writes from its first destination: .64 -> 2, .128 -> 4, LDSM.x4 -> 4."""
    if op.startswith("LDSM"):
        return int(op.rsplit(".", 1)[1]) if op.rsplit(".", 1)[1].isdigit() else 1
    if ".128" in op:
        return 4
    if ".64" in op or op.startswith(("IMAD.WIDE", "ULDC.64", "LDC.64")):
        return 2
    return 1


def _regs(operand: str) -> list[str]:
    """Registers an operand reads (a 64-bit address `R4.64` reads R4 and R5)."""
    out = []
    for m in re.finditer(r"\b(U?R)(\d+)(\.64)?\b", operand):
        out.append(m.group(1) + m.group(2))
        if m.group(3):
            out.append(f"{m.group(1)}{int(m.group(2)) + 1}")
    return out


def _destinations(op: str, ops: list[str]) -> list[str]:
    if op.startswith(_NO_DEST) or not ops:
        return []
    first = next((o for o in ops if re.fullmatch(r"U?R\d+", o)), None) if op.startswith("SHFL") else ops[0]
    if first is None or not re.fullmatch(r"U?R\d+", first):
        return []
    kind, num = re.match(r"(U?R)(\d+)", first).groups()
    return [f"{kind}{int(num) + i}" for i in range(_wide(op))]


def address_sources(instructions: list[tuple[int, str]], params: dict[int, str]) -> dict[int, frozenset]:
    """For every memory instruction (by address): what its address is computed from, as a set of kernel
    parameter names and `@name` for data loaded through parameter `name` (`@shared` for data read from
    shared memory); for a store, what the stored value derives from, after a `|`, as `|@x_ptr` etc. Two
    passes over the function, so values defined late in a loop reach its top."""
    taint: dict[str, frozenset] = {}
    result: dict[int, frozenset] = {}
    for _ in range(2):
        for addr, ins in instructions:
            op, ops = opcode(ins), operands(ins)
            sources: set[str] = set()
            for o in ops:
                sources |= {params[int(off, 16)] for off in _CBANK.findall(o) if int(off, 16) in params}
            memory = [o for o in ops if "[" in o and not o.startswith(("c[", "gdesc"))]
            address: set[str] = set(sources)
            for o in memory:
                inner = o[o.rfind("[") :]  # desc[UR4][R2.64+0x10]: the register part is the last bracket
                for r in _regs(inner):
                    address |= taint.get(r, frozenset())
            if memory or op.startswith(("LDG", "LDS", "STG", "STS", "LDGSTS", "LDSM", "STSM")):
                stored: set[str] = set()
                if op.startswith(("STS", "STG", "STSM", "ST.")) and ops:
                    stored = {"|" + t for r in _regs(ops[-1]) for t in taint.get(r, ())}
                result[addr] = frozenset(address | stored)
            dests = _destinations(op, ops)
            if op.startswith(("LDC", "ULDC")):
                value = frozenset(sources)
            elif op.startswith(_LOADS):
                shared = op.startswith(("LDS", "LDSM", "ATOMS", "SHFL"))
                value = frozenset({"@shared"} if shared else {"@" + p for p in address if not p.startswith("@")})
                value |= frozenset(p for p in address if p.startswith("@"))
                if op.startswith("SHFL"):
                    value = frozenset(t for o in ops[1:] for r in _regs(o) for t in taint.get(r, ()))
            else:
                value = set(sources)
                for o in ops[len(dests[:1]) :]:
                    for r in _regs(o):
                        value |= taint.get(r, frozenset())
                value = frozenset(value)
            for d in dests:
                taint[d] = value
    return result


# --------------------------------------------------------------------------------------------------
# lookups: bank conflicts of data-dependent table reads, from the codes N(0, 1) weights quantize to


@functools.cache
def _samples() -> dict[str, tuple[int, ...]]:
    """Table indices that quantized N(0, 1) weights produce (blocksize 64, double quant): packed bytes
    (pair table), codes (NF4 table), absmax codes (nested map), bucket of RN(16 xs + 16) (quantize)."""
    import torch

    from nf4 import reference
    from nf4.codebook import dynamic_map, nearest_thresholds

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g)
    packed, absmax = reference.quantize_ref(x, 64)
    codes, _ = reference.double_quantize_ref(absmax, reference.absmax_offset(absmax), nearest_thresholds(dynamic_map()))
    packed = packed.reshape(-1).to(torch.int64)
    scaled = x.reshape(-1, 64) / absmax[:, None]
    return {
        "pairs_ptr": tuple(packed.tolist()),
        "code_ptr": tuple(torch.stack([packed >> 4, packed & 15], 1).reshape(-1).tolist()),
        "nested_code_ptr": tuple(codes.to(torch.int64).tolist()),
        "table_ptr": tuple((torch.round(16 * scaled + 16).to(torch.int64) & 63).reshape(-1).tolist()),
        "thresholds_ptr": tuple(codes.to(torch.int64).tolist()),
    }


@functools.cache
def lookup_wavefronts(table: str, width: int, lanes: int = 32, draws: int = 2000) -> float:
    """Expected wavefronts of one warp-wide lookup of `width`-byte entries in `table` (`TABLES`), the 32
    lanes' indices drawn i.i.d. from `_samples()[table]`: per phase of lanes (128 bytes), the largest
    number of distinct 4-byte words that fall in one of the 32 banks."""
    import random

    pool = _samples()[table]
    rng = random.Random(width * 7919 + len(table))
    per_phase = max(1, min(lanes, 128 // max(width, 4)))
    total = 0
    for _ in range(draws):
        idx = [pool[rng.randrange(len(pool))] for _ in range(lanes)]
        for p in range(0, lanes, per_phase):
            banks: dict[int, set[int]] = {}
            for i in idx[p : p + per_phase]:
                first = i * width // 4
                for w in range(first, first + max(1, width // 4)):
                    banks.setdefault(w % 32, set()).add(w)
            total += max(len(words) for words in banks.values())
    return total / draws


# --------------------------------------------------------------------------------------------------
# the L1 model


@dataclass(frozen=True)
class MemOp:
    """One memory instruction of a loop: its L1 / shared-memory data-stage cost per warp."""

    op: str
    kind: str  # "global", "async" (LDGSTS), "shared", "matrix" (LDSM/STSM), "mma" (HGMMA operands), "shuffle"
    wavefronts: float
    lookup: str = ""  # the table a data-dependent lookup reads
    shared_bytes: float = 0.0  # bytes it moves to or from shared memory per warp
    reads: str = ""  # the parameters its address (and, for a store, its value: `@x_ptr`) derives from


def _width(op: str) -> int:
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return width
    return 4


def memory_ops(body: list[str], sources: dict[str, frozenset]) -> list[MemOp]:
    """The L1 cost of each memory instruction of `body` (see the module docstring); `sources` maps an
    instruction's text to `address_sources` of it."""
    out = []
    for ins in body:
        op = opcode(ins)
        src = sources.get(ins, frozenset())
        data = any(s.startswith("@") for s in src)
        table = next((t for t in TABLES if t in src), "") if data else ""
        reads = ",".join(sorted(s.lstrip("|") for s in src if not s.startswith("@")))
        width = _width(op)
        plain = max(1.0, LANES * width / 128)
        if op.startswith(("LDGDEPBAR", "LDGSTS.BAR")):  # a commit / wait of async copies, not an access
            continue
        if op.startswith("LDGSTS"):
            read = lookup_wavefronts(table, width) if table else plain
            out.append(MemOp(op, "async", read + plain, table, LANES * width, reads))
        elif op.startswith(("LDG", "STG", "RED", "ATOMG")):
            out.append(MemOp(op, "global", lookup_wavefronts(table, width) if table else plain, table, 0, reads))
        elif op.startswith(("LDSM", "STSM")):
            n = int(op.rsplit(".", 1)[1]) if op.rsplit(".", 1)[1].isdigit() else 1
            out.append(MemOp(op, "matrix", n, "", n * 128, reads))
        elif op.startswith(("LDS", "STS", "ATOMS")):
            out.append(MemOp(op, "shared", plain, "", LANES * width, reads))
        elif op.startswith("SHFL"):
            out.append(MemOp(op, "shuffle", 1.0))
        elif op.startswith("HGMMA"):
            m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
            rows, n, k = (int(v) for v in m.groups())
            bytes_el = 1 if "E4M3" in op or "E5M2" in op else 4 if "TF32" in op else 2
            a_regs = re.match(r"R\d+", operands(ins)[1]) is not None
            moved = n * k * bytes_el + (0 if a_regs else rows * k * bytes_el)
            out.append(MemOp(op, "mma", moved / 128 / 4, "", moved / 4))
    return out


@dataclass(frozen=True)
class LoopReport:
    """The hot loop of one compiled kernel."""

    instructions: int  # SASS instructions in the loop body, the backward branch included
    bytes_per_thread: float  # bytes of W one thread streams per iteration
    w_load: str  # the widest load opcode of W (the `packed_ptr` tensor) in the loop
    opcodes: dict[str, int]  # opcode -> count in the loop
    memory: tuple[MemOp, ...] = ()

    @property
    def per_byte(self) -> float:
        """Lane-instructions per byte of W (see the module docstring)."""
        return self.instructions / self.bytes_per_thread

    @property
    def wide_loads(self) -> bool:
        return self.w_load.endswith(".128")

    @property
    def wavefronts(self) -> float:
        """L1 data-stage wavefronts per warp per iteration."""
        return sum(m.wavefronts for m in self.memory)

    @property
    def l1_per_byte(self) -> float:
        """L1 wavefronts per byte of W."""
        return self.wavefronts / (LANES * self.bytes_per_thread)

    @property
    def l1_fraction(self) -> float:
        """l1_per_byte as a fraction of L1_BUDGET."""
        return self.l1_per_byte / L1_BUDGET

    @property
    def lookups(self) -> dict[str, int]:
        """Data-dependent lookups per iteration, by table."""
        out: dict[str, int] = {}
        for m in self.memory:
            if m.lookup:
                out[m.lookup] = out.get(m.lookup, 0) + 1
        return out

    @property
    def global_lookups(self) -> int:
        """Data-dependent loads from global memory (LDG / LDGSTS) per iteration."""
        return sum(1 for m in self.memory if m.lookup and m.kind in ("global", "async"))

    @property
    def table(self) -> str:
        """Where the decode table is read from: "global" (LDG / LDGSTS lookups), "shared" or "registers"."""
        if self.global_lookups:
            return "global"
        return "shared" if any(m.kind == "shared" and m.lookup for m in self.memory) else "registers"

    @property
    def shared_bytes_per_byte(self) -> float:
        """Bytes moved to or from shared memory per byte of W, the tensor-core operand x excluded (the MMA's
        B operand reads and the stores of x's tile: 16 x 2 bytes per 32 bytes of W at most)."""
        moved = sum(m.shared_bytes for m in self.memory if m.kind != "mma" and not _x_operand(m))
        return moved / (LANES * self.bytes_per_thread)


def _x_operand(m: MemOp) -> bool:
    """Whether `m` moves the activations x to or from shared memory (a store of loaded x, an async copy of it)."""
    return "@x_ptr" in m.reads.split(",") or (m.kind == "async" and "x_ptr" in m.reads.split(","))


def analyze(cubin: bytes, bytes_per_thread: float, params: list[str] | None = None) -> LoopReport:
    """Count the hot loop of `cubin`, which streams `bytes_per_thread` bytes of W per thread per iteration;
    `params`: the kernel's non-constexpr parameter names in order (for the dataflow of `address_sources`)."""
    instructions = disassemble(cubin)
    body_addrs = _hot_loop_addresses(instructions)
    if not body_addrs:
        raise ValueError("no backward branch: the kernel has no loop")
    sources = address_sources(instructions, param_offsets(cubin, params or []))
    body = [(a, i) for a, i in instructions if a in body_addrs]
    return _report([i for _, i in body], {i: sources.get(a, frozenset()) for a, i in body}, bytes_per_thread)


def analyze_straight(cubin: bytes, bytes_per_thread: float, params: list[str] | None = None) -> LoopReport:
    """`analyze` for a kernel without a loop: every instruction, run once per thread for its
    `bytes_per_thread` bytes of W."""
    instructions = disassemble(cubin)
    sources = address_sources(instructions, param_offsets(cubin, params or []))
    return _report([i for _, i in instructions], {i: sources.get(a, frozenset()) for a, i in instructions},
                   bytes_per_thread)  # fmt: skip


def _hot_loop_addresses(instructions: list[tuple[int, str]]) -> set[int]:
    best: set[int] = set()
    for addr, ins in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            span = {a for a, _ in instructions if int(m.group(1), 16) <= a <= addr}
            best = max(best, span, key=len)
    return best


def _report(body: list[str], sources: dict[str, frozenset], bytes_per_thread: float) -> LoopReport:
    counts: dict[str, int] = {}
    for ins in body:
        counts[opcode(ins)] = counts.get(opcode(ins), 0) + 1
    memory = memory_ops(body, sources)
    w_loads = [m.op for m in memory if m.kind in ("global", "async") and "packed_ptr" in m.reads and not m.lookup]
    w_load = max(w_loads, key=_width, default="none")
    return LoopReport(len(body), bytes_per_thread, w_load, counts, tuple(memory))


def compile_cubin(cfg: LaunchConfig, arch: int = 90, variant: str = "aligned") -> bytes:
    """The cubin of `cfg` for sm_{arch}, specialised as `variant` (see `aot.specialize`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(cfg, variant)
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options).asm["cubin"]


def param_names(cfg: LaunchConfig, variant: str = "aligned") -> list[str]:
    """The non-constexpr parameters of `cfg`'s kernel as compiled for `variant`, in order."""
    signature, _, _ = specialize(cfg, variant)
    return [name for name, ty in signature.items() if ty != "constexpr"]


def config_loop_report(cfg: LaunchConfig, bytes_per_thread: float, arch: int = 90) -> LoopReport:
    """`analyze` of the compiled `cfg`."""
    return analyze(compile_cubin(cfg, arch), bytes_per_thread, param_names(cfg))


# --------------------------------------------------------------------------------------------------
# the decode kernel


def gemv_config(dtype_name: str = "bf16", double_quant: bool = True, arch: int = 90, bk: int | None = None,
                a: str | None = "fp32", configs=None) -> LaunchConfig:  # fmt: skip
    """The decode kernel's configuration for `dtype_name` activations, `bk`-code steps (default: the
    register-table path on fp16/bf16, 64 on fp32) and an adapter in `a` ("fp32", what a LoRALinearNF4
    decode call launches) or None; `configs`: the `gemv_configs()` of a past revision (`revision_loop_report`),
    whose module may lack the names imported here and whose LaunchConfig may lack `archs`."""
    if bk is None:
        from nf4.kernels.gemv import LUT_BK

        bk = 64 if dtype_name == "fp32" else LUT_BK
    if configs is None:
        from nf4.kernels.gemv import gemv_configs

        configs = gemv_configs()
    name = f"nf4_gemv[{dtype_name},aligned=1,dq={int(double_quant)},"
    tail = f",A={a}]" if a else "]"
    for cfg in configs:
        if not (cfg.name.startswith(name) and cfg.name.endswith(tail) and f",BK={bk}" in cfg.name):
            continue
        if getattr(cfg, "archs", ()) and arch not in cfg.archs:
            continue
        if a is None and ",A=" in cfg.name:
            continue
        return cfg
    raise KeyError(f"no decode configuration {name}...BK={bk}...{tail} for sm_{arch}")


def gemv_loop_report(dtype_name: str = "bf16", double_quant: bool = True, arch: int = 90, bk: int | None = None,
                     a: str | None = "fp32", configs=None) -> LoopReport:  # fmt: skip
    """The loop report of the aligned decode kernel (`gemv_config`)."""
    cfg = gemv_config(dtype_name, double_quant, arch, bk, a, configs)
    bk = cfg.constexprs["BK"]
    threads = 32 * cfg.options["num_warps"]
    return config_loop_report(cfg, cfg.constexprs["BN"] * (bk // 2) / threads, arch)


@dataclass(frozen=True)
class DecodeTerms:
    """Predicted GPU time of a decode call and its terms (us, CUDA-graph replay, H200)."""

    n: int
    k: int
    m: int
    split: int
    dram_us: float  # W, absmax, x, adapter, partial sums at the bandwidth Little's law allows
    issue_us: float  # the streaming loop's lane-instructions
    l1_us: float  # its L1 / shared-memory wavefronts
    fixed_us: float  # epilogue round trips + kernel launches

    @property
    def predicted_us(self) -> float:
        return max(self.dram_us, self.issue_us, self.l1_us) + self.fixed_us


def decode_terms(n: int, k: int, m: int = 1, report: LoopReport | None = None, r: int = 16, blocksize: int = 64,
                 double_quant: bool = True, split: int | None = None,
                 bk: int | None = None) -> DecodeTerms:  # fmt: skip
    """The terms of a LoRALinearNF4 decode call on the H200 (bf16, float32 adapter of rank r), the loop
    costs from `report` (default: the current sm_90 bf16 loop), the split-K factor the launcher
    chooses there (`split_on_h200`)."""
    from nf4.kernels.gemv import memory_us, step_k

    report = report or gemv_loop_report("bf16", double_quant, 90)
    bk = bk or step_k(k, blocksize)
    if split is None:
        split = split_on_h200(n, k, m, blocksize, bk)
    w_bytes = n * k / 2
    issue_us = w_bytes * report.per_byte / LANE_INSTRUCTIONS_PER_S * 1e6
    l1_us = w_bytes * report.l1_per_byte / WAVEFRONTS_PER_S * 1e6
    dram_us, fixed_us = memory_us(n, k, m, r, split, SMS, blocksize, double_quant, bk)
    return DecodeTerms(n, k, m, split, dram_us, issue_us, l1_us, fixed_us)


def predict_us(n: int, k: int, m: int = 1, per_byte: float = BUDGET, r: int = 16, blocksize: int = 64,
               double_quant: bool = True, split: int | None = None) -> float:  # fmt: skip
    """Predicted GPU time (us) with `per_byte` lane-instructions per byte of W and no L1 term (the
    issue-and-DRAM model; `decode_terms` adds L1)."""
    from nf4.kernels.gemv import model_us

    if split is None:
        split = split_on_h200(n, k, m, blocksize)
    issue_us = n * k / 2 * per_byte / LANE_INSTRUCTIONS_PER_S * 1e6
    return model_us(n, k, m, r, split, SMS, blocksize, double_quant, issue_us)


SHAPES = ((8192, 8192, 1), (14336, 4096, 1), (4096, 4096, 1), (8192, 8192, 16))
"""(N, K, M) of the issue's goals (out x in features, rows)."""


def split_on_h200(n: int, k: int, m: int = 1, blocksize: int = 64, bk: int | None = None) -> int:
    """The split-K factor `nf4_gemv` launches with on the H200 (132 multiprocessors)."""
    from nf4.kernels.gemv import choose_split, step_k

    return choose_split(n, k, m, bk or step_k(k, blocksize), SMS)


def epilogue_report(arch: int = 90) -> dict:
    """The split-K sum loop of `nf4_gemv`'s epilogue (bf16 activations, float32 B^T as a float32 adapter
    gives it, bf16 bias, u from the streaming kernel's slices): its 128-bit loads (issued together:
    SPLITS_PER_STEP slices x 2 per thread) and its barriers / shared-memory stores (a layout conversion
    inside the loop would wait for each slice's load before issuing the next). Innermost loops only: the rank
    loops hold u's sums over the slices (and `launch_adapters`' gathered one 128-bit loads of B^T)."""
    from nf4.kernels.gemv import EPILOGUE_BN, gemv_configs

    (cfg,) = [
        c for c in gemv_configs() if c.name == f"nf4_gemv[epilogue,bf16,v=fp32,bias=bf16,BN={EPILOGUE_BN},fused_u]"
    ]
    body = max(
        innermost_loops(disassemble(compile_cubin(cfg, arch))), key=lambda b: sum(".128" in opcode(i) for i in b)
    )
    ops = [opcode(i) for i in body]
    return {
        "name": cfg.name,
        "instructions": len(body),
        "wide_loads": sum(op.startswith("LDG") and op.endswith(".128") for op in ops),
        "narrow_loads": sum(op.startswith("LDG") and not op.endswith(".128") for op in ops),
        "barriers": sum(op.startswith("BAR") for op in ops),
        "shared_stores": sum(op.startswith("STS") for op in ops),
    }


# --------------------------------------------------------------------------------------------------
# the other kernels (no loop: one pass per thread)


_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _straight_line_report(cfg: LaunchConfig, elements: int, bytes_per_element: float, arch: int) -> dict:
    """Instructions and L1 wavefronts per element of a loop-free kernel (each thread runs its SASS once
    for its share of the program's `elements`), the budgets the H200 allows while 4.1 TB/s moves
    `bytes_per_element`, and the global load / store widths."""
    cubin = compile_cubin(cfg, arch)
    per_thread = elements / (32 * cfg.options["num_warps"])
    rep = analyze_straight(cubin, per_thread, param_names(cfg))
    ops = [opcode(i) for _, i in disassemble(cubin)]
    wavefronts_per_element = rep.wavefronts / (LANES * per_thread)
    return {
        "name": cfg.name,
        "instructions": rep.instructions,
        "elements_per_thread": per_thread,
        "per_element": rep.instructions / per_thread,
        "budget_per_element": BUDGET * bytes_per_element,
        "l1_per_element": wavefronts_per_element,
        "l1_budget_per_element": L1_BUDGET * bytes_per_element,
        "l1_fraction": wavefronts_per_element / (L1_BUDGET * bytes_per_element),
        "lookups": rep.lookups,
        "loads": sorted({op for op in ops if op.startswith("LDG") and op != "LDGDEPBAR"}),
        "stores": sorted({op for op in ops if op.startswith("STG")}),
    }


def dequantize_report(dtype_name: str = "bf16", double_quant: bool = True, blocksize: int = 64, arch: int = 90) -> dict:
    """Static cost of the dequantize kernel (`nf4.kernels.dequantize`, no loop): per element it reads half
    a byte of codes and its share of the absmax and writes the output (2 or 4 bytes)."""
    from nf4.kernels.dequantize import dequantize_configs

    name = f"dequantize_nf4[bs={blocksize},{dtype_name},dq={int(double_quant)}]"
    cfg = next(c for c in dequantize_configs() if c.name == name)
    moved = 0.5 + _BYTES[dtype_name] + (1 if double_quant else 4) / blocksize
    return _straight_line_report(cfg, cfg.constexprs["BLOCKS"] * blocksize, moved, arch)


def dequantize_lora_report(dtype_name: str = "bf16", adapter: str = "fp32", double_quant: bool = True,
                           bk: int = 64, r: int = 16, arch: int = 90) -> dict:  # fmt: skip
    """Static cost of `dequantize_lora` (one [BN, BK] tile per program; its rank loop runs once at r <= 16,
    so the kernel is counted straight through): per element half a byte of codes, the absmax share and
    the output from and to DRAM (A and B, read once per tile, stay in L2)."""
    from nf4.kernels.dequantize import dequantize_lora_configs

    name = f"dequantize_lora[{dtype_name},adapter={adapter},dq={int(double_quant)},BK={bk}]"
    cfg = next(c for c in dequantize_lora_configs() if c.name == name)
    # as the runtime compiles it for contiguous adapters: the strides along K of A and along r of B are 1
    cfg = dataclasses.replace(cfg, constexprs={**cfg.constexprs, "stride_ak": 1, "stride_br": 1})
    bn = cfg.constexprs["BN"]
    moved = 0.5 + _BYTES[dtype_name] + (1 if double_quant else 4) / 64  # A and B come from L2
    return _straight_line_report(cfg, bn * bk, moved, arch)


def quantize_report(dtype_name: str = "bf16", blocksize: int = 64, arch: int = 90) -> dict:
    """Static cost of the quantize kernel (`nf4.kernels.quantize`, no loop): per element it reads the
    input (2 or 4 bytes) and writes half a byte of codes and its share of the float32 absmax."""
    from nf4.kernels.quantize import quantize_configs

    name = f"quantize_nf4[bs={blocksize},{dtype_name}]"
    cfg = next(c for c in quantize_configs() if c.name == name)
    moved = _BYTES[dtype_name] + 0.5 + 4 / blocksize
    return _straight_line_report(cfg, cfg.constexprs["BLOCKS"] * blocksize, moved, arch)


def loop_line(label: str, rep: LoopReport) -> str:
    """One line of a loop report: instructions, L1 wavefronts, lookups, shared-memory traffic."""
    return (
        f"{label}: {rep.instructions} instr / {rep.bytes_per_thread:g} B per thread = {rep.per_byte:.2f} "
        f"lane-instr/B (budget {BUDGET:.2f}); L1 {rep.wavefronts:.0f} wavefronts per warp-iteration = "
        f"{rep.l1_per_byte:.4f}/B = {rep.l1_fraction:.2f} of budget {L1_BUDGET:.4f}; W {rep.w_load}; "
        f"table in {rep.table}; lookups {rep.lookups or 'none'}; shared {rep.shared_bytes_per_byte:.2f} B/B"
    )


def prediction_table(report: LoopReport, label: str, bk: int | None = None) -> str:
    """The loop line of `report` and, per row of SHAPES, the terms of `decode_terms` with `predicted us` last."""
    lines = [loop_line(label, report)]
    head = f"{'N x K':>12} {'M':>3} {'split':>5} {'DRAM us':>8} {'issue us':>8} {'L1 us':>8} {'fixed us':>8}"
    lines.append(head + f" {'predicted us':>12}")
    for n, k, m in SHAPES:
        t = decode_terms(n, k, m, report, bk=bk)
        lines.append(
            f"{f'{n}x{k}':>12} {m:>3} {t.split:>5} {t.dram_us:>8.2f} {t.issue_us:>8.2f} {t.l1_us:>8.2f} "
            f"{t.fixed_us:>8.2f} {t.predicted_us:>12.1f}"
        )
    return "\n".join(lines)


def revision_loop_report(rev: str, dtype_name: str = "bf16", double_quant: bool = True, arch: int = 90,
                         bk: int = 64) -> LoopReport:  # fmt: skip
    """`gemv_loop_report` of the decode kernel of git revision `rev` (`revision.py`; default `revision.BASE`,
    whose fp16/bf16 loop took BK = 64 pair-table steps), compiled and analysed in a subprocess that
    imports that revision's `nf4`."""
    import json

    import revision

    code = (
        "import dataclasses, json, sass\n"
        "from nf4.kernels.gemv import gemv_configs\n"
        f"r = sass.gemv_loop_report({dtype_name!r}, {double_quant!r}, {arch!r}, bk={bk!r}, configs=gemv_configs())\n"
        "print(json.dumps(dataclasses.asdict(r)))\n"
    )
    out = revision.python(rev, code, path=(os.path.dirname(os.path.abspath(__file__)),), interpret=False)
    fields = json.loads(out.strip().splitlines()[-1])
    return LoopReport(**{**fields, "memory": tuple(MemOp(**m) for m in fields["memory"])})


def kernel_report(arch: int = 90) -> str:
    """Every kernel's loop (or straight-line) costs: the decode loops, its epilogue, dequantize,
    dequantize_lora, quantize (sm_{arch}): instructions and L1 wavefronts against their budgets."""
    import json

    lines = [f"# benchmarks/static/sass.py, sm_{arch}: lane-instructions and L1 wavefronts against the H200 budgets"]
    loops = [(f"{dt} dq={int(dq)} register table A=fp32", (dt, dq, arch)) for dt in ("bf16", "fp16") for dq in (1, 0)]
    loops += [(f"bf16 dq=1 pair table BK={bk} A=fp32", ("bf16", True, arch, bk)) for bk in (64, 32)]
    for label, args in loops:
        lines.append(loop_line(f"decode loop {label}", gemv_loop_report(*args)))
    lines.append(loop_line("decode loop fp32 dq=1 BK=64", gemv_loop_report("fp32", True, arch, a=None)))
    lines.append(f"decode epilogue: {json.dumps(epilogue_report(arch))}")
    keys = ("name", "per_element", "budget_per_element", "l1_per_element", "l1_budget_per_element", "l1_fraction",
            "lookups", "loads", "stores")  # fmt: skip
    rounded = lambda r: {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys}  # noqa: E731
    for dt in ("bf16", "fp32"):
        for dq in (False, True):
            lines.append(f"dequantize: {json.dumps(rounded(dequantize_report(dt, dq, 64, arch)))}")
    for adapter in ("bf16", "fp32"):
        for bk in (64, 32):
            r = dequantize_lora_report("bf16", adapter, True, bk, arch=arch)
            lines.append(f"dequantize_lora (r = 16): {json.dumps(rounded(r))}")
    for dt in ("bf16", "fp32"):
        lines.append(f"quantize: {json.dumps(rounded(quantize_report(dt, 64, arch)))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python benchmarks/static/sass.py [--compare [REV]]`: the sm_90 bf16 decode loop and the prediction per
    row of SHAPES (DRAM, issue and L1 terms, predicted us last); with --compare, the same for the decode
    kernel of git revision REV (default `revision.BASE`; its BK=64 pair-table loop)."""
    import argparse

    import revision

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument(
        "--compare", nargs="?", const=revision.BASE, metavar="REV",
        help=f"a git revision, or a folder written by revision.py (default {revision.BASE})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    print(prediction_table(gemv_loop_report("bf16", True, 90), "sm_90 bf16 dq decode loop"))
    if args.compare:
        old = revision_loop_report(args.compare)
        print()
        print(prediction_table(old, f"the same call with the loop of {args.compare}", bk=64))


if __name__ == "__main__":
    main()
