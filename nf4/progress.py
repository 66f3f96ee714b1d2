"""Dependency-free progress reporting on stderr: a one-line bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time


class Progress:
    """`Progress(total, label)`, then `.step(what)` per item: on a tty a bar redrawn in place, elsewhere a
    line every `interval` seconds (none for a loop shorter than that). `enabled` True forces the bar,
    False silences both."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, width: int = 30, interval: float = 5.0):
        self.total, self.label, self.width, self.interval, self.done = max(total, 1), label, width, interval, 0
        self.bar = sys.stderr.isatty() if enabled is None else enabled
        self.lines = enabled is None and not self.bar
        self.start = self.last_line = time.perf_counter()
        self.printed = False

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        elapsed = now - self.start
        if self.bar:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {what[-40:]:40}")
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.lines and (now - self.last_line >= self.interval or (self.done == self.total and self.printed)):
            left = elapsed / self.done * (self.total - self.done)
            eta = f", about {left:.0f} s left" if self.done < self.total else ", done"
            detail = f"; {what}" if what else ""
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} after {elapsed:.1f} s{eta}{detail}\n")
            self.last_line, self.printed = now, True
        else:
            return
        sys.stderr.flush()
