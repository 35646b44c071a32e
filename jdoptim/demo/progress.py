"""A dependency-free progress bar for the terminal (a line redrawn in place)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, "label") as bar: bar.update()``: one line, redrawn in place.

    Drawn only when ``stream`` is a terminal (or ``force=True``), at most ten times a second, so
    that logs and captured output stay clean; the closing line is always written.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        width: int = 30,
        force: bool | None = None,
    ) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.count = 0
        self.interactive = self.stream.isatty() if force is None else force
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, status: str = "") -> None:
        self.count = min(self.count + n, self.total)
        now = time.perf_counter()
        if self.interactive and (now - self._last_draw > 0.1 or self.count == self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line(status))
            self.stream.flush()

    def close(self, status: str = "") -> None:
        if self.interactive:
            self.stream.write("\r" + self._line(status) + "\n")
        else:
            self.stream.write(self._line(status) + "\n")
        self.stream.flush()

    def _line(self, status: str) -> str:
        filled = round(self.width * self.count / self.total)
        bar = "█" * filled + "·" * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        tail = f" {status}" if status else ""
        return f"{self.label:<28} {bar} {self.count}/{self.total} {elapsed:5.1f}s{tail}"
