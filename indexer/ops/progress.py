"""Progress of a long command: a self-rewriting line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TextIO

log = logging.getLogger(__name__)

_TERMINAL_INTERVAL_S = 0.2  # redraws per second a person can follow
_LOG_INTERVAL_S = 10.0  # a log line every so often, not one per chunk


class Progress:
    """Counts rows against an optional total; shows rows, rate and ETA."""

    def __init__(
        self,
        what: str,
        total: int | None,
        stream: TextIO,
        *,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self.total = total
        self._stream = stream
        self._terminal = stream.isatty() if terminal is None else terminal
        self._clock = clock
        self._started_s = clock()
        self._shown_s = self._started_s
        self.done = 0
        self._drawn = False

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started_s

    @property
    def rate_per_s(self) -> float:
        elapsed_s = self.elapsed_s
        return self.done / elapsed_s if elapsed_s > 0 else 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        now_s = self._clock()
        if now_s - self._shown_s < (_TERMINAL_INTERVAL_S if self._terminal else _LOG_INTERVAL_S):
            return
        self._shown_s = now_s
        if self._terminal:
            # Pad over the previous line's tail; \r keeps the cursor on the one line.
            self._stream.write(f"\r{self.line():<78}")
            self._stream.flush()
            self._drawn = True
        else:
            log.info("%s", self.line())

    def close(self) -> None:
        """End the terminal line, so what follows starts on a fresh one."""
        if self._drawn:
            self._stream.write("\r" + " " * 78 + "\r")
            self._stream.flush()
            self._drawn = False

    def line(self) -> str:
        rate = self.rate_per_s
        text = f"{self._what}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,} rows ({min(100.0, 100 * self.done / self.total):.1f}%)"
        else:
            text += " rows"
        text += f", {rate:,.0f} rows/s"
        if self.total and rate > 0:
            remaining_s = max(0, self.total - self.done) / rate
            text += f", ETA {timedelta(seconds=round(remaining_s))}"
        return text
