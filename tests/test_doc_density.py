"""benchmarks/doc_density.py, issue 24's measure: lines of code exclude docstrings, comments and blanks."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("doc_density", ROOT / "benchmarks" / "doc_density.py")
doc_density = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_density)

SOURCE = '''"""Module docstring,
five words here."""

X = 1
"""Attribute docstring: four words."""


# a comment of six words here
def f(a):
    """One."""
    s = """not a docstring: code"""
    return a + len(s)  # two words
'''


def test_counts_docstring_words_comment_words_and_code_lines(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(SOURCE)
    # code: `X = 1`, `def f(a):`, `s = ...`, `return ...`; docstrings 5 + 4 + 1 words; comments 6 + 2
    assert doc_density.measure(path) == (4, 10, 8)
