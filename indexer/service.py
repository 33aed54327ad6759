"""``mention-indexer run``: supervise the broker session and drive batches through the pipeline.

Per batch, strictly: dead letters confirmed → commit → invalidate → ack (SPEC §7, §9).  A lost
broker connection abandons the batch in hand (its deliveries come back) and opens a new session;
Postgres or Redis trouble is retried with backoff while the batch waits unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import migrate as migrations
from .broker import Session
from .cache import CacheInvalidator
from .config import Settings
from .errors import Transient
from .health import PROBE, Health
from .http import HttpServer
from .metrics import Metrics
from .pipeline import BatchOutcome, Pipeline
from .retry import retry_transient
from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_INTERVAL_S = 5.0
# After the batch budget, closing the connections gets this long; a service that does not answer
# (no close-ok) is left behind: the broker requeues what we held when it notices we are gone.
CLOSE_TIMEOUT_S = 0.5


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = Health()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._session: Session | None = None
        self.http_port: int | None = None
        self._busy = False  # a batch is between its first delivery and its ack

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: no new batches; finishing the one in hand")
        self._stop.set()
        self.health.stopping = True

    async def run(self) -> None:
        """Until ``request_stop``.  The batch in hand gets ``shutdown_timeout_s`` from the stop
        request to finish, closing the connections at most ``CLOSE_TIMEOUT_S`` more: a service
        that stopped answering cannot stretch the shutdown step by step (SPEC §9: exit in 10 s)."""
        loop = asyncio.get_running_loop()
        http = self._start_http()
        work = asyncio.create_task(self._work(), name="indexer-work")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            deadline = loop.time() + self.settings.shutdown_timeout_s
            if not work.done() and self._busy:
                if self._session is not None:
                    await _within(self._session.stop_consuming(), deadline - loop.time())
                await asyncio.wait({work}, timeout=max(0.0, deadline - loop.time()))
                if not work.done():
                    log.warning("batch not finished after %.1f s; abandoning it (it will be redelivered)",
                                self.settings.shutdown_timeout_s)
        finally:
            stop.cancel()
            http_stopped = asyncio.create_task(asyncio.to_thread(http.stop)) if http is not None else None
            await _cancel_within(work, CLOSE_TIMEOUT_S)
            if http_stopped is not None:
                await http_stopped
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]

    def _start_http(self) -> HttpServer | None:
        if self.settings.http_port == 0:
            return None
        http = HttpServer(self.settings.http_port, self.health, self.metrics)
        http.start()
        self.http_port = http.port
        return http

    async def _retry(self, operation: Callable[[], Awaitable[T]], service: str) -> T:
        def failed(what: str, exc: BaseException) -> None:
            self.health.failing(what, str(exc))
            self.metrics.retries.labels(what).inc()

        return await retry_transient(
            operation,
            what=service,
            initial_s=self.settings.retry_initial_s,
            max_s=self.settings.retry_max_s,
            on_failure=failed,
            on_success=self.health.ok,
        )

    async def _work(self) -> None:
        settings = self.settings
        await self._retry(lambda: migrations.migrate_async(settings.database_url, settings.schema_name), "postgres")
        store = Store(settings.database_url, settings.schema_name)
        cache = CacheInvalidator.from_settings(settings)
        probe = asyncio.create_task(self._probe(cache), name="indexer-probe")
        pipeline = Pipeline(store, cache, max_message_bytes=settings.max_message_bytes, retry=self._retry)
        try:
            await self._retry(cache.ping, "redis")
            while not self._stop.is_set():
                await self._one_session(pipeline)
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await store.aclose()
            await cache.aclose()

    async def _open_session(self) -> Session:
        # A new Session per attempt: one that failed half-way is closed and marked lost for good.
        session = Session(self.settings)
        self._session = session
        await session.open()
        return session

    async def _one_session(self, pipeline: Pipeline) -> None:
        session = await self._retry(self._open_session, "rabbitmq")
        try:
            while not self._stop.is_set():
                batch = await session.next_batch(self.settings.batch_size, self.settings.batch_wait_ms)
                if self._stop.is_set():
                    return  # not started: leave it unacknowledged, the broker redelivers it
                started = time.monotonic()
                self._busy = True
                try:
                    outcome = await session.guard(pipeline.handle(batch, session))
                    await session.ack(batch)
                finally:
                    self._busy = False
                self._count(outcome, time.monotonic() - started)
        except Transient as exc:
            # The session is gone (or never opened); its deliveries return to the queue.
            self.health.failing("rabbitmq", str(exc))
            log.warning("rabbitmq session ended: %s; reconnecting", exc)
            await self._pause(self.settings.retry_initial_s)
        finally:
            self._session = None
            await session.close()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _count(self, outcome: BatchOutcome, elapsed_s: float) -> None:
        m = self.metrics.messages
        m.labels("applied").inc(outcome.applied)
        m.labels("skipped").inc(outcome.skipped)
        m.labels("ignored").inc(outcome.ignored)
        m.labels("dead_lettered").inc(outcome.dead_lettered)
        m.labels("refresh").inc(outcome.refreshes)
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(elapsed_s)
        self.metrics.invalidated_orgs.inc(len(outcome.organizations))

    async def _probe(self, cache: CacheInvalidator) -> None:
        """Keep /readyz honest while idle: a service may go away between batches."""
        # A store of its own: the pipeline's connection belongs to the batch in hand.
        async with Store(self.settings.database_url, self.settings.schema_name) as store:
            while True:
                await asyncio.sleep(PROBE_INTERVAL_S)
                for service, check in (("postgres", store.ping), ("redis", cache.ping)):
                    try:
                        await asyncio.wait_for(check(), PROBE_INTERVAL_S)
                        self.health.ok(service, PROBE)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # whatever it is, the probe must live on and say so
                        self.health.failing(service, str(exc) or type(exc).__name__, PROBE)


async def _within(awaitable: Awaitable[object], seconds: float) -> None:
    """Await ``awaitable`` for at most ``seconds`` (cancelled after that)."""
    try:
        await asyncio.wait_for(awaitable, max(0.0, seconds))
    except asyncio.TimeoutError:
        pass


async def _cancel_within(task: asyncio.Task[None], seconds: float) -> None:
    """Cancel ``task`` and let its clean-up run for ``seconds``; after that, cancel again whatever
    step of it is still waiting (closing a connection to a stalled service), until it is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    task.cancel()
    warned = False
    while not task.done():
        await asyncio.wait({task}, timeout=max(0.05, deadline - loop.time()))
        if not task.done() and loop.time() >= deadline:
            if not warned:
                log.warning("closing connections takes more than %.1f s; not waiting for them", seconds)
                warned = True
            task.cancel()


def run(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT; return normally (exit 0) after a clean stop."""

    async def main() -> None:
        service = Service(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.request_stop)
        await service.run()

    asyncio.run(main())
