"""A minimal progress bar on stderr (no tqdm): redrawn in place on a terminal, one line per
tenth of the work otherwise (logs stay short)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``bar = Progress(total, "train"); bar.update(done, "loss=0.1"); bar.close()``."""

    def __init__(self, total: int, label: str = "", stream=None, enabled: bool = True, width: int = 24):
        self.total = max(int(total), 1)
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_tenth = -1
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._drawn = False

    def _line(self, done: int, message: str) -> str:
        fraction = min(done / self.total, 1.0)
        filled = int(round(fraction * self.width))
        elapsed = time.perf_counter() - self.start
        return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                f"{elapsed:6.1f}s {message}")

    def update(self, done: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._interactive:
            if now - self._last_draw >= 0.1 or done >= self.total:
                self.stream.write("\r\x1b[2K" + self._line(done, message))
                self.stream.flush()
                self._last_draw, self._drawn = now, True
        else:
            tenth = int(10 * min(done / self.total, 1.0))
            if tenth > self._last_tenth:
                self.stream.write(self._line(done, message) + "\n")
                self.stream.flush()
                self._last_tenth = tenth

    def close(self) -> None:
        if self.enabled and self._interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
