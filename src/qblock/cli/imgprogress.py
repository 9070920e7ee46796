"""qemu-img's progress line (QEMU util/qemu-progress.c, the "simple" printer).

``-p`` prints ``    (xx.xx/100%)`` followed by a carriage return each time the work advanced by
more than ``min_skip`` percent, and a newline at the end.  Only a terminal gets it: the
commands turn it off when stdout is not a tty, like the ``-p`` users of qemu-img expect of a
pipe or a log file.
"""
from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """qemu_progress_init / qemu_progress_print / qemu_progress_end."""

    def __init__(self, enabled: bool, min_skip: float = 1.0, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last_print = 0.0
        self._out = out if out is not None else sys.stdout

    @staticmethod
    def wanted(requested: bool, quiet: bool = False, out: TextIO | None = None) -> bool:
        """``-p`` given, not ``-q``, and stdout a terminal."""
        stream = out if out is not None else sys.stdout
        return requested and not quiet and stream.isatty()

    def start(self) -> None:
        """Print the 0% line (qemu-img prints it as soon as the work is sized)."""
        self.set(0.0)

    def set(self, current: float) -> None:
        """qemu_progress_print(current, 0): the absolute percentage."""
        self.current = current
        if current - self.last_print > self.min_skip or current in (0.0, 100.0):
            self.last_print = current
            self._print()

    def step(self, delta: float, share: float) -> None:
        """qemu_progress_print(delta, share): ``delta`` percent of a ``share`` percent slice."""
        self.set(self.current + delta / 100 * share)

    def fraction(self, done: int, total: int) -> None:
        """Set the progress to ``done / total`` of the work."""
        if total:
            self.set(100.0 * done / total)

    def end(self) -> None:
        """qemu-img's closing qemu_progress_print(100, 0), then progress_simple_end()'s newline."""
        if self.enabled:
            self.set(100.0)
            self._out.write("\n")
            self._out.flush()

    def _print(self) -> None:
        if self.enabled:
            self._out.write("    (%3.2f/100%%)\r" % self.current)
            self._out.flush()
