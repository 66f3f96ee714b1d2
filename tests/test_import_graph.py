"""The import graph: arrows run one way (`nf4.lora` -> `nf4.kernels` -> the format), with no cycles, and
the repository root does not shadow Hugging Face's `kernels` package."""

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "nf4": ROOT / "nf4",
    "nf4.hf": ROOT / "nf4" / "hf",
    "nf4.kernels": ROOT / "kernels",
    "nf4.lora": ROOT / "lora",
}
LEAVES = {"nf4.format", "nf4.codebook", "nf4.env"}
"""Modules that import no other part of the package."""
KERNELS_MAY_IMPORT = LEAVES | {"nf4.reference"}
"""What `nf4.kernels` may import from outside itself (the reference is the epilogue's definition)."""


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (function-level imports too)."""
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from nf4 import reference` imports the module nf4.reference; `from nf4.x import f`, nf4.x
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                targets |= subs or {node.module}
            elif (dynamic := _dynamic_import(node)) is not None:
                targets |= set(DYNAMIC_IMPORTS.get(name, {}).get(dynamic, {dynamic}))
        edges[name] = {t for t in targets if t in mods and t != name}
    return edges


DYNAMIC_IMPORTS = {
    "nf4": {"nf4.{}": {"nf4.kernels", "nf4.lora"}},  # the facade's lazy `nf4.lora` / `nf4.kernels`
    "nf4.demo": {"{}": set()},  # the demo's corpus: standard-library modules' docstrings
}
"""Module -> the dynamic imports it may make (the argument's text, "{}" for a computed part) -> what
they import. Any other `importlib.import_module(...)` or `__import__(...)` counts as an import of its
literal argument, or fails the graph when the argument is computed."""


def _dynamic_import(node: ast.AST) -> str | None:
    """The target of `importlib.import_module(X)` / `__import__(X)`: X's text with "{}" for computed parts."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in ("import_module", "__import__"):
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
    return "{}"


def test_dynamic_imports_are_seen(tmp_path):
    """`importlib.import_module("nf4.hf.peft")` and `__import__("nf4.hf")` are edges like import
    statements; a computed module name is an edge to "{}", which no rule below allows."""
    tree = ast.parse(
        'import importlib\nimportlib.import_module("nf4.hf.peft")\n__import__("nf4.hf")\n'
        'importlib.import_module(f"nf4.{name}")\n'
    )
    found = [t for n in ast.walk(tree) if (t := _dynamic_import(n)) is not None]
    assert found == ["nf4.hf.peft", "nf4.hf", "nf4.{}"]


LAYERS = (
    {"nf4.env", "nf4.format", "nf4.codebook", "nf4.reference", "nf4.tensor", "nf4.cpu", "nf4.dispatch", "nf4.api",
     "nf4.progress"},
    {"nf4.kernels"},
    {"nf4.lora"},
    {"nf4.hf"},
    {"nf4", "nf4.checkpoint", "nf4.cli", "nf4.demo", "nf4.__main__"},
)  # fmt: skip
"""The layers, bottom up: a module imports its own layer and the ones below, never one above. The
format layer's dispatch point imports the kernels (`test_only_the_dispatch_point_imports_the_kernels`)."""


def _layer(name: str) -> int:
    for i, members in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "nf4"):
            return i
    raise AssertionError(f"{name} is in no layer of LAYERS: place it")


def test_no_module_imports_a_layer_above_its_own():
    edges = graph()
    for name, targets in edges.items():
        above = {t for t in targets if _layer(t) > _layer(name)}
        if name == "nf4.dispatch":
            above -= {t for t in above if t.startswith("nf4.kernels")}
        assert not above, f"{name} imports {above}, a layer above its own"
    for name, path in modules().items():  # a computed name is allowed only where listed
        for node in ast.walk(ast.parse(path.read_text())):
            target = _dynamic_import(node)
            if target is not None and "{}" in target:
                assert target in DYNAMIC_IMPORTS.get(name, {}), f"{name}: dynamic import of {target!r}"


def test_the_package_does_not_ship_or_import_the_development_tools():
    """The ahead-of-time compiler and the static speed model live in benchmarks/static (they need cuobjdump
    and a compiler run, not the wheel): no module of the package imports them, by either name."""
    tools = {p.stem for p in (ROOT / "benchmarks" / "static").glob("*.py")}
    assert {"aot", "sass", "model"} <= tools
    for name, path in modules().items():
        assert path.stem not in tools, f"{name} shadows benchmarks/static/{path.stem}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                continue
            bad = {m for m in imported if m.split(".")[-1] in tools or m.split(".")[0] in tools}
            assert not bad, f"{name} imports {bad}"


def test_leaf_modules_import_nothing_from_the_package():
    edges = graph()
    assert {name: edges[name] for name in LEAVES} == {name: set() for name in LEAVES}


def test_kernels_import_only_the_format_layer():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("nf4.kernels"):
            outside = {t for t in targets if not t.startswith("nf4.kernels")}
            assert outside <= KERNELS_MAY_IMPORT, (name, outside)


def test_only_the_dispatch_point_imports_the_kernels_from_nf4():
    edges = graph()
    importers = {name for name, targets in edges.items() if any(t.startswith("nf4.kernels") for t in targets)}
    importers = {name for name in importers if not name.startswith(("nf4.kernels", "nf4.lora"))}
    assert importers <= {"nf4.dispatch", "nf4"}, importers  # the package facade exposes it lazily


def test_no_import_cycles():
    edges = graph()
    edges = {name: targets - {"nf4"} for name, targets in edges.items() if name != "nf4"}  # the facade
    state: dict[str, int] = {}

    def visit(name, stack):
        state[name] = 1
        for t in sorted(edges.get(name, ())):
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*stack, name, t])
            if t not in state:
                visit(t, [*stack, name])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def _run_in_root(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


HIDE_REAL_KERNELS = """
import importlib.machinery, os, sys
# Drop every sys.path entry but the root that holds a top-level `kernels` (Hugging Face's package, a
# dependency of transformers), so this process sees the machine where it is not installed.
root = os.path.abspath(os.curdir)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) == root
               or importlib.machinery.PathFinder.find_spec("kernels", [p]) is None]
"""


def test_repository_root_steps_aside_for_the_real_kernels_package(tmp_path):
    """Started in the repository root, `import kernels` finds `kernels/`: it must load Hugging Face's
    package where one is installed, and be an empty module (not ours, not an error) where none is.
    Both cases run whether or not Hugging Face's `kernels` is installed here (transformers requires it)."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("get_kernel = 'the real one'\n")
    proc = _run_in_root("import kernels, nf4.kernels; print(kernels.get_kernel, nf4.kernels.__name__)", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.split() == ["the", "real", "one", "nf4.kernels"], proc.stderr
    probe = "import kernels; print(hasattr(kernels, 'dequantize_nf4'), hasattr(kernels, 'get_kernel'))"
    proc = _run_in_root(HIDE_REAL_KERNELS + probe)
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "False"], proc.stderr


def _installed_kernels_package():
    """The spec of a top-level `kernels` outside the repository root (Hugging Face's), or None."""
    path = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
    return importlib.machinery.PathFinder.find_spec("kernels", path)


@pytest.mark.skipif(_installed_kernels_package() is None, reason="Hugging Face's kernels package is not installed")
def test_repository_root_loads_the_installed_kernels_package():
    """Where Hugging Face's `kernels` is installed, `import kernels` from the root is that package."""
    probe = "import os, kernels; print(os.path.dirname(kernels.__file__), hasattr(kernels, 'dequantize_nf4'))"
    proc = _run_in_root(probe)
    assert proc.returncode == 0, proc.stderr
    where, ours = proc.stdout.split()
    assert Path(where).resolve() == Path(_installed_kernels_package().origin).parent.resolve() and ours == "False"


@pytest.mark.slow
def test_peft_imports_from_the_repository_root():
    proc = _run_in_root("import peft, nf4.lora; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
