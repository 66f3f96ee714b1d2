"""A dependency-free one-line progress bar on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`Progress(total, label)`, then `.step(what)` per item. Drawn only when stderr is a terminal,
    unless `enabled` forces it on or off."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, width: int = 30):
        self.total, self.label, self.width, self.done = max(total, 1), label, width, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what[-40:]:40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
