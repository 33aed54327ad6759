"""Waiting for an observable condition: ``eventually`` for async checks, ``eventually_sync`` for
blocking ones.  Both poll ``check`` until it returns something truthy (and return it), and fail
with its last value after ``timeout_s``.  Nothing here imports ``indexer`` (the black-box suite
uses it too)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _not_met(what: str, timeout_s: float, value: object) -> AssertionError:
    return AssertionError(f"{what or 'condition'} not met within {timeout_s}s (last value: {value!r})")


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _not_met(what, timeout_s, value)
        await asyncio.sleep(interval_s)


def eventually_sync(
    check: Callable[[], T], *, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _not_met(what, timeout_s, value)
        time.sleep(interval_s)
