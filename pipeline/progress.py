"""The run's own progress line: rows done / total, rows/s, ETA, errors.

On a terminal it rewrites one line every `every_s` seconds; otherwise (logs, `ray job submit`) it
logs a line every `log_every_s` seconds. Replaces Ray Data's multi-line status block.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

log = logging.getLogger("pipeline.progress")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, total: int, stream: Optional[TextIO] = None, every_s: float = 2.0, log_every_s: float = 10.0):
        self.total, self.done, self.errors = total, 0, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if self.tty else log_every_s
        self.start = self.last = time.monotonic()
        self.first_durable_s: Optional[float] = None
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, rows durable)

    def add(self, rows: int, errors: int) -> None:
        if self.first_durable_s is None and rows:
            self.first_durable_s = time.monotonic() - self.start
        self.done += rows
        self.errors += errors
        self.timeline.append((time.monotonic() - self.start, self.done))
        if time.monotonic() - self.last >= self.every_s:
            self.show()

    def steady_rate(self, low: float = 0.1, high: float = 0.9) -> Optional[float]:
        """Rows/s between `low` and `high` of the rows being durable (start-up and tail excluded)."""
        if not self.total:
            return None
        points = [(t, n) for t, n in self.timeline if low * self.total <= n <= high * self.total]
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def rate_by_quarter(self) -> list:
        """Rows/s over each quarter of the rows (by rows durable): a throughput that holds steady through
        a long run gives four similar figures; one that sags shows it. None where a quarter has no span."""
        if not self.total:
            return []
        rates, start = [], (0.0, 0)
        for q in range(1, 5):
            inside = [(t, n) for t, n in self.timeline if n <= q * self.total / 4]
            if not inside:
                rates.append(None)
                continue
            end = inside[-1]
            rates.append((end[1] - start[1]) / (end[0] - start[0]) if end[0] > start[0] else None)
            start = end
        return rates

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (f"rows {self.done}/{self.total} ({share:.0f}%) | {rate:.1f} rows/s | "
                f"ETA {'?' if eta is None else _duration(eta)} | errors {self.errors} | elapsed {_duration(elapsed)}")

    def show(self, final: bool = False) -> None:
        self.last = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info("%s", self.line())
