"""Per-pipe speed model of a kernel launch from its SASS (cuobjdump), without a GPU.

What it charges, per launch (every term in µs; the prediction is the slowest term + launches):
- pipes: each executed warp-instruction costs 32 / (lanes per clock per SM of its pipe) cycles on the SM
  that runs it (`LANES_PER_CLK`, from the CUDA C++ Programming Guide, "Arithmetic Instructions", table
  "Throughput of Native Arithmetic Instructions (operations per clock cycle per multiprocessor)",
  https://docs.nvidia.com/cuda/cuda-c-programming-guide/#arithmetic-instructions: 32-bit float add /
  multiply / fma 64 on cc 8.0, 128 on 9.0; 32-bit integer add, extended add, multiply-add, shift, compare,
  min/max, bitwise logic 64; conversions to/from 64-bit and "all other" conversions 16; reciprocal,
  rsqrt, exp2, log2 (MUFU) 16; warp shuffle 32). IMAD runs only on the FMA pipe's heavy half (Nsight
  Compute's `fmaheavy` pipe), so IMAD and FP32 also share the 128-lane FMA pipe. Issue: one warp-
  instruction per clock per scheduler, 4 per SM. HMMA: 1024 dense 16-bit FMA per clock per SM (A100
  whitepaper: 312 TFLOP/s = 108 SMs x 1.41 GHz x 2048), applied to sm_90's mma.sync as well.
- L1 / shared memory: one 128-byte wavefront per clock per SM. Each shared access costs its bank
  conflicts, computed from the 32 lanes' byte addresses, which `Warp` gets by emulating the SASS
  integer arithmetic of warp 0 of program 0 (tid, parameters, shifts, LOP3 ...); data-dependent lookups
  (addresses from loaded data) take `sass.lookup_wavefronts`'s simulation of the codes N(0, 1) weights
  give. Global accesses cost their distinct 128-byte lines. An address the emulator cannot follow is
  charged as conflict-free and counted in `unresolved`.
- DRAM: the launch's bytes at the copy bandwidth measured in the same H200 run (4.1 TB/s), or at the
  rate Little's law allows: resident warps x the global bytes a warp has in flight before it first
  waits, over `DRAM_LATENCY_S`.
- latency chain: one warp's timeline of a program in program order, every DRAM load ready
  `DRAM_LATENCY_S` after it issues, async copies ready at their `DEPBAR`; times the waves of programs.
- waves and tail: each SM runs ceil(programs / SMs) programs; occupancy from registers, shared memory,
  warps and blocks per SM.
Constants: H200 132 SMs, 1.98 GHz (NVIDIA's maximum boost clock for H100/H200 SXM; a throttled clock makes
every pipe term slower), DRAM latency 0.4 µs (HBM3 on H100 SXM ~400 ns, mikamirai.com "GPU memory
bandwidth"; ~600 cycles in fp4-site.pages.dev "GPU memory hierarchy"). Nothing is fitted to a timing.
Control flow: warp 0 of a program (its id in `Launch.values`, `_ctaid_x`) is walked once, following a
forward branch where its predicate is known and equal in every lane, falling through otherwise; loop
bodies count their trip counts (`Launch.trips`); code reached only by CALL (slow paths) is left out.
Limits: one warp's addresses stand for all; the chain charges every global load but the constant tables'
lookups a DRAM round trip (data other programs already brought to L2, such as x, comes back sooner);
L2 bandwidth, DRAM queueing, dual issue, register-bank stalls and the LSU's own issue rate are not
modelled; carries of 64-bit adds are taken as 0.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass  # noqa: E402  (benchmarks/static/sass.py: SASS parsing and the lookup simulation)

SMS = 132
CLOCK_HZ = 1.98e9
BANDWIDTH = 4.1e12
DRAM_LATENCY_S = 0.4e-6
ISSUE_PER_CLK = 4
WAVEFRONTS_PER_CLK = 1
MAX_WARPS, MAX_BLOCKS, REGS, SHARED = 64, 32, 65536, {80: 164 * 1024, 90: 228 * 1024}
LAUNCH_US = 2.0
"""Assumed gap between two dependent kernels of one call (CUDA graph), not measured here."""

LANES_PER_CLK = {  # per SM per clock, by pipe (see the module docstring)
    80: {"fp32": 64, "fma": 64, "fmaheavy": 64, "alu": 64, "xu": 16, "shfl": 32, "half": 128},
    90: {"fp32": 128, "fma": 128, "fmaheavy": 64, "alu": 64, "xu": 16, "shfl": 32, "half": 128},
}
HMMA_FMA_PER_CLK = 1024

_FP32 = {"FFMA", "FADD", "FMUL"}
_ALU = {"IADD3", "IADD", "VIADD", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "FSETP", "DSETP", "SEL",
        "FSEL", "FMNMX", "IMNMX", "VIMNMX", "PRMT", "SGXT", "BMSK", "MOV", "P2R", "R2P", "PLOP3", "IABS", "HSETP2",
        "FCHK", "CS2R", "ICMP", "FSWZADD"}  # fmt: skip
_XU = {"MUFU", "F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "POPC", "FLO", "BREV", "I2I"}
_HALF = {"HFMA2", "HADD2", "HMUL2", "HMNMX2"}


def pipe(op: str) -> str:
    """The pipe an opcode executes on ("issue" for those charged only their issue slot)."""
    root = op.split(".")[0]
    if root in _FP32:
        return "fp32"
    if root == "IMAD":
        return "fmaheavy"
    if root in _ALU:
        return "alu"
    if root in _XU:
        return "xu"
    if root in _HALF:
        return "half"
    if root == "SHFL":
        return "shfl"
    if root == "HMMA":
        return "tensor"
    return "issue"


# ------------------------------------------------------------------------------------------------
# one warp's integer arithmetic, for the addresses of its memory accesses

M32 = 0xFFFFFFFF
_SREG = {"SR_TID.X": lambda lane: lane, "SR_LANEID": lambda lane: lane}


@dataclass
class Access:
    """One memory instruction as warp 0 of program 0 executes it."""

    addr: int
    op: str
    space: str  # "shared", "global", "async" (LDGSTS: global read + shared write)
    wavefronts: float
    lanes: list  # byte addresses of the active lanes (None: unresolved)
    data_dependent: bool = False


class Warp:
    """Emulates the integer instructions of one warp (lanes 0..31, program 0) over straight-line SASS.

    Registers hold 32 per-lane values (None where unknown: loaded data, 64-bit high words, opcodes not
    emulated). Parameters come from `params` (constant-bank offset -> name) and `values` (name -> int;
    pointers get distinct 2**32-aligned bases, so the low word is the byte offset)."""

    def __init__(self, params: dict[int, str], values: dict[str, int]):
        self.r: dict[str, list] = {}
        self.u: dict[str, int | None] = {}
        self.p: dict[str, list] = {}
        self.const: dict[int, int] = {}
        self.uniform: set[str] = set()  # registers whose unknown value is the same in every lane
        self.ctaid = {"x": int(values.get("_ctaid_x", 0)), "y": int(values.get("_ctaid_y", 0))}
        for off, name in params.items():
            v = values.get(name)
            if v is None:  # a pointer: low word 0
                v = 0
            self.const[off] = int(v) & M32
            self.const.setdefault(off + 4, (int(v) >> 32) & M32)

    # operands
    def val(self, o: str, lane: int, additive: bool = False):
        """Operand `o` in `lane`; with `additive`, an unknown value that is equal in all lanes (a uniform
        register, a value derived from the program id) reads as 0: it shifts every lane's address alike."""
        o = o.strip()
        neg = o.startswith("-")
        inv = o.startswith("~")
        o = o.lstrip("-~").replace(".reuse", "")
        if o.startswith("|"):
            return None
        if o in ("RZ", "URZ", "SRZ"):
            v = 0
        elif re.fullmatch(r"-?0x[0-9a-f]+|\d+", o):
            v = int(o, 16) if o.startswith("0x") else int(o)
        elif m := re.fullmatch(r"c\[0x0\]\[0x([0-9a-f]+)\]", o):
            v = self.const.get(int(m.group(1), 16))
        elif m := re.fullmatch(r"(UR\d+)(?:\.64)?", o):
            v = self.u.get(m.group(1))
        elif m := re.fullmatch(r"(R\d+)(?:\.64|\.H0_H0|\.H1_H1|\.B\d)?", o):
            vals = self.r.get(m.group(1))
            v = None if vals is None else vals[lane]
        else:
            return None
        if v is None:
            name = re.sub(r"\..*", "", o)
            if additive and not inv and (name.startswith("UR") or name in self.uniform):
                return 0
            return None
        if inv:
            v = ~v
        if neg:
            v = -v
        return v & M32

    def pred(self, o: str, lane: int):
        o = o.strip()
        neg = o.startswith("!")
        o = o.lstrip("!")
        if o in ("PT", "UPT"):
            v = True
        else:
            vals = self.p.get(o)
            v = None if vals is None else vals[lane]
        return None if v is None else (v != neg)

    def address(self, operand: str, lane: int):
        """The byte address (low 32 bits) of a memory operand `[R4+UR6+0x10]` or `desc[UR][R2.64+0x8]`."""
        inner = operand[operand.rfind("[") + 1 : operand.rfind("]")]
        total = 0
        for term in inner.split("+"):
            v = self.val(term, lane, additive=True)
            if v is None:
                return None
            total += v
        return total & M32

    def set_r(self, d: str, values: list, guard: list | None):
        if not re.fullmatch(r"R\d+", d):
            return
        old = self.r.get(d, [None] * 32)
        self.r[d] = [v if (guard is None or guard[i] is None or guard[i]) else old[i] for i, v in enumerate(values)]

    def step(self, ins: str) -> None:
        """Apply one instruction to the registers (memory instructions are read by `access`)."""
        guard = None
        if ins.startswith("@"):
            g, ins = ins.split(None, 1)
            guard = [self.pred(g[1:], lane) for lane in range(32)]
        op = sass.opcode(ins)
        ops = [o for o in sass.operands(ins)]
        root = op.split(".")[0]
        mods = op.split(".")[1:]
        if not ops:
            return
        d = ops[0]
        if root.startswith("U") and root not in ("UMOV",) and d.startswith("UR"):  # uniform datapath
            self.u[d] = self._uniform(root[1:], mods, ops)
            if root == "ULDC" and "64" in mods:
                m = re.search(r"c\[0x0\]\[0x([0-9a-f]+)\]", ops[1])
                nxt = f"UR{int(d[2:]) + 1}"
                self.u[nxt] = self.const.get(int(m.group(1), 16) + 4) if m else None
            return
        if root == "UMOV":
            self.u[d] = self.val(ops[1], 0)
            return
        if root == "S2UR":  # the program id (`ctaid`), CTA 0 of its cluster
            self.u[d] = self.ctaid.get(ops[1][-1].lower(), 0) if "CTAID" in ops[1] else 0
            return
        if root in ("ISETP", "FSETP", "PLOP3", "HSETP2", "UISETP", "UPLOP3"):
            self._setp(root.lstrip("U") if root.startswith("U") else root, mods, ops, guard)
            return
        if not re.fullmatch(r"R\d+", d):
            return
        out = [self._alu(root, mods, ops, lane) for lane in range(32)]
        if root in ("LDC",) and "64" in mods:
            self.set_r(d, out, guard)
            m = re.search(r"c\[0x0\]\[0x([0-9a-f]+)\]", ops[1])
            hi = self.const.get(int(m.group(1), 16) + 4) if m else None
            self.set_r(f"R{int(d[1:]) + 1}", [hi] * 32, guard)
            return
        if root == "IMAD" and "WIDE" in mods:
            lo, hi = [], []
            for lane in range(32):
                a, b = self.val(ops[1], lane), self.val(ops[2], lane)
                c = self.val(ops[3], lane)
                high = re.sub(r"R(\d+)", lambda m: f"R{int(m.group(1)) + 1}", ops[3])
                c_hi = self.val(high, lane) if ops[3] != "RZ" else 0
                if None in (a, b, c, c_hi):
                    lo.append(None)
                    hi.append(None)
                    continue
                v = a * b + (c | (c_hi << 32))
                lo.append(v & M32)
                hi.append((v >> 32) & M32)
            self.set_r(d, lo, guard)
            self.set_r(f"R{int(d[1:]) + 1}", hi, guard)
            return
        self.set_r(d, out, guard)
        srcs = [r for o in ops[1:] for r in sass._regs(o) if r not in ("RZ", "URZ")]
        same = lambda r: self.r.get(r) is not None and len(set(self.r[r])) == 1 and self.r[r][0] is not None  # noqa: E731
        lane_invariant = all(r.startswith("UR") or r in self.uniform or same(r) for r in srcs)
        if all(x is None for x in out) and lane_invariant and not op.startswith(sass._LOADS) and guard is None:
            self.uniform.add(d)
        else:
            self.uniform.discard(d)
        n = sass._wide(op)
        for i in range(1, n):
            self.set_r(f"R{int(d[1:]) + i}", [None] * 32, guard)

    def _uniform(self, root: str, mods: list, ops: list):
        return self._alu(root, mods, ops, 0)

    def _alu(self, root: str, mods: list, ops: list, lane: int):
        args = [o for o in ops[1:] if not re.fullmatch(r"!?U?P(\d+|T)", o)]
        v = lambda i: self.val(args[i], lane) if i < len(args) else None  # noqa: E731
        try:
            if root in ("MOV", "LDC") and not (root == "LDC" and "[R" in ops[1]):
                return v(0)
            if root == "S2R":
                f = _SREG.get(ops[1])
                if "CTAID" in ops[1]:
                    return self.ctaid.get(ops[1][-1].lower(), 0)
                return f(lane) if f else None
            if root == "CS2R":
                return 0 if ops[1] == "SRZ" else None
            if root == "IMAD":  # .X: the high word of a 64-bit sum, its carry-in taken as 0
                if "HI" in mods:
                    a, b, c = v(0), v(1), self.val(args[2], lane, True)
                    return None if None in (a, b, c) else (((a * b) >> 32) + c) & M32
                a, b, c = v(0), v(1), self.val(args[2], lane, True)
                return None if None in (a, b, c) else (a * b + c) & M32
            if root in ("IADD3", "IADD"):  # .X: carry-in taken as 0
                xs = [self.val(args[i], lane, True) for i in range(len(args))]
                return None if None in xs else sum(xs) & M32
            if root == "VIADD":
                a, b = self.val(args[0], lane, True), self.val(args[1], lane, True)
                return None if None in (a, b) else (a + b) & M32
            if root == "LEA":
                if "HI" in mods:  # b + the high word of ({c:a} << s); .X: carry-in taken as 0
                    a, b, c, s = v(0), self.val(args[1], lane, True), v(2), v(3)
                    return None if None in (a, b, c, s) else (((((c << 32) | a) << s) >> 32) + b) & M32
                a, b, s = v(0), self.val(args[1], lane, True), v(2)
                return None if None in (a, b, s) else ((a << s) + b) & M32
            if root == "SHF":
                a, s, b = v(0), v(1), v(2)
                if None in (a, s, b):
                    return None
                s &= 31 if "U32" in mods or "S32" in mods else 63
                if "L" in mods:  # .HI: the high word of ({b:a} << s)
                    return ((((b << 32) | a) << s) >> 32) & M32 if "HI" in mods else (a << s) & M32
                if "HI" in mods:  # funnel shift right of (b:hi, a:lo), high result = b >> s
                    if "S32" in mods:
                        return ((b - (1 << 32) if b >> 31 else b) >> s) & M32
                    return (b >> s) & M32
                return (((b << 32) | a) >> s) & M32
            if root == "LOP3":
                a, b, c, lut = v(0), v(1), v(2), v(3)
                if None in (a, b, c, lut):
                    return None
                out = 0
                for bit in range(8):
                    if lut >> bit & 1:
                        x = (a if bit & 4 else ~a) & (b if bit & 2 else ~b) & (c if bit & 1 else ~c)
                        out |= x
                return out & M32
            if root == "SGXT":
                a, n = v(0), v(1)
                if None in (a, n):
                    return None
                a &= (1 << n) - 1
                if "U32" not in mods and a >> (n - 1) & 1:
                    a -= 1 << n
                return a & M32
            if root == "SEL":
                a, b = v(0), v(1)
                p = self.pred(ops[-1], lane)
                return None if None in (a, b, p) else (a if p else b)
            if root == "PRMT":
                a, sel, b = v(0), v(1), v(2)
                if None in (a, sel, b):
                    return None
                src = a | (b << 32)
                out = 0
                for i in range(4):
                    byte = (src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF
                    if (sel >> (4 * i)) & 8:
                        byte = 0xFF if byte & 0x80 else 0
                    out |= byte << (8 * i)
                return out
            if root in ("VIMNMX", "IMNMX"):  # PT: minimum, !PT: maximum
                a, b = v(0), v(1)
                if None in (a, b):
                    return None
                if "U32" not in mods:
                    a, b = _signed(a), _signed(b)
                return (min(a, b) if ops[-1] == "PT" else max(a, b)) & M32
            if root in ("I2F", "I2FP"):  # integer division's reciprocal idiom: values as float32 bits
                a = v(0)
                return None if a is None else _bits(float(a if "U32" in mods else _signed(a)))
            if root == "MUFU" and "RCP" in mods:
                a = v(0)
                return None if a is None or _float(a) == 0 else _bits(1.0 / _float(a))
            if root == "F2I":
                a = v(0)
                if a is None or not math.isfinite(_float(a)):
                    return None
                return int(_float(a)) & M32
            if root in ("FMUL", "FADD", "FFMA"):
                xs = [v(i) for i in range(3 if root == "FFMA" else 2)]
                if None in xs:
                    return None
                f = [_float(x) for x in xs]
                r = f[0] * f[1] if root == "FMUL" else f[0] + f[1] if root == "FADD" else f[0] * f[1] + f[2]
                return _bits(r) if math.isfinite(r) else None
            if root == "IABS":
                a = v(0)
                return None if a is None else abs(a - (1 << 32) if a >> 31 else a) & M32
        except (IndexError, TypeError):
            return None
        return None

    def _setp(self, root: str, mods: list, ops: list, guard) -> None:
        d = ops[0]
        if root == "PLOP3" and "LUT" in mods:  # Pd = LUT(a, b, c)
            out = []
            for lane in range(32):
                a, b, c = (self.pred(o, lane) for o in ops[2:5])
                lut = self.val(ops[5], lane)
                out.append(None if None in (a, b, c, lut) else bool(lut >> (4 * a + 2 * b + c) & 1))
            if re.fullmatch(r"U?P\d+", d):
                self.p[d] = out
            return
        if root != "ISETP":
            if re.fullmatch(r"U?P\d+", d):
                self.p[d] = [None] * 32
            return
        if "EX" in mods:  # the high words of a 64-bit compare; the low words' result is the last operand
            out = []
            for lane in range(32):
                a, b = self.val(ops[2], lane), self.val(ops[3], lane)
                c, low = self.pred(ops[4], lane), self.pred(ops[5], lane)
                if None in (a, b, c, low):
                    out.append(None)
                    continue
                if "U32" not in mods:
                    a, b = _signed(a), _signed(b)
                tie = a == b and low
                r = {"GT": a > b or tie, "GE": a > b or tie, "LT": a < b or tie, "LE": a < b or tie, "EQ": tie,
                     "NE": a != b or low}.get(mods[0])  # fmt: skip
                out.append(None if r is None else (r and c if "AND" in mods else r or c))
            if re.fullmatch(r"U?P\d+", d):
                self.p[d] = out
            return
        cmp = mods[0]
        signed = "U32" not in mods
        comb = "OR" if "OR" in mods else "XOR" if "XOR" in mods else "AND"
        out = []
        for lane in range(32):
            a, b = self.val(ops[2], lane), self.val(ops[3], lane)
            c = self.pred(ops[4], lane) if len(ops) > 4 else True
            if None in (a, b, c):
                out.append(None)
                continue
            if signed:
                a = a - (1 << 32) if a >> 31 else a
                b = b - (1 << 32) if b >> 31 else b
            r = {"LT": a < b, "LE": a <= b, "GT": a > b, "GE": a >= b, "EQ": a == b, "NE": a != b}.get(cmp)
            if r is None:
                out.append(None)
                continue
            out.append(r and c if comb == "AND" else r or c if comb == "OR" else r != c)
        if re.fullmatch(r"U?P\d+", d):
            self.p[d] = out


def _signed(a: int) -> int:
    return a - (1 << 32) if a >> 31 else a


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & M32))[0]


def _bits(x: float) -> int:
    try:
        return struct.unpack("<I", struct.pack("<f", x))[0]
    except OverflowError:
        return struct.unpack("<I", struct.pack("<f", math.copysign(math.inf, x)))[0]


def shared_wavefronts(op: str, lanes: list) -> float:
    """Wavefronts of one shared-memory instruction whose active lanes access the byte addresses `lanes`
    (index = lane, None = inactive): per phase of lanes (32 for <= 4 bytes, 16 for 8, 8 for 16), the most
    distinct 4-byte words one of the 32 banks holds (equal words broadcast); LDSM/STSM .xN: each 8x8
    matrix's 8 row addresses (16 bytes each, lanes 8i..8i+7) make one phase."""
    if op.startswith(("LDSM", "STSM")):
        n = int(op.rsplit(".", 1)[1]) if op.rsplit(".", 1)[1].isdigit() else 1
        phases = [[(a, 16) for a in lanes[8 * i : 8 * i + 8] if a is not None] for i in range(n)]
    else:
        width = sass._width(op)
        per = 32 if width <= 4 else 128 // width
        phases = [[(a, width) for a in lanes[p : p + per] if a is not None] for p in range(0, 32, per)]
    total = 0
    for phase in phases:
        if not phase:
            continue
        banks: dict[int, set] = {}
        for a, width in phase:
            for w in range(a // 4, (a + max(width, 4) - 1) // 4 + 1):
                banks.setdefault(w % 32, set()).add(w)
        total += max(len(s) for s in banks.values())
    return float(max(total, 1))


# ------------------------------------------------------------------------------------------------
# a launch


@dataclass
class Launch:
    """One kernel launch: its SASS and what the runtime gave it."""

    name: str
    sass_text: str
    params: dict[int, str]
    values: dict[str, int]
    grid: int  # programs
    num_warps: int
    registers: int
    shared_bytes: int
    dram_bytes: float  # bytes it must move to / from DRAM
    trips: int | dict = 1  # iterations of its largest loop, or {loop index in address order: iterations}
    arch: int = 90


@dataclass
class Terms:
    name: str
    issue_us: float
    pipes_us: dict[str, float]
    l1_us: float
    dram_us: float
    littles_us: float
    chain_us: float
    programs_per_sm: int
    blocks_per_sm: int
    waves: int
    inflight_bytes_per_warp: float
    round_trips: float
    unresolved: int
    wavefronts_per_warp: float
    instructions_per_warp: float
    launch_us: float = 0.0
    accesses: list = field(default_factory=list, repr=False)

    @property
    def bound(self) -> tuple[str, float]:
        terms = {"issue": self.issue_us, **{f"pipe {k}": v for k, v in self.pipes_us.items()}, "L1": self.l1_us,
                 "DRAM": self.dram_us, "Little": self.littles_us, "chain": self.chain_us}  # fmt: skip
        name = max(terms, key=terms.get)
        return name, terms[name]

    @property
    def predicted_us(self) -> float:
        return self.bound[1] + self.launch_us


def sass_instructions(text: str) -> list[tuple[int, str]]:
    """(address, instruction) of cuobjdump's SASS text."""
    return [(int(a, 16), i.strip()) for a, i in sass._LINE.findall(text)]


def occupancy(launch: Launch) -> int:
    """Blocks of `launch` resident per SM."""
    regs_per_warp = math.ceil(max(launch.registers, 1) * 32 / 256) * 256
    by_regs = REGS // (regs_per_warp * launch.num_warps)
    by_shared = SHARED[launch.arch] // (launch.shared_bytes + 1024) if launch.shared_bytes else MAX_BLOCKS
    return max(1, min(MAX_BLOCKS, MAX_WARPS // launch.num_warps, by_regs, by_shared))


def loops_of(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: the target of a backward BRA and the branch itself."""
    out = []
    for addr, ins in instructions:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?(?:`\(\S+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            out.append((int(m.group(1), 16), addr))
    return out


def trip_counts(instructions: list[tuple[int, str]], trips) -> dict[tuple[int, int], int]:
    """Iterations per loop: `trips` is an int (the largest loop; the others run once) or a dict
    {index of the loop in address order: iterations}."""
    found = sorted(loops_of(instructions))
    if isinstance(trips, dict):
        return {loop: trips.get(i, 1) for i, loop in enumerate(found)}
    hot = max(found, key=lambda lp: lp[1] - lp[0], default=None)
    return {loop: (trips if loop == hot else 1) for loop in found}


def walk(instructions: list[tuple[int, str]], warp: Warp):
    """The instructions program 0's warp 0 executes once each, in order, emulating them as it goes: a
    forward branch is followed where its predicate is known and equal in every lane (unconditional ones
    always), otherwise execution falls through; backward branches fall through (loop bodies are counted
    by their trip counts)."""
    index = {a: i for i, (a, _) in enumerate(instructions)}
    i = 0
    while i < len(instructions):
        addr, ins = instructions[i]
        yield addr, ins
        text = ins.split(None, 1)[1] if ins.startswith("@") else ins
        m = re.match(r"BRA(?:\.\w+)*\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) > addr and int(m.group(1), 16) in index:
            taken = True
            if ins.startswith("@"):
                lanes = {warp.pred(ins.split()[0][1:], lane) for lane in range(32)}
                taken = lanes == {True}
            if taken:
                i = index[int(m.group(1), 16)]
                continue
        if text.split()[0] == "EXIT" and not ins.startswith("@"):
            return
        i += 1


@dataclass
class ProgramCost:
    """One program's costs (per SM cycles of its warps together), for one kind of program of a launch."""

    cycles: dict[str, float]
    issued: float  # warp-instructions per warp
    wavefronts: float  # per warp
    round_trips: float
    inflight: float  # global bytes a warp requests before it first waits
    unresolved: int
    accesses: list


def program_cost(launch: Launch) -> ProgramCost:
    instructions = sass_instructions(launch.sass_text)
    counts = trip_counts(instructions, launch.trips)
    sources = sass.address_sources(instructions, launch.params)
    warp = Warp(launch.params, launch.values)
    lanes_per_clk = LANES_PER_CLK[launch.arch]
    cycles: dict[str, float] = {}
    issued = wavefronts = 0.0
    accesses: list[Access] = []
    unresolved = 0
    path = []
    for a, ins in walk(instructions, warp):
        path.append((a, ins))
        op = sass.opcode(ins)
        n = math.prod(t for (lo, hi), t in counts.items() if lo <= a <= hi)
        issued += n
        p = pipe(op)
        if p == "tensor":
            m = re.match(r"HMMA\.(\d)(\d)(\d+)", op)
            shape = {"1688": 16 * 8 * 8, "16816": 16 * 8 * 16}.get("".join(m.groups()) if m else "", 16 * 8 * 16)
            cycles["tensor"] = cycles.get("tensor", 0) + n * shape / HMMA_FMA_PER_CLK
        elif p != "issue":
            cycles[p] = cycles.get(p, 0) + n * 32 / lanes_per_clk[p]
            if p in ("fp32", "fmaheavy"):
                cycles["fma"] = cycles.get("fma", 0) + n * 32 / lanes_per_clk["fma"]
        acc = _access(warp, a, ins, op, sources.get(a, frozenset()))
        if acc is not None:
            if acc.lanes is None and not acc.data_dependent:
                unresolved += 1
            accesses.append(acc)
            wavefronts += n * acc.wavefronts
        warp.step(ins)
    tables = {a for a, src in sources.items() if any(t in src for t in sass.TABLES)}
    trips = round_trips(path, counts, tables)
    return ProgramCost(cycles, issued, wavefronts, trips, inflight_bytes(path), unresolved, accesses)


def analyze(launch: Launch, others: list[tuple[Launch, int]] = ()) -> Terms:
    """The terms of `launch` (its `grid` programs), plus `others`: other kinds of program of the same
    launch (a Launch holding their program id in `values`, and how many there are)."""
    kinds = [(launch, launch.grid)] + list(others)
    costs = [(program_cost(lc), lc, count) for lc, count in kinds]
    blocks = occupancy(launch)
    grid = sum(count for _, count in kinds)
    waves = math.ceil(grid / (SMS * blocks))
    to_us = 1e6 / CLOCK_HZ
    cycles: dict[str, float] = {}
    issued = wavefronts = 0.0
    chain_us = 0.0
    for cost, lc, count in costs:  # the busiest SM runs ceil(count / SMs) programs of each kind
        warps = math.ceil(count / SMS) * lc.num_warps
        for k, v in cost.cycles.items():
            cycles[k] = cycles.get(k, 0.0) + warps * v
        issued += warps * cost.issued
        wavefronts += warps * cost.wavefronts
        rounds = math.ceil(math.ceil(count / SMS) / blocks)
        chain_us = max(chain_us, cost.round_trips * DRAM_LATENCY_S * 1e6 * rounds)
    main = costs[0][0]
    per_sm = math.ceil(launch.grid / SMS)
    dram_us = launch.dram_bytes / BANDWIDTH * 1e6
    resident_warps = min(blocks, per_sm) * launch.num_warps
    rate = min(BANDWIDTH, SMS * resident_warps * main.inflight / DRAM_LATENCY_S) if main.inflight else BANDWIDTH
    return Terms(
        launch.name, issued / ISSUE_PER_CLK * to_us, {k: v * to_us for k, v in sorted(cycles.items())},
        wavefronts / WAVEFRONTS_PER_CLK * to_us, dram_us, launch.dram_bytes / rate * 1e6, chain_us, per_sm, blocks,
        waves, main.inflight, max(c.round_trips for c, _, _ in costs), sum(c.unresolved for c, _, _ in costs),
        main.wavefronts, main.issued, accesses=[a for c, _, _ in costs for a in c.accesses],
    )  # fmt: skip


def _access(warp: Warp, addr: int, ins: str, op: str, src: frozenset) -> Access | None:
    """The L1 cost of one memory instruction for warp 0 (None for non-memory instructions)."""
    if op.startswith(("LDGDEPBAR", "DEPBAR")) or not op.startswith(
        ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "ATOM", "RED", "LD.", "ST.")
    ):
        return None
    if ins.startswith("@!PT"):
        return None  # never executes (a scheduling placeholder)
    guard = None
    body = ins
    if ins.startswith("@"):
        g, body = ins.split(None, 1)
        guard = [warp.pred(g[1:], lane) for lane in range(32)]
    ops = sass.operands(body)
    mem = [o for o in ops if "[" in o and not o.startswith("c[")]
    data = any(s.startswith("@") for s in src if not s.startswith("|"))
    table = next((t for t in sass.TABLES if t in src), "") if data else ""

    def lanes_of(operand):
        out = []
        for lane in range(32):
            if guard is not None and guard[lane] is False:
                out.append(None)
                continue
            a = warp.address(operand, lane)
            if a is None:
                return None
            out.append(a)
        return out

    width = sass._width(op)
    if op.startswith("LDGSTS"):
        dst = lanes_of(mem[0])
        glob = lanes_of(mem[1])
        read = sass.lookup_wavefronts(table, width) if table else _lines(glob, width)
        write = shared_wavefronts(op.replace("LDGSTS", "STS"), dst) if dst is not None else max(1.0, 32 * width / 128)
        return Access(addr, op, "async", read + write, dst, bool(table))
    if op.startswith(("LDG", "STG", "RED", "ATOMG", "LD.", "ST.")):
        glob = lanes_of(mem[0])
        cost = sass.lookup_wavefronts(table, width) if table else _lines(glob, width)
        return Access(addr, op, "global", cost, glob, bool(table))
    lanes = lanes_of(mem[0])
    if lanes is None:
        if data:  # a data-dependent shared lookup: conflicts as simulated over N(0, 1) codes
            return Access(addr, op, "shared", sass.lookup_wavefronts(table or "pairs_ptr", width), None, True)
        matrices = op.rsplit(".", 1)[-1]
        plain = float(matrices) if op.startswith(("LDSM", "STSM")) and matrices in ("1", "2", "4") else 1.0
        plain = plain if op.startswith(("LDSM", "STSM")) else max(1.0, 32 * width / 128)
        return Access(addr, op, "shared", plain, None)
    return Access(addr, op, "shared", shared_wavefronts(op, lanes), lanes)


def _lines(lanes: list | None, width: int) -> float:
    """Distinct 128-byte lines the active lanes touch (ideal when the addresses are unknown)."""
    if lanes is None:
        return max(1.0, 32 * width / 128)
    lines = {(a + j) // 128 for a in lanes if a is not None for j in (0, width - 1)}
    return float(max(1, len(lines)))


def inflight_bytes(instructions: list[tuple[int, str]]) -> float:
    """Global bytes one thread has requested before it first waits on one of them (scan in program order
    until an instruction reads a register a pending global load writes, or waits on async copies)."""
    pending: set[str] = set()
    total = 0.0
    for _, ins in instructions:
        body = ins.split(None, 1)[1] if ins.startswith("@") else ins
        op = sass.opcode(body)
        ops = sass.operands(body)
        reads = {r for o in ops[1:] for r in sass._regs(o)} if op.split(".")[0] not in ("STG", "STS") else {
            r for o in ops for r in sass._regs(o)}  # fmt: skip
        if pending & reads or op.startswith("DEPBAR") or op.startswith("BAR"):
            break
        if op.startswith(("LDG", "LDGSTS")) and not op.startswith("LDGDEPBAR"):
            total += sass._width(op)
            if op.startswith("LDG"):
                pending |= set(sass._destinations(op, ops))
    return total * 32


def _expand(path: list[tuple[int, str]], counts: dict[tuple[int, int], int]) -> list[tuple[int, str]]:
    """`path` with each loop's body repeated its trip count (outermost loops first, nested ones inside)."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(path):
        a = path[i][0]
        loop = max((lp for lp in counts if lp[0] == a), key=lambda lp: lp[1] - lp[0], default=None)
        if loop is None:
            out.append(path[i])
            i += 1
            continue
        j = i
        while j < len(path) and path[j][0] <= loop[1]:
            j += 1
        inner = {lp: t for lp, t in counts.items() if lp != loop and loop[0] <= lp[0] and lp[1] <= loop[1]}
        body = _expand(path[i + 1 : j], inner)
        out += ([path[i]] + body) * max(1, counts[loop])
        i = j
    return out


def round_trips(path: list[tuple[int, str]], counts: dict[tuple[int, int], int],
                tables: set[int] = frozenset()) -> float:  # fmt: skip
    """DRAM round trips on one warp's critical path: in program order, an instruction issues after the
    previous one and after its operands are ready; a global load is ready one round trip after it issues,
    except loads at `tables` (addresses of lookups in the small constant tables, `sass.TABLES`: L1 hits,
    their latency left out); async copies are ready at the DEPBAR that waits for them. Loop bodies run
    their trip counts."""
    ready: dict[str, float] = {}
    groups: list[float] = []
    pending_async: list[float] = []
    t = 0.0
    for addr, ins in _expand(path, counts):
        text = ins.split(None, 1)[1] if ins.startswith("@") else ins
        op = sass.opcode(text)
        ops = sass.operands(text)
        dests = sass._destinations(op, ops)
        srcs = {r for o in ops[len(dests[:1]) :] for r in sass._regs(o)}
        t = max([t] + [ready.get(r, 0.0) for r in srcs])
        if op.startswith("LDGSTS"):
            pending_async.append(t + 1.0)
        elif op.startswith("LDGDEPBAR"):
            groups.append(max(pending_async, default=t))
            pending_async = []
        elif op.startswith("DEPBAR"):
            m = re.search(r"0x([0-9a-f]+)|,\s*(\d+)", text)
            keep = int(m.group(1) or m.group(2), 16 if m.group(1) else 10) if m else 0
            done = groups[: max(0, len(groups) - keep)]
            t = max([t] + done)
            groups = groups[max(0, len(groups) - keep) :]
        elif op.startswith("LDG") and not op.startswith("LDGDEPBAR"):
            for d in dests:
                ready[d] = t + (0.0 if addr in tables else 1.0)
        else:
            for d in dests:
                ready[d] = t
    return t


def format_rows(rows: list[tuple[str, Terms, float | None]]) -> str:
    """One row per launch: every term, the measured time where known, `predicted µs` last."""
    pipes = sorted({p for _, t, _ in rows for p in t.pipes_us})
    head = (f"{'launch':34} {'prog/SM':>7} {'blk/SM':>6} {'instr/warp':>10} {'wavef/warp':>10} {'unres':>5} "
            f"{'issue':>7} " + " ".join(f"{p:>8}" for p in pipes) + f" {'L1':>7} {'DRAM':>7} {'Little':>7} "
            f"{'RTs':>6} {'chain':>7} {'launch':>6} {'bound':>12} {'measured':>8} {'predicted µs':>12}")  # fmt: skip
    out = [head, "-" * len(head)]
    for label, t, measured in rows:
        out.append(
            f"{label:34} {t.programs_per_sm:>7} {t.blocks_per_sm:>6} {t.instructions_per_warp:>10.0f} "
            f"{t.wavefronts_per_warp:>10.0f} {t.unresolved:>5} {t.issue_us:>7.1f} "
            + " ".join(f"{t.pipes_us.get(p, 0.0):>8.1f}" for p in pipes)
            + f" {t.l1_us:>7.1f} {t.dram_us:>7.1f} {t.littles_us:>7.1f} {t.round_trips:>6.1f} {t.chain_us:>7.1f} "
            f"{t.launch_us:>6.1f} {t.bound[0]:>12} {measured if measured is not None else '-':>8} "
            f"{t.predicted_us:>12.1f}"
        )
    return "\n".join(out)
