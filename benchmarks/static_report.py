"""The static kernel report: every kernel configuration the package can launch, compiled ahead of time
for sm_80 (Ampere) and sm_90 (Hopper) without a GPU, with registers, spills, stack, shared memory and
the matrix instructions used (mma.sync / wgmma). The test suite asserts no spills (tests/test_compile.py).

    python benchmarks/static_report.py [--arch 80 90] [--variant aligned ones plain] [--match NAME] [--out FILE]
                                       [--sass FILE] [--prediction FILE]

--sass writes the SASS cost report of every kernel (`benchmarks/static/sass.py`, `kernel_report`: instructions and
L1 wavefronts against the H200's budgets); --prediction the decode prediction beside that of the decode kernel
of 2d550bfb5869, built from git (`python benchmarks/static/sass.py --compare`).

Variants (`benchmarks/static/aot.py`, `VARIANTS`): as the runtime specialises the arguments: all divisible by 16,
integers equal to 1, or nothing known.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--match", default="")
    parser.add_argument("--variant", nargs="+", default=["aligned", "ones", "plain"])
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--sass", type=Path, help="write the kernels' SASS cost report here")
    parser.add_argument("--prediction", type=Path, help="write the decode prediction here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "static"))
    from aot import compile_all, format_table

    reports = compile_all(tuple(args.arch), match=args.match, variants=tuple(args.variant))
    bad = [r for r in reports if not r.ok]
    text = (
        format_table(reports)
        + f"\n\n{len(reports)} compiled (triton {reports[0].triton if reports else '?'}), {len(bad)} not ok: "
        + "spills, stack, shared memory over the limit, 32-bit offsets into tensors, or no wgmma"
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.sass or args.prediction:
        import contextlib
        import io

        import sass
        import triton

        stamp = f"(triton {triton.__version__}; {sass.__name__})"
        if args.sass:
            args.sass.write_text(sass.kernel_report() + f"\n{stamp}\n")
        if args.prediction:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                sass.main(["--compare"])
            args.prediction.write_text(buffer.getvalue() + f"{stamp}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
