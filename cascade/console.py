"""Terminal output for the `cascade` commands: progress bars, tables, sizes.

A progress bar redraws one line in place on a terminal; when output goes to a
file or a CI log it prints a few milestone lines instead of hundreds of
carriage returns.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO


def bar(done: int, total: int, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = round(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


class Progress:
    """A labelled progress bar on `stream` (stderr by default, so stdout stays parseable)."""

    MILESTONES = (25, 50, 75)

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._printed_pct = -1

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        pct = 100 if self.total <= 0 else int(100 * done / self.total)
        if self.tty:
            self.stream.write(f"\r{self.label} {bar(done, self.total)} {done}/{self.total}")
            self.stream.flush()
            return
        # Off a terminal, only milestones: a log full of partial lines helps nobody.
        for m in self.MILESTONES:
            if self._printed_pct < m <= pct < 100:
                self.stream.write(f"{self.label} {pct}% ({done}/{self.total})\n")
                self._printed_pct = pct
                break

    def done(self, message: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.label} {message}\n")
        self.stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
