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
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nf4.kernels.common import LaunchConfig

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
) -> list[CompileReport]:
    """Compile every configuration (whose name contains `match`) for every arch and variant, `workers`
    processes at a time (default: one per CPU)."""
    jobs = jobs_for(variants, archs, match)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_indexed(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_indexed, jobs))


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/static/aot.py [--json] [--arch 80 90] [--variant aligned ones plain] [--match NAME]`:
    compile, print the report.

    Run it in a process without `TRITON_INTERPRET=1` (the interpreter replaces the kernels with
    Python functions that cannot be compiled).
    """
    import argparse
    import json
    from dataclasses import asdict

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--variant", nargs="+", default=["aligned", "ones"], choices=VARIANTS)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--match", default="", help="only configurations whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    reports = compile_all(tuple(args.arch), args.workers, args.match, tuple(args.variant))
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


if __name__ == "__main__":
    raise SystemExit(main())
