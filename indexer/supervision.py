"""Retry, health and metrics around the ports the pipeline uses.

The pipeline sees a store, a cache and a dead-letter sink; the service hands it these wrappers,
which retry what may pass (``retry``), say on ``/readyz`` which dependency fails (``Health``) and
count the retries (``Metrics``).  Wrapping rather than calling back keeps the pipeline a step
runner that knows nothing of the service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Histogram

from indexer import tracing
from indexer.changes import Change
from indexer.errors import Transient
from indexer.health import Health
from indexer.metrics import Metrics
from indexer.pipeline import ApplyResultLike, CachePort, D, DeadLetterPort, StorePort
from indexer.retry import retry_transient

T = TypeVar("T")
log = logging.getLogger(__name__)


class Supervisor:
    """Runs an operation on a dependency until it succeeds, reporting each failure."""

    def __init__(self, health: Health, metrics: Metrics, *, initial_s: float, max_s: float) -> None:
        self._health = health
        self.metrics = metrics
        self._initial_s = initial_s
        self._max_s = max_s

    async def call(
        self, dependency: str, operation: Callable[[], Awaitable[T]], *, timing: Histogram | None = None
    ) -> T:
        """``operation`` until it succeeds; ``timing`` observes the attempt that did."""

        async def attempt() -> T:
            started = time.perf_counter()
            result = await operation()
            if timing is not None:
                timing.observe(time.perf_counter() - started)
            return result

        return await retry_transient(
            attempt,
            what=dependency,
            initial_s=self._initial_s,
            max_s=self._max_s,
            on_failure=self._failed,
            on_success=self._health.ok,
        )

    def _failed(self, dependency: str, exc: BaseException) -> None:
        self._health.failing(dependency, str(exc))
        self.metrics.retries.labels(dependency).inc()


class SupervisedStore:
    def __init__(self, store: StorePort, supervisor: Supervisor) -> None:
        self._store = store
        self._supervisor = supervisor

    async def apply(self, changes: Sequence[Change]) -> ApplyResultLike:
        with tracing.span("apply", changes=len(changes)):
            return await self._supervisor.call(
                "postgres", lambda: self._store.apply(changes), timing=self._supervisor.metrics.apply_duration
            )

    async def settled(self, outbox_ids: Sequence[int]) -> None:
        # Not retried, and never holding up the ack: a row left behind costs one more
        # invalidation by the outbox sweep, not a missed one.
        try:
            await self._store.settled(outbox_ids)
        except Transient as exc:
            log.warning("invalidation outbox not cleared (the sweep will finish it): %s", exc)


class SupervisedCache:
    def __init__(self, cache: CachePort, supervisor: Supervisor) -> None:
        self._cache = cache
        self._supervisor = supervisor

    async def invalidate(self, orgs: Iterable[int]) -> int:
        unique = sorted(set(orgs))  # an iterable may be walked once only, and a retry walks it again
        timing = self._supervisor.metrics.invalidation_duration
        with tracing.span("invalidate", organizations=len(unique)):
            return await self._supervisor.call("redis", lambda: self._cache.invalidate(unique), timing=timing)

    async def invalidate_all(self) -> int:
        timing = self._supervisor.metrics.invalidation_duration
        with tracing.span("invalidate", organizations="all"):
            return await self._supervisor.call("redis", self._cache.invalidate_all, timing=timing)


class SupervisedDeadLetters(Generic[D]):
    def __init__(self, sink: DeadLetterPort[D], supervisor: Supervisor) -> None:
        self._sink = sink
        self._supervisor = supervisor

    async def dead_letter(self, delivery: D, reason: str) -> None:
        await self._supervisor.call("rabbitmq", lambda: self._sink.dead_letter(delivery, reason))
