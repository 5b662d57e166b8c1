"""A dependency-free progress bar on stderr (only drawn on a terminal unless forced)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, unit: str = "", enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.unit, self.t0 = label, unit, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(
            f"\r{self.label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {self.unit} ({rate:,.0f} {self.unit}/s)"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
