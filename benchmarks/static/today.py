"""The per-pipe model (`model.py`) applied to this checkout's dequantize and quantize kernels (sm_90).

    python benchmarks/static/today.py

Compiled with the installed triton as the runtime specialises an aligned launch (`aot.specialize`,
"aligned"), at 8192 x 8192, bf16, blocksize 64. The decode call (nf4_gemv) is not covered yet: its kernel
runs two kinds of program (W slices and x @ A^T) in one launch, which the straight-line walk cannot split.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aot  # noqa: E402
import model  # noqa: E402
import sass  # noqa: E402


def launch(name: str, n: int, bytes_moved: float) -> model.Launch:
    cfg = next(c for c in aot.all_configs() if c.name == name)
    cubin = sass.compile_cubin(cfg, 90, "aligned")
    names = sass.param_names(cfg)
    text = sass._cuobjdump(cubin, "-sass")
    usage = sass._cuobjdump(cubin, "--dump-resource-usage")
    import re

    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    per_program = cfg.constexprs["BLOCKS"] * 64
    values = {"n_elements": n, "n_bytes": n // 2}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = aot.specialize(cfg, "aligned")
    kernel = triton.compile(ASTSource(fn=cfg.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=cfg.options)  # fmt: skip
    return model.Launch(name, text, sass.param_offsets(cubin, names), values, grid=-(-n // per_program),
                        num_warps=cfg.options.get("num_warps", 4), registers=regs,
                        shared_bytes=int(kernel.metadata.shared), dram_bytes=bytes_moved)  # fmt: skip


def rows():
    n = 8192 * 8192
    out = []
    for dq in (0, 1):
        moved = n / 2 + 2 * n + n / 64 * (1 if dq else 4)
        terms = model.analyze(launch(f"dequantize_nf4[bs=64,bf16,dq={dq}]", n, moved))
        out.append((f"dequantize bf16 dq={dq} 8192²", terms, None))
    moved = 2 * n + n / 2 + 4 * n / 64
    out.append(("quantize bf16 8192²", model.analyze(launch("quantize_nf4[bs=64,bf16]", n, moved)), None))
    return out


if __name__ == "__main__":
    import triton

    table = rows()
    print(f"# per-pipe model, sm_90, triton {triton.__version__}, H200 constants (model.py)")
    print(model.format_rows(table))
    for label, t, _ in table:
        print(f"{label}: {t.bound[0]}, {t.dram_us / t.predicted_us:.0%} of copy bandwidth")
