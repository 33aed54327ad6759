"""The backfill's progress display: a rewritten line on a terminal, log lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest

from indexer.ops.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_terminal_line_shows_rows_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("backfill", 1000, out, terminal=True, clock=clock)
    clock.now_s += 2
    progress.advance(250)
    assert out.getvalue().startswith("\rbackfill: 250/1,000 rows (25.0%), 125 rows/s, ETA 0:00:06")
    progress.close()
    assert out.getvalue().endswith("\r")


def test_terminal_redraws_are_throttled() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("backfill", None, out, terminal=True, clock=clock)
    clock.now_s += 1
    progress.advance(1)
    progress.advance(1)  # same instant: not drawn again
    assert out.getvalue().count("\r") == 1 and "2 rows" not in out.getvalue()


def test_without_a_terminal_it_logs_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("backfill", 10, out, terminal=False, clock=clock)
    with caplog.at_level(logging.INFO, logger="indexer.ops.progress"):
        progress.advance(1)  # too soon for a log line
        clock.now_s += 30
        progress.advance(4)
        progress.close()
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["backfill: 5/10 rows (50.0%), 0 rows/s, ETA 0:00:30"]
