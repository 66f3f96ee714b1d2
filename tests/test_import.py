"""`import nf4` stays lean (no Triton, no CUDA, no subpackage) and still exposes `nf4.lora` / `nf4.kernels`."""

import os
import subprocess
import sys

import pytest

CHECK = """
import nf4, sys
assert 'triton' not in sys.modules and 'nf4.lora' not in sys.modules, sorted(sys.modules)
nf4.lora.LoRALinearNF4
assert 'triton' not in sys.modules
assert not {'transformers', 'peft', 'nf4.hf'} & set(sys.modules), 'nf4.hf is the optional extra'

import torch
assert not torch.cuda.is_initialized()
assert {'lora', 'kernels'} <= set(dir(nf4))
try:
    nf4.no_such_thing
except AttributeError as e:
    assert "no attribute 'no_such_thing'" in str(e)
else:
    raise AssertionError('nf4.no_such_thing did not raise')
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # not from the repository root, where the folder kernels/ would shadow Hugging Face's `kernels`
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_import_nf4_is_lean_and_exposes_the_subpackages_lazily():
    out = run_python(CHECK)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["kernels", "lora"])
def test_attribute_is_the_subpackage(name):
    import importlib

    import nf4

    assert getattr(nf4, name) is importlib.import_module(f"nf4.{name}")
