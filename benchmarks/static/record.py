"""Record SASS fixtures: kernels compiled for a GPU as the runtime specialised them at given arguments.

    python benchmarks/static/record.py backtest --triton /tmp/t36 --out benchmarks/static/fixtures/2d6bb1ae850a.json.gz

`backtest` extracts commit 2d6bb1ae850a's `kernels/` and `nf4/` (`git archive`) into a temporary folder laid
out as the installed package (`kernels/` -> `nf4/kernels/`), adds "M" to `_splitk_reduce_kernel`'s
`do_not_specialize` (the patch the H200 run of 2026-11-29 needed for M = 1), and, in a subprocess whose
PYTHONPATH is the given triton folder then that tree (nothing of this checkout), compiles for sm_90 the
kernels that run measured (`BACKTEST`), with the argument values of the measured shapes. The runtime's
specialisation (triton 3.x `JITFunction`): an integer argument equal to 1 becomes a constant, an integer
or pointer divisible by 16 gets `tt.divisibility = 16` (torch allocations are 256-byte aligned), unless
listed in `do_not_specialize`; integers below 2**31 are i32. Each record keeps cuobjdump's SASS, the
cubin's parameter offsets, registers, shared memory, the grid and the arguments.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "2d6bb1ae850a"

# (label, config name in that commit's `all_configs()`, integer/float argument values, grid)
_N, _K = 8192, 8192
BACKTEST = [
    ("dequantize_bf16_dq0_8192x8192", "dequantize_nf4[bs=64,bf16,dq=0]", {"n_elements": _N * _K}, [_N * _K // 2048]),
    ("dequantize_bf16_dq0_4096x14336", "dequantize_nf4[bs=64,bf16,dq=0]", {"n_elements": 4096 * 14336},
     [4096 * 14336 // 2048]),
    ("dequantize_bf16_dq1_8192x8192", "dequantize_nf4[bs=64,bf16,dq=1]", {"n_elements": _N * _K}, [_N * _K // 2048]),
    ("dequantize_bf16_dq1_4096x14336", "dequantize_nf4[bs=64,bf16,dq=1]", {"n_elements": 4096 * 14336},
     [4096 * 14336 // 2048]),
    ("quantize_bf16_8192x8192", "quantize_nf4[bs=64,bf16]", {"n_elements": _N * _K}, [_N * _K // 2048]),
    # the decode call's streaming kernel: M = 1, 16x64x64 tiles, 4 warps, 3 stages, split-K 3 (k_per_split 2752)
    ("matmul_m1_r16_split3_8192x8192", "nf4_matmul[small,16x64x64w4s3,bf16,trans=0,dq=1,partial=1]",
     {"M": 1, "IN": _K, "OUT": _N, "K_W": _K, "log2_bs": 6, "n_blocks": _N * _K // 64, "r": 16, "k_per_split": 2752,
      "keep_scale": 1.0, "has_lora": 1, "has_bias": 0, "has_mask": 0}, [_N // 64, 3]),
]  # fmt: skip


def compile_launch(cfg, values: dict, arch: int = 90) -> dict:
    """Compile `cfg` (a LaunchConfig of the importable nf4) for sm_{arch} as the runtime specialises it at
    the argument `values` (see the module docstring); the record described there, without grid."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    signature, constexprs, attrs, names = {}, {}, {}, []
    for i, param in enumerate(cfg.kernel.params):
        p = param.name
        if p in cfg.constexprs:
            signature[p], constexprs[(i,)] = "constexpr", cfg.constexprs[p]
            continue
        ty = cfg.signature[p]
        if ty.startswith("*"):
            signature[p] = ty
            if not param.do_not_specialize and not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif ty.startswith("fp"):
            signature[p] = ty
        else:
            v = int(values[p])
            if v == 1 and not param.do_not_specialize:
                signature[p], constexprs[(i,)] = "constexpr", 1
                continue
            signature[p] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and not param.do_not_specialize and not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        names.append(p)
    src = ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        run = lambda flag: subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout  # noqa: E731
        sass, elf, usage = run("-sass"), run("-elf"), run("--dump-resource-usage")
    base = re.search(r"EIATTR_PARAM_CBANK\s+Format:\s+\S+\s+Value:\s+\S+\s+0x([0-9a-f]+)", elf)
    start = int(base.group(1), 16) & 0xFFFF if base else 0
    offsets = {}
    for ordinal, offset in re.findall(r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x([0-9a-f]+)", elf):
        if int(ordinal, 16) < len(names):
            offsets[start + int(offset, 16)] = names[int(ordinal, 16)]
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return {
        "config": cfg.name, "triton": triton.__version__, "arch": arch,
        "num_warps": cfg.options.get("num_warps", 4), "num_stages": cfg.options.get("num_stages", 3),
        "registers": int(fields["REG"]), "shared_bytes": int(kernel.metadata.shared),
        "args": values, "params": {str(k): v for k, v in offsets.items()}, "sass": sass,
    }  # fmt: skip


def _compile_here(jobs: list[tuple[str, str, dict, list]]) -> list[dict]:
    """Compile `jobs` with the triton and nf4 on sys.path (run inside the subprocess)."""
    from nf4.kernels.aot import all_configs

    configs = {cfg.name: cfg for cfg in all_configs()}
    return [{"label": label, **compile_launch(configs[name], values, 90), "grid": grid}
            for label, name, values, grid in jobs]  # fmt: skip


def extract(commit: str, dest: Path) -> Path:
    """`commit`'s package as installed (nf4/ with nf4/kernels/) under `dest`, the M = 1 patch applied."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kernels", "nf4"], capture_output=True,
                             check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "kernels").rename(dest / "nf4" / "kernels")
    matmul = dest / "nf4" / "kernels" / "matmul.py"
    text = matmul.read_text()
    old = '@triton.jit(do_not_specialize=["has_lora", "has_bias", "has_mask", "keep_scale"])\n'
    old += "def _splitk_reduce_kernel("
    assert old in text, "the reduce kernel's decorator moved: update the patch"
    matmul.write_text(text.replace(old, old.replace('["has_lora"', '["M", "has_lora"')))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["backtest", "_inner"])
    parser.add_argument("--triton", required=False, help="a folder holding triton 3.6 (pip install --target)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.what == "_inner":
        json.dump(_compile_here([tuple(j) for j in json.load(sys.stdin)]), sys.stdout)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract(COMMIT, Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.triton, str(tree)]))
        proc = subprocess.run([sys.executable, __file__, "_inner"], input=json.dumps(BACKTEST), capture_output=True,
                              text=True, env=env, cwd=tmp)  # fmt: skip
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            return 1
    records = json.loads(proc.stdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt") as f:
        json.dump({"commit": COMMIT, "records": records}, f, indent=0)
    print(f"{len(records)} kernels (triton {records[0]['triton']}) -> {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
