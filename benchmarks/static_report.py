"""The static kernel report: every kernel configuration the package can launch, compiled ahead of time
for sm_80 (Ampere) and sm_90 (Hopper) without a GPU, with registers, spills, stack, shared memory and
the matrix instructions used (mma.sync / wgmma). The test suite asserts no spills (tests/test_compile.py).

    python benchmarks/static_report.py [--arch 80 90] [--match NAME] [--out FILE]
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
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    from nf4.kernels.aot import compile_all, format_table

    reports = compile_all(tuple(args.arch), match=args.match)
    bad = [r for r in reports if not r.ok]
    text = (
        format_table(reports)
        + f"\n\n{len(reports)} compiled, {len(bad)} with spills, stack or over-limit shared memory"
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
