"""Generated mutation testing of one module against the test files that guard it (mutmut's operators).

    .venv/bin/python benchmarks/mutate.py nf4/checkpoint.py tests/test_checkpoint.py tests/test_cli.py
    .venv/bin/python benchmarks/mutate.py lora/convert.py tests/test_convert.py --list   # the mutants only
    .venv/bin/python benchmarks/mutate.py --all        # the modules and test files of `SUITES`, one by one

Mutants (one per site, each a one-token change of the source, as mutmut makes them): comparison
operators (== !=, < <=, > >=, is / is not, in / not in), `and` / `or`, `not x` -> `x`, arithmetic and
bitwise operators (+ -, * /, // /, % /, ...), augmented assignments, numbers (n -> n + 1), True / False,
short identifier-like strings ("weight" -> "XXweightXX"; messages with spaces and f-strings are left
alone), `return x` -> `return None`, `x = value` -> `x = None`, a call statement -> `pass`, `break` /
`continue`. Docstrings, annotations, decorators, `__all__` and lines marked `# pragma: no mutate` are
not mutated.

Why not mutmut itself: mutmut 3 mutates a `mutants/` copy whose module names come from file paths
(`lora/convert.py` -> `lora.convert`), while this package maps `lora/` to `nf4.lora` (pyproject's
package-dir): the tests import `nf4.lora.convert`, which the copy does not provide. This script uses
`benchmarks/mutants.py`' copy of the checkout in the installed layout instead, and forks each test run
from a process that has imported torch, transformers and peft once (a mutant costs its tests' time,
not the ~10 s of imports). A mutant is killed when a guarding test fails or the run exceeds 3 x the
unmutated run + 30 s. Output: a line per mutant and a summary; `--json FILE` writes every result.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import ROOT, _copy, _targets  # noqa: E402

SUITES = {
    "nf4/hf/quantizer.py": ["tests/test_quantizer.py"],
    "nf4/hf/peft.py": ["tests/test_peft_layer.py"],
    "lora/distributed.py": ["tests/test_fsdp_helpers.py"],
    "lora/convert.py": ["tests/test_convert.py"],
    "nf4/checkpoint.py": ["tests/test_checkpoint.py"],
    "lora/bank.py": ["tests/test_adapters.py"],
    "lora/dora.py": ["tests/test_dora.py"],
    "kernels/dora.py": ["tests/test_dora.py"],
}
"""Module -> the test files that guard it (the narrowest selection; `--all` runs these)."""
FIRST = {
    "lora/distributed.py": ["-m", "not slow"],
    "lora/bank.py": ["-k", "not kernels"],
    "kernels/dora.py": ["-k", "fused"],
}
"""Module -> pytest arguments of a quicker first run: a mutant it kills costs no more (the gloo ranks
of test_fsdp_helpers.py take ~50 s to start); one it leaves is run against the whole selection."""

COMPARE = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
           ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}  # fmt: skip
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.Div, ast.Pow: ast.Mult, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr,
          ast.LShift: ast.RShift, ast.RShift: ast.LShift}  # fmt: skip


@dataclass
class Mutant:
    line: int
    start: tuple[int, int]  # (line, col) of the replaced source, 1-based line
    end: tuple[int, int]
    old: str
    new: str
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes never mutated: docstrings, annotations, decorators, `__all__`, imports."""
    skip: set[int] = set()

    def whole(node):
        skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                whole(body[0])
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            whole(node)  # attribute docstrings
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                whole(d)
            if node.returns:
                whole(node.returns)
            for a in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg,
                      node.args.kwarg):  # fmt: skip
                if a is not None and a.annotation is not None:
                    whole(a.annotation)
        if isinstance(node, ast.ClassDef):
            for d in node.decorator_list:
                whole(d)
        if isinstance(node, ast.AnnAssign):
            whole(node.annotation)
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.JoinedStr)):
            whole(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            whole(node)
    return skip


def generate(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _skipped_nodes(tree)
    found: list[Mutant] = []

    def add(node, new: str, old_node=None):
        old_node = old_node or node
        line = old_node.lineno
        if "pragma: no mutate" in lines[line - 1]:
            return
        old = ast.get_source_segment(source, old_node)
        if old is None or old == new:
            return
        found.append(Mutant(line, (old_node.lineno, old_node.col_offset),
                            (old_node.end_lineno, old_node.end_col_offset), old, new))  # fmt: skip

    def swapped(node, **changes):
        copy = ast.parse(ast.unparse(node), mode="eval").body if isinstance(node, ast.expr) else None
        for k, v in changes.items():
            setattr(copy, k, v)
        return ast.unparse(copy)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE:
                    ops = list(node.ops)
                    ops[i] = COMPARE[type(op)]()
                    add(node, swapped(node, ops=ops))
        elif isinstance(node, ast.BoolOp):
            add(node, swapped(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And()))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, ast.unparse(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            add(node, swapped(node, op=BINARY[type(node.op)]()))
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINARY:
            copy = ast.parse(ast.unparse(node)).body[0]
            copy.op = BINARY[type(node.op)]()
            add(node, ast.unparse(copy))
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                add(node, repr(not v))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                add(node, repr(v + 1))
            elif isinstance(v, str) and v and " " not in v and len(v) <= 40:
                add(node, repr("XX" + v + "XX"))
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                add(node, "return None")
        elif isinstance(node, ast.Assign) and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            add(node.value, "None")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(node, "pass")
        elif isinstance(node, ast.Break):
            add(node, "continue")
        elif isinstance(node, ast.Continue):
            add(node, "break")
    found.sort(key=lambda m: (m.start, m.end, m.new))
    return found


def apply(source: str, m: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    a = offsets[m.start[0] - 1] + m.start[1]
    b = offsets[m.end[0] - 1] + m.end[1]
    return (data[:a] + m.new.encode() + data[b:]).decode()


def _preload() -> None:
    """What the guarding tests import, once, in the process every test run is forked from (nf4 excluded:
    each run imports the mutated copy)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py sets it without a GPU
    import bitsandbytes  # noqa: F401
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers  # noqa: F401
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
    from transformers.core_model_loading import ConversionOps  # noqa: F401
    from transformers.quantizers import HfQuantizer  # noqa: F401

    assert "nf4" not in sys.modules


def _run_tests(tests: list[str], timeout: float, log: Path) -> tuple[str, float]:
    """Fork, run pytest on `tests` in the child; ('passed' | 'failed' | 'timeout', seconds)."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--tb=line", *tests])
        except BaseException:  # noqa: BLE001 - any crash of the child is a failed run
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("passed" if code == 0 else "failed"), time.monotonic() - start
        if time.monotonic() - start > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.05)


def _first_failure(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return ""


def earlier_survivors(path: str, source: Path) -> set[tuple[int, str, str]] | None:
    """(line, old, new) of the mutants of `path` that survived in an earlier run's JSON (`--json`)."""
    if source is None:
        return None
    found = json.loads(source.read_text()).get(path, [])
    return {(m["line"], m["old"], m["new"]) for m in found if m["outcome"] == "SURVIVED"}


def mutate_module(path: str, tests: list[str], dest: Path, out=print, only=None, save=None) -> list[Mutant]:
    targets = _targets(dest, path)
    original = targets[0].read_text()
    mutants = generate(original)
    if only is not None:
        mutants = [m for m in mutants if (m.line, m.old, m.new) in only]
    log = dest / "pytest.log"
    status, base = _run_tests(tests, 3600, log)
    if status != "passed":
        raise SystemExit(f"{path}: {tests} do not pass unmutated:\n{log.read_text()[-3000:]}")
    out(f"{path}: {len(mutants)} mutants; {' '.join(tests)} pass unmutated in {base:.1f} s")
    for m in mutants:
        mutated = apply(original, m)
        try:
            compile(mutated, path, "exec")
        except SyntaxError as e:
            m.outcome, m.detail = "invalid", str(e)
            continue
        for t in targets:
            t.write_text(mutated)
        try:
            status = "passed"
            if path in FIRST:
                status, m.seconds = _run_tests([*tests, *FIRST[path]], 3 * base + 30, log)
            if status == "passed":
                status, m.seconds = _run_tests(tests, 3 * base + 30, log)
        finally:
            for t in targets:
                t.write_text(original)
        m.outcome = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed"}[status]
        m.detail = _first_failure(log) if status == "failed" else ("timeout" if status == "timeout" else "")
        if m.outcome == "SURVIVED":
            out(f"  {path}:{m.line}: SURVIVED  {m.old!r} -> {m.new!r}")
        if save is not None:  # the results so far: an interrupted run keeps them
            save(mutants)
    return mutants


def summary(path: str, mutants: list[Mutant], seconds: float) -> str:
    valid = [m for m in mutants if m.outcome != "invalid"]
    killed = sum(m.outcome == "killed" for m in valid)
    return f"{path}: {killed}/{len(valid)} killed ({100 * killed / max(1, len(valid)):.0f} %) in {seconds:.0f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="the file to mutate, e.g. lora/convert.py")
    parser.add_argument("tests", nargs="*", help="the test files that guard it (default: SUITES)")
    parser.add_argument("--all", action="store_true", help="every module of SUITES with its test files")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, help="write every mutant's result to this file")
    parser.add_argument("--survivors-of", type=Path, metavar="JSON",
                        help="run only the mutants that survived in this earlier --json output")  # fmt: skip
    args = parser.parse_args(argv)
    if args.json:
        args.json = args.json.resolve()  # the runs chdir into the copy
    if args.survivors_of:
        args.survivors_of = args.survivors_of.resolve()
    if args.all:
        jobs = list(SUITES.items())
    elif args.module:
        jobs = [(args.module, args.tests or SUITES[args.module])]
    else:
        parser.error("name a module, or --all")
    if args.list:
        for path, _ in jobs:
            for m in generate((ROOT / path).read_text()):
                print(f"{path}:{m.line}: {m.old!r} -> {m.new!r}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: remove the copy
    _preload()
    results, lines = {}, []
    with tempfile.TemporaryDirectory(prefix="nf4-mutate-") as tmp:
        dest = Path(tmp)
        _copy(ROOT, dest)
        sys.path.insert(0, str(dest / "site"))
        os.chdir(dest / "repo")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(dest / "site"), os.environ.get("PYTHONPATH", "")])
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant and its restore can share size and mtime
        sys.dont_write_bytecode = True
        os.environ["HYPOTHESIS_PROFILE"] = "mutation"
        for path, tests in jobs:
            start = time.monotonic()

            def save(mutants, path=path):
                if args.json:
                    results[path] = [asdict(m) for m in mutants]
                    args.json.write_text(json.dumps(results, indent=1) + "\n")

            only = earlier_survivors(path, args.survivors_of)
            mutants = mutate_module(path, tests, dest, only=only, save=save)
            results[path] = [asdict(m) for m in mutants]
            lines.append(summary(path, mutants, time.monotonic() - start))
            print(lines[-1], flush=True)
            if args.json:  # after each module: a long run interrupted keeps what it finished
                args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
