"""Docstring (and comment) words per line of code, per folder (issue 24's measure)."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path


def measure(path: Path) -> tuple[int, int, int]:
    """(lines of code, docstring words, comment words) of one file. Lines of code exclude blank lines,
    comment-only lines and docstring lines."""
    src = path.read_text()
    tree = ast.parse(src)
    doc_lines: set[int] = set()
    doc_words = 0
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        # a docstring: the first statement, and (attribute docstrings) a string after an assignment
        for i, stmt in enumerate(body):
            is_str = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            if is_str and isinstance(stmt.value.value, str):
                if i == 0 or isinstance(body[i - 1], (ast.Assign, ast.AnnAssign)):
                    doc_lines.update(range(stmt.lineno, stmt.end_lineno + 1))
                    doc_words += len(stmt.value.value.split())
    comment_words = 0
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comment_words += len(tok.string.lstrip("#").split())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                if line not in doc_lines:
                    code_lines.add(line)
    return len(code_lines), doc_words, comment_words


def main(folders: list[str]) -> None:
    for folder in folders:
        loc = doc = com = 0
        for path in sorted(Path(folder).rglob("*.py")):
            a, b, c = measure(path)
            loc, doc, com = loc + a, doc + b, com + c
        print(
            f"{folder:12s} code lines {loc:6d}  docstring words {doc:6d} ({doc / max(loc, 1):.2f}/line)"
            f"  + comments {com:6d} ({(doc + com) / max(loc, 1):.2f}/line)"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["nf4", "kernels", "lora"])
