"""Repository invariants: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(setup) == 2, setup  # exactly two: the main job and the tests
    tests = [line for line in setup if line.endswith("pytest")]
    assert len(tests) == 1 and tests[0] in ci.splitlines()
    assert any(line.endswith("nf4 demo") for line in setup)


def test_readme_example_runs():
    import os
    import re
    import subprocess
    import sys

    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU reference path
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)
