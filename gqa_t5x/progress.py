"""A progress line with an ETA for long loops (conversion, evaluation and inference decoding):
`Progress("converting", 48, "arrays", stream, total_bytes=...)`, then `update(done, bytes)`.

A line is printed at most every `every` seconds, so work that finishes quickly prints nothing.
"""

from __future__ import annotations

import math
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f}"


class Progress:
    """'converting: 12/48 arrays, 180.2/368.0 MiB, 5.1 MiB/s, ETA 35s' on `stream`."""

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None,
                 total_bytes: int | None = None, every: float = 2.0):
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.total_bytes, self.every = total_bytes, every
        self.start = self.last = time.perf_counter()

    def line(self, done: int, done_bytes: int | None = None, now: float | None = None) -> str:
        """The progress line after `done` items (and `done_bytes`)."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        parts = [f"{self.label}: {done}/{self.total} {self.unit}"]
        if self.total_bytes and done_bytes is not None:
            rate = done_bytes / elapsed if elapsed > 0 else 0.0
            parts += [f"{_mib(done_bytes)}/{_mib(self.total_bytes)} MiB",
                      f"{_mib(rate)} MiB/s"]
            left = (self.total_bytes - done_bytes) / rate if rate > 0 else float("inf")
        else:
            left = elapsed * (self.total - done) / done if done else float("inf")
        return ", ".join(parts) + f", ETA {format_duration(left)}"

    def update(self, done: int, done_bytes: int | None = None) -> None:
        now = time.perf_counter()
        if self.stream is None or (now - self.last < self.every and done < self.total):
            return
        if done >= self.total and self.last == self.start:
            return  # finished before the first line was due: nothing to report
        self.last = now
        print(self.line(done, done_bytes, now), file=self.stream, flush=True)
