"""Ahead-of-time compilation of every kernel configuration for a GPU, without a GPU.

`triton.compile` builds PTX and a cubin for a named target (sm_80 Ampere, sm_90 Hopper) on any machine;
ptxas and cuobjdump ship inside Triton's wheel. From the cubin we read, per configuration: registers per
thread, local memory (spills) and stack per thread, static shared memory, and from Triton's metadata the
shared memory it allocates; from the PTX, which matrix instructions it uses (`mma.sync`, `wgmma`).

Each configuration compiles as the runtime would specialise it (`VARIANTS`): at run time Triton turns
every integer argument equal to 1 into a compile-time constant (unless the kernel lists it in
`do_not_specialize`) and marks integers and pointers divisible by 16. The interpreter does neither, so
code such as `M.to(tl.int64)` passes every CPU test and fails to compile on a GPU when M = 1
(benchmarks/results/2026-11-29-h200/README.md, finding 1); the "ones" variant catches that class of bug here.

Compile records (`fixtures/compile-records-<triton version>.jsonl`) carry a compile's resource usage
over to a later run whose inputs are the same. Each record is keyed by `compile_key`: Triton's own cache
key (the hash of Triton's compiler sources and libtriton, of the kernel's source and every function and
global constant it reads, of the specialisation, of ptxas' version and the arch, and of the options)
joined with the hash of this module's analysis. A job whose key has no record is compiled; a random
sample of the recorded ones (`--audit`) is compiled again and must give its record's numbers exactly.
`--write-records` refreshes the file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# As tests/conftest.py sets it: every kernel sets `enable_fp_fusion`, so this default changes no compile,
# but it is one of Triton's cache-invalidating variables, part of `compile_key`: records written from a
# shell and read by the suite agree only where both processes see the same value.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource  # noqa: E402

from nf4.kernels.common import LaunchConfig  # noqa: E402

ARCHS = (80, 90)
TABLE_ARGS = frozenset({"code_ptr", "nested_code_ptr", "pairs_ptr", "thresholds_ptr", "table_ptr", "lut_ptr"})
"""Pointer arguments to small constant tables, the only ones that may be indexed with int32."""
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
"""Maximum dynamic shared memory per block, bytes (A100: 163 KB, H100/H200: 227 KB)."""

VARIANTS = ("aligned", "ones", "plain")
"""How the integer and pointer arguments are specialised, as the runtime does for:
- aligned: every pointer and integer divisible by 16 (the common launch: model-sized, aligned tensors);
- ones:    every integer that can be specialised equals 1 (a compile-time constant), pointers aligned
           (M = 1 decode, r = 1, one block, one output feature ...);
- plain:   nothing known (odd sizes, unaligned views).
Integers are 32-bit in "aligned" and "ones" (the runtime passes values below 2**31 as i32) and keep the
width the configuration declares in "plain" (i64 where a tensor may pass 2**31 elements)."""

_DIVISIBLE = [["tt.divisibility", 16]]


def specialize(cfg: LaunchConfig, variant: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, as the runtime builds them for `variant`.

    The signature names every parameter in order ("constexpr" for compile-time ones); constexprs and
    attrs are keyed by parameter index paths, like `JITFunction._pack_args`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(cfg.kernel.params):
        name = param.name
        if name in cfg.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = cfg.constexprs[name]
            continue
        ty = cfg.signature[name]
        integer = ty[0] in "iu" and not ty.startswith("*")
        if integer and variant == "ones" and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
            continue
        if integer and variant != "plain":
            ty = "i32"  # the runtime's type for values below 2**31; "plain" keeps the declared width
        signature[name] = ty
        pointer = ty.startswith("*")
        if (pointer and variant != "plain") or (integer and variant == "aligned" and not param.do_not_specialize):
            if not param.do_not_specialize_on_alignment:
                attrs[(i,)] = _DIVISIBLE
    return signature, constexprs, attrs


@dataclass(frozen=True)
class CompileReport:
    name: str
    arch: int
    variant: str
    num_warps: int
    registers: int
    spill_bytes: int  # local memory per thread: register spills (and local arrays)
    stack_bytes: int
    shared_bytes: int  # what Triton allocates per block (metadata.shared)
    mma: tuple[str, ...]  # matrix instructions found in the PTX
    i32_indexed: tuple[str, ...]  # pointer arguments some load/store indexes with 32-bit offsets
    large_m: bool = False  # a large-M tile, expected to use wgmma on sm_90
    stack_ok: int = 0  # stack bytes this configuration may use (`nf4.kernels.common.IEEE_DIV_STACK`)
    error: str = ""  # the compiler's message where compilation failed
    triton: str = triton.__version__
    key: str = ""  # `compile_key` of this job
    source: str = "compiled"  # "compiled", "record" (read from the records) or "audit" (compiled, checked against them)

    @property
    def ok(self) -> bool:
        """No spills, no stack beyond `stack_ok`, shared memory within the arch's limit, int64 offsets
        into tensors, wgmma for large-M tiles on sm_90."""
        return (
            not self.error
            and self.spill_bytes == 0
            and self.stack_bytes <= self.stack_ok
            and self.shared_bytes <= SHARED_LIMIT[self.arch]
            and set(self.i32_indexed) <= TABLE_ARGS
            and (not self.large_m or self.arch != 90 or "wgmma" in self.mma or self.name.find("fp32") >= 0)
        )


def all_configs() -> list[LaunchConfig]:
    """Every kernel configuration the package can launch."""
    from nf4.kernels.adapters import adapter_configs
    from nf4.kernels.dequantize import dequantize_configs, dequantize_lora_configs
    from nf4.kernels.dora import dora_configs
    from nf4.kernels.gemv import gemv_configs
    from nf4.kernels.matmul import matmul_configs
    from nf4.kernels.quantize import quantize_configs

    return (
        quantize_configs()
        + dequantize_configs()
        + dequantize_lora_configs()
        + matmul_configs()
        + gemv_configs()
        + adapter_configs()
        + dora_configs()
    )


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_config(cfg: LaunchConfig, arch: int, variant: str = "aligned") -> CompileReport:
    """Compile one configuration for `sm_{arch}`, specialised as `variant`, and read its resource usage."""
    signature, constexprs, attrs = specialize(cfg, variant)
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options)
    except Exception as e:  # noqa: BLE001 - a compile failure is a finding of the report, not a crash
        message = " ".join(str(e).split())[-300:]
        return CompileReport(
            cfg.name, arch, variant, cfg.options.get("num_warps", 4), 0, 0, 0, 0, (), (), error=message
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    mma = tuple(op for op in ("wgmma", "mma.sync") if re.search(rf"\b{re.escape(op)}\b", ptx))
    i32_indexed = i32_indexed_args(kernel.asm["ttir"])
    return CompileReport(
        name=cfg.name,
        arch=arch,
        variant=variant,
        num_warps=cfg.options.get("num_warps", 4),
        registers=int(fields["REG"]),
        spill_bytes=int(fields["LOCAL"]),
        stack_bytes=int(fields["STACK"]),
        shared_bytes=int(kernel.metadata.shared),
        mma=mma,
        i32_indexed=i32_indexed,
        large_m=cfg.large_m,
        stack_ok=cfg.stack_ok,
    )


RECORD_FIELDS = ("registers", "spill_bytes", "stack_bytes", "shared_bytes", "mma", "i32_indexed")
"""What a compile record keeps: everything a report holds that the compile, not the configuration, decides."""

RECORDS = Path(__file__).resolve().parent / "fixtures"


def records_path(version: str = triton.__version__) -> Path:
    """The committed compile records of triton `version`."""
    return RECORDS / f"compile-records-{version}.jsonl"


def compile_key(cfg: LaunchConfig, arch: int, variant: str) -> str:
    """The key of one compile: Triton's cache key for it (as `triton.compile` computes it, without
    compiling) and the hash of the analysis that turns the compiled kernel into a report."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    signature, constexprs, attrs = specialize(cfg, variant)
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    options = backend.parse_options(dict(cfg.options or {}, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(f"{key}-{_ANALYSIS}".encode()).hexdigest()


def load_records(path: Path) -> dict[str, dict]:
    """{key: record} from a records file (none if it does not exist)."""
    if not Path(path).exists():
        return {}
    records = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["key"]] = record
    return records


def record_of(report: CompileReport) -> dict:
    """The record of a successful compile: its key, what it compiled (for readers) and `RECORD_FIELDS`."""
    fields = asdict(report)
    return {"key": report.key, "name": report.name, "arch": report.arch, "variant": report.variant} | {
        f: list(fields[f]) if isinstance(fields[f], tuple) else fields[f] for f in RECORD_FIELDS
    }


def write_records(path: Path, reports: list[CompileReport], keep: set[str] | None = None) -> int:
    """Write the records of the successful `reports` to `path`, with the records already there whose key
    is in `keep` (the keys of every job the package has now: stale ones go). Returns how many it wrote."""
    records = {k: r for k, r in load_records(path).items() if keep is None or k in keep}
    records |= {r.key: record_of(r) for r in reports if r.key and not r.error}
    lines = sorted((json.dumps(r, sort_keys=True) for r in records.values()), key=lambda line: json.loads(line)["key"])
    Path(path).write_text("".join(line + "\n" for line in lines))
    return len(records)


def from_record(cfg: LaunchConfig, arch: int, variant: str, key: str, record: dict) -> CompileReport:
    """The report of a job whose compile is on record."""
    fields = {f: tuple(record[f]) if isinstance(record[f], list) else record[f] for f in RECORD_FIELDS}
    return CompileReport(
        name=cfg.name,
        arch=arch,
        variant=variant,
        num_warps=cfg.options.get("num_warps", 4),
        large_m=cfg.large_m,
        stack_ok=cfg.stack_ok,
        key=key,
        source="record",
        **fields,
    )


def audit(report: CompileReport, record: dict) -> CompileReport:
    """`report` (a fresh compile) marked as an audit of `record`, with an error naming every field that
    differs."""
    fresh = record_of(report)
    differ = [f"{f} {record[f]} on record, {fresh[f]} compiled" for f in RECORD_FIELDS if record[f] != fresh[f]]
    error = report.error or ("record differs from this compile: " + "; ".join(differ) if differ else "")
    return replace(report, source="audit", error=error)


def i32_indexed_args(ttir: str) -> tuple[str, ...]:
    """Kernel arguments (pointers) whose first offset is a 32-bit integer.

    Follows the base of each `tt.addptr` with an i32 offset back through splat / broadcast /
    expand_dims / reshape. Reaching a function argument that way means the argument itself is indexed
    with 32 bits; passing an earlier `tt.addptr` first (an int64 offset to a row or tile start) makes the
    i32 part a local offset within it, which is fine. Arrays that can exceed 2**31 elements must not
    appear in the result.
    """
    defs = dict(re.findall(r"^\s*(%[\w.]+) = (.*)$", ttir, flags=re.M))
    args = dict(re.findall(r"(%[\w.]+): !tt\.ptr<\w+>[^,)]*loc\(\"(\w+)\"", ttir))
    offset_types = {}
    for name, expr in defs.items():
        m = re.match(r"tt\.addptr %[\w.]+, %[\w.]+ : [^,]+, (?:tensor<[\dx]*)?(i\d+)", expr)
        if m:
            offset_types[name] = m.group(1)

    def argument(value: str, depth: int = 0) -> str | None:
        """The argument `value` is a view of, or None if an addptr comes first."""
        if value in args:
            return args[value]
        expr = defs.get(value, "")
        m = re.match(r"tt\.(splat|broadcast|expand_dims|reshape|addptr) (%[\w.]+)", expr)
        if m is None or depth > 64:
            return None
        if m.group(1) == "addptr":
            return argument(m.group(2), depth + 1) if offset_types.get(value) == "i32" else None
        return argument(m.group(2), depth + 1)

    found = set()
    for name, offset_type in offset_types.items():
        if offset_type == "i32":
            base = re.match(r"tt\.addptr (%[\w.]+)", defs[name]).group(1)
            arg = argument(base)
            if arg is not None:
                found.add(arg)
    return tuple(sorted(found))


def jobs_for(variants: tuple[str, ...], archs: tuple[int, ...], match: str = "") -> list[tuple[int, int, str]]:
    """(configuration index, arch, variant) to compile. "ones" compiles one configuration per code path
    (`LaunchConfig.path`): whether an argument equal to 1 breaks compilation depends on which statements
    are traced, not on tile sizes."""
    configs = all_configs()
    jobs = []
    for variant in variants:
        seen = set()
        for i, cfg in enumerate(configs):
            if match not in cfg.name or (variant == "ones" and cfg.path in seen):
                continue
            if variant == "plain" and cfg.aligned_only:
                continue
            seen.add(cfg.path)
            jobs += [(i, arch, variant) for arch in archs if not cfg.archs or arch in cfg.archs]
    return jobs


def _compile_indexed(job: tuple[int, int, str]) -> CompileReport:
    index, arch, variant = job
    return compile_config(all_configs()[index], arch, variant)


def compile_all(
    archs: tuple[int, ...] = ARCHS,
    workers: int | None = None,
    match: str = "",
    variants: tuple[str, ...] = ("aligned", "ones"),
    records: dict[str, dict] | None = None,
    audit_fraction: float = 0.0,
    seed: int = 0,
) -> list[CompileReport]:
    """Compile every configuration (whose name contains `match`) for every arch and variant, `workers`
    processes at a time (default: one per CPU). Jobs of the same key compile once. With `records`, a job
    whose key is on record is read from it, except `audit_fraction` of them (at least one where any is on
    record), drawn with `seed`, which compile and are compared with their record."""
    configs = all_configs()
    jobs = jobs_for(variants, archs, match)
    keys = [compile_key(configs[i], arch, variant) for i, arch, variant in jobs]
    records = records or {}
    recorded = sorted({k for k in keys if k in records})
    audited = set()
    if recorded and audit_fraction > 0:
        audited = set(random.Random(seed).sample(recorded, max(1, math.ceil(audit_fraction * len(recorded)))))
    first = {}  # key -> the first job that compiles it
    for job, key in zip(jobs, keys, strict=True):
        if (key not in records or key in audited) and key not in first:
            first[key] = job
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(first) <= 1:
        compiled = [_compile_indexed(job) for job in first.values()]
    else:
        with ProcessPoolExecutor(min(workers, len(first))) as pool:
            compiled = list(pool.map(_compile_indexed, first.values()))
    fresh = dict(zip(first, compiled, strict=True))
    reports = []
    for (i, arch, variant), key in zip(jobs, keys, strict=True):
        cfg = configs[i]
        if key in fresh:
            job = dict(name=cfg.name, arch=arch, variant=variant, large_m=cfg.large_m, stack_ok=cfg.stack_ok)
            r = replace(fresh[key], **job, key=key)
            reports.append(audit(r, records[key]) if key in audited else r)
        else:
            reports.append(from_record(cfg, arch, variant, key, records[key]))
    return reports


def every_key() -> set[str]:
    """The keys of every job the package has now, every variant on every arch."""
    configs = all_configs()
    return {compile_key(configs[i], arch, variant) for i, arch, variant in jobs_for(VARIANTS, ARCHS)}


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/static/aot.py [--json] [--arch 80 90] [--variant aligned ones plain] [--match NAME]`:
    compile, print the report.

    Run it in a process without `TRITON_INTERPRET=1` (the interpreter replaces the kernels with
    Python functions that cannot be compiled).
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--variant", nargs="+", default=["aligned", "ones"], choices=VARIANTS)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--match", default="", help="only configurations whose name contains this")
    parser.add_argument(
        "--records",
        nargs="?",
        const=str(records_path()),
        default=None,
        help="read compile records from this file (default: this triton's committed records)",
    )
    parser.add_argument(
        "--audit", type=float, default=0.05, help="fraction of the recorded jobs compiled again and compared"
    )
    parser.add_argument("--seed", type=int, default=None, help="draws the audited jobs (default: random)")
    parser.add_argument(
        "--write-records",
        nargs="?",
        const=str(records_path()),
        default=None,
        help="write the records of this run there, keeping those of other current jobs and dropping stale ones",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if not 0 <= args.audit <= 1:
        parser.error(f"--audit must be a fraction in [0, 1], got {args.audit}")
    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    records = load_records(Path(args.records)) if args.records else None
    reports = compile_all(tuple(args.arch), args.workers, args.match, tuple(args.variant), records, args.audit, seed)
    if args.write_records:
        written = write_records(Path(args.write_records), reports, keep=every_key())
        print(f"{written} records in {args.write_records}", file=sys.stderr)
    counts = {s: sum(r.source == s for r in reports) for s in ("compiled", "record", "audit")}
    print(f"audit seed {seed}: {counts}", file=sys.stderr)
    if args.json:
        for r in reports:
            print(json.dumps({**asdict(r), "ok": r.ok}))
    else:
        print(format_table(reports))
    return 0 if all(r.ok for r in reports) else 1


def format_table(reports: list[CompileReport]) -> str:
    """A fixed-width table, one row per configuration and arch."""
    head = f"{'kernel configuration':60} {'variant':>7} {'arch':>5} {'warps':>5} {'regs':>5} "
    head += f"{'spill B':>7} {'stack B':>7} {'smem B':>7}  mma"
    rows = [head, "-" * len(head)]
    for r in reports:
        rows.append(
            f"{r.name:60} {r.variant:>7} {'sm_' + str(r.arch):>5} {r.num_warps:>5} {r.registers:>5} {r.spill_bytes:>7} "
            f"{r.stack_bytes:>7} {r.shared_bytes:>7}  {','.join(r.mma) or '-'}{'' if r.ok else '  NOT OK'}"
        )
        if r.error:
            rows.append(f"    compile error: {r.error}")
    return "\n".join(rows)


_ANALYSIS = hashlib.sha256(
    "".join(inspect.getsource(f) for f in (compile_config, i32_indexed_args, specialize)).encode()
).hexdigest()
"""The hash of the code that compiles a job and reads its report: records of another version of it are stale."""


if __name__ == "__main__":
    raise SystemExit(main())
