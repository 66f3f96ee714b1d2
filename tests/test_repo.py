"""Repository invariants: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(setup) == 2, setup  # exactly two: the main job and the tests
    tests = [line for line in setup if ".venv/bin/pytest" in line.split("&&")[-1]]
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


def test_readme_fine_tuning_section_runs(tmp_path):
    """The "Fine-tune a causal LM" code, on a tiny random Llama with a word-level tokenizer saved in a
    temporary directory (no download), two steps."""
    import os
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Fine-tune a causal LM") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = code.splitlines()
    start = next(i for i, line in enumerate(lines) if "from_pretrained(" in line and "quantization_config" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("Trainer("))
    assert end - start + 1 <= 12 and len(lines) <= 18  # about 12 lines from from_pretrained to the Trainer
    setup = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from hf_helpers import save_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
path = save_tiny({str(tmp_path / "model")!r})
vocab = {{w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", "QLoRA", "a", "model", "."])}}
backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
special = dict(unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(path)
"""
    code = code.replace('"meta-llama/Llama-3.2-1B"', "str(path)").replace("max_steps=100", "max_steps=2, use_cpu=True")
    code = code.replace('"qlora-out', f'"{tmp_path}/out')
    saved = tmp_path / "out" / "adapter" / "adapter_model.safetensors"
    check = f"\nimport pathlib\nassert pathlib.Path({str(saved)!r}).is_file()\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU torch path
    proc = subprocess.run([sys.executable, "-c", setup + code + check], env=env, timeout=600, capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_says_what_is_bit_for_bit_and_what_is_not():
    """The headline does not claim bit-for-bit compatibility without the double-quantization exception
    (tests/test_reference.py::test_nested_codes_against_bitsandbytes_and_exact_nearest measures it)."""
    import re

    readme = " ".join((ROOT / "README.md").read_text().split())
    intro = readme[: readme.index("## Example")]
    unqualified = re.findall(r"bit[- ]for[- ]bit compatible", intro)
    assert not unqualified, unqualified
    section = intro[intro.index("What is bit for bit with bitsandbytes") :]
    exact, inexact = section.split("- Not bit for bit", 1)
    assert "packed 4-bit codes" in exact and "absmax without double quantization" in exact
    assert "with double quantization (the default)" in inexact and "8-bit absmax codes" in inexact
    assert "nested offset" in inexact
