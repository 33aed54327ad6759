"""The one retry policy for transient failures: exponential backoff with full jitter, forever.

Forever, because the alternative (give up and ack, or give up and crash-loop) loses or delays
more than waiting does; the process stays not-ready meanwhile and SIGTERM still stops it, since
tenacity never retries ``CancelledError`` (it is a ``BaseException``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never, wait_random_exponential

from indexer.errors import Transient

log = logging.getLogger(__name__)
T = TypeVar("T")


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    initial_s: float,
    max_s: float,
    on_failure: Callable[[str, BaseException], None] | None = None,
    on_success: Callable[[str], None] | None = None,
) -> T:
    """Run ``operation`` until it succeeds or raises something that is not ``Transient``."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            log.warning("%s failed (attempt %d), retrying: %s", what, state.attempt_number, exc)
            if on_failure is not None:
                on_failure(what, exc)

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(Transient),
        wait=wait_random_exponential(multiplier=initial_s, max=max_s),
        stop=stop_never,
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            result = await operation()
    if on_success is not None:
        on_success(what)
    return result
