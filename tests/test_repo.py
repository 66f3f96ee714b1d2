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


def test_readme_example_runs_and_prints_what_the_readme_says():
    import os
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.splitlines()) <= 25  # about 20 lines
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU reference path
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, timeout=600, capture_output=True, text=True, cwd="/"
    ).stdout
    printed = re.search(r"It prints (.*?)\. The", readme, re.S).group(1)
    claims = re.findall(r"`([^`]+)`", printed)
    assert claims == out.splitlines(), (claims, out)
