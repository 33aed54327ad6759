"""``mention-indexer run``: supervise the broker session and drive batches through the pipeline.

Per batch, strictly: dead letters confirmed → commit → invalidate → ack.  A lost
broker connection abandons the batch in hand (its deliveries come back) and opens a new session;
Postgres or Redis trouble is retried with backoff while the batch waits unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime

from indexer import tracing
from indexer.audit import ContinuousAudit
from indexer.cache import CacheInvalidator
from indexer.config import Settings
from indexer.errors import Transient
from indexer.health import CONSUMER, PROBE, Health
from indexer.http import HttpServer
from indexer.ingest import Delivery, Session
from indexer.metrics import Metrics
from indexer.pipeline import BatchOutcome, CachePort, Pipeline, StorePort
from indexer.readmodel import migrate as migrations
from indexer.readmodel.store import Store
from indexer.supervision import SupervisedCache, SupervisedDeadLetters, SupervisedStore, Supervisor

log = logging.getLogger(__name__)
PROBE_INTERVAL_S = 5.0
# From the stop request to the end of the connections' close: under the 10 s an orchestrator gives.
STOP_BUDGET_S = 9.0
# Closing the connections gets at least this long, even after a batch used all its budget; a
# service that does not answer (no close-ok) is left behind then: the broker requeues what we held
# when it notices we are gone.
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
        self.acknowledged = 0  # deliveries acknowledged since the start, dead letters included
        self._last_applied_s = 0.0
        self._watermark: datetime | None = None  # the newest version applied: the live path's watermark
        self.audit_samples = 0  # continuous-audit samples completed since the start
        self._audits = asyncio.Condition()
        self._window = _Window()
        self.metrics.in_hand.set_function(self._in_hand)
        self._acks = asyncio.Condition()
        self._supervisor = Supervisor(
            self.health, self.metrics, initial_s=settings.retry_initial_s, max_s=settings.retry_max_s
        )

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested: no new batches; finishing the one in hand")
        self._stop.set()
        self.health.stopping = True

    async def run(self) -> None:
        """Until ``request_stop``.  The batch in hand gets ``shutdown_timeout_s`` from the stop
        request to finish; closing the connections (waiting for the broker's close-ok, so that it
        has every unacknowledged delivery back before the process ends) gets what is left of
        ``STOP_BUDGET_S``, at least ``CLOSE_TIMEOUT_S``: a service that stopped answering cannot
        stretch the shutdown step by step (exit within 10 s)."""
        loop = asyncio.get_running_loop()
        http = self._start_http()
        work = asyncio.create_task(self._work(), name="indexer-work")
        stop = asyncio.create_task(self._stop.wait())
        stopped_at: float | None = None
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            stopped_at = loop.time()
            deadline = stopped_at + self.settings.shutdown_timeout_s
            if not work.done() and self._busy:
                if self._session is not None:
                    await _within(self._session.stop_consuming(), deadline - loop.time())
                await asyncio.wait({work}, timeout=max(0.0, deadline - loop.time()))
                if not work.done():
                    log.warning(
                        "batch not finished after %.1f s; abandoning it (it will be redelivered)",
                        self.settings.shutdown_timeout_s,
                    )
        finally:
            stop.cancel()
            http_stopped = asyncio.create_task(asyncio.to_thread(http.stop)) if http is not None else None
            spent_s = 0.0 if stopped_at is None else loop.time() - stopped_at
            await _cancel_within(work, max(CLOSE_TIMEOUT_S, STOP_BUDGET_S - spent_s))
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

    async def _work(self) -> None:
        settings = self.settings
        supervisor = self._supervisor
        await supervisor.call("postgres", lambda: migrations.migrate_async(settings.database_url, settings.schema_name))
        store = Store(settings.database_url, settings.schema_name)
        cache = CacheInvalidator.from_settings(settings)
        probe = asyncio.create_task(self._probe(cache), name="indexer-probe")
        summary = asyncio.create_task(self._summarize(), name="indexer-summary") if settings.log_summary_s else None
        audit = asyncio.create_task(self._audit(), name="indexer-audit") if settings.audit_interval_s else None
        supervised_store, supervised_cache = SupervisedStore(store, supervisor), SupervisedCache(cache, supervisor)
        sweep: asyncio.Task[None] | None = None
        try:
            await supervisor.call("redis", cache.start)
            # What an indexer that died between a commit and its invalidation left owing, now.
            sweep = asyncio.create_task(self._sweep_outbox(cache), name="indexer-outbox")
            while not self._stop.is_set():
                await self._one_session(supervised_store, supervised_cache)
        finally:
            background = [task for task in (probe, summary, sweep, audit) if task is not None]
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await store.aclose()
            await cache.aclose()

    async def _open_session(self) -> Session:
        # A new Session per attempt: one that failed half-way is closed and marked lost for good.
        session = Session(self.settings)
        self._session = session
        await session.open()
        return session

    async def _one_session(self, store: StorePort, cache: CachePort) -> None:
        session = await self._supervisor.call("rabbitmq", self._open_session)
        self.health.ok(CONSUMER)
        self.metrics.consumer_registered.set(1)
        dead_letters = SupervisedDeadLetters(session, self._supervisor)
        pipeline = Pipeline(store, cache, dead_letters, max_message_bytes=self.settings.max_message_bytes)
        try:
            while not self._stop.is_set():
                batch = await session.next_batch(self.settings.batch_messages, self.settings.batch_wait_ms)
                if self._stop.is_set():
                    return  # not started: leave it unacknowledged, the broker redelivers it
                self.metrics.delivered()
                self._busy = True
                try:
                    with tracing.span("batch", messages=len(batch)) as batch_span:
                        outcome = await session.guard(pipeline.handle(batch))
                        tracing.link(batch_span, outcome.trace_contexts)
                        session.hold(outcome.held)
                        with tracing.span("ack"):
                            await session.ack(batch)
                finally:
                    self._busy = False
                self._count(batch, outcome)
                await self._acknowledged(len(batch))
        except Transient as exc:
            # The session is gone (or never opened); its deliveries return to the queue.
            self.health.failing("rabbitmq", str(exc))
            log.warning("rabbitmq session ended: %s; reconnecting", exc)
            await self._pause(self.settings.retry_initial_s)
        finally:
            self._session = None
            self.metrics.consumer_registered.set(0)
            self.health.failing(CONSUMER, "no consumer registered on the queue (reconnecting)")
            await session.close()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _acknowledged(self, messages: int) -> None:
        async with self._acks:
            self.acknowledged += messages
            self._acks.notify_all()

    async def wait_acknowledged(self, messages: int) -> None:
        """Return once at least ``messages`` deliveries in all have been acknowledged: for whoever
        embeds the service (tests, benchmarks) to wait on the data path instead of polling it."""
        async with self._acks:
            await self._acks.wait_for(lambda: self.acknowledged >= messages)

    def _count(self, batch: list[Delivery], outcome: BatchOutcome[Delivery]) -> None:
        metrics, acked_s = self.metrics, time.time()
        for name, count in (
            ("applied", outcome.applied),
            ("duplicate", outcome.duplicate),
            ("stale", outcome.stale),
            ("ignored", outcome.ignored),
            ("dead_lettered", outcome.dead_lettered),
            ("refresh", outcome.refreshes),
            ("held", len(outcome.held)),
        ):
            metrics.messages.labels(name).inc(count)
        for kind, count in outcome.dead_letter_reasons.items():
            metrics.dead_letters.labels(kind).inc(count)
        if outcome.applied_at:
            newest = max(outcome.applied_at)
            if self._watermark is None or newest > self._watermark:
                self._watermark = newest
        versions_s = [at.timestamp() for at in outcome.applied_at]
        for version_s in versions_s:
            metrics.lag.observe(acked_s - version_s)
        window = self._window
        window.messages += len(batch)
        window.dead_lettered += outcome.dead_lettered
        window.lag_max_s = max([window.lag_max_s, *(acked_s - version_s for version_s in versions_s)])
        if versions_s and max(versions_s) > self._last_applied_s:
            self._last_applied_s = max(versions_s)
            metrics.last_applied.set(self._last_applied_s)
        metrics.batches.inc()
        metrics.batch_messages.observe(len(batch))
        metrics.batch_duration.observe(time.monotonic() - batch[0].received_s)
        metrics.invalidated_organizations.inc(len(outcome.organizations))
        log.debug(
            "batch of %d acknowledged: %d applied, %d duplicate, %d stale, %d ignored, %d dead-lettered",
            len(batch),
            outcome.applied,
            outcome.duplicate,
            outcome.stale,
            outcome.ignored,
            outcome.dead_lettered,
        )

    async def _summarize(self) -> None:
        """Every ``log_summary_s``, one info line: what an operator tailing the log wants to know."""
        interval_s = self.settings.log_summary_s
        while True:
            await asyncio.sleep(interval_s)
            window, self._window = self._window, _Window()
            log.info(
                "%d messages in %d s (%.0f/s), lag up to %.3f s, %d dead-lettered",
                window.messages,
                interval_s,
                window.messages / interval_s,
                window.lag_max_s,
                window.dead_lettered,
                extra={
                    "messages": window.messages,
                    "rate_per_s": round(window.messages / interval_s, 1),
                    "lag_max_s": round(window.lag_max_s, 3),
                    "dead_lettered": window.dead_lettered,
                },
            )

    async def _audit(self) -> None:
        """Every ``audit_interval_s``, the continuous audit's sample (docs/audit.md): read-only, on
        connections of its own, beside the live path and never in its way.  A failure only logs;
        the next interval tries again."""
        interval_s = self.settings.audit_interval_s
        auditor = ContinuousAudit(self.settings, self.metrics.audit(), lambda: self._watermark)
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await auditor.sample()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # whatever it is, the audit must live on and say so
                    log.warning("audit sample failed: %s; trying again in %d s", exc, interval_s)
                    log.debug("audit sample failed", exc_info=True)
                async with self._audits:
                    self.audit_samples += 1
                    self._audits.notify_all()
        finally:
            await auditor.aclose()

    async def wait_audited(self, samples: int) -> None:
        """Return once at least ``samples`` continuous-audit samples have ended (failed ones too)."""
        async with self._audits:
            await self._audits.wait_for(lambda: self.audit_samples >= samples)

    def _in_hand(self) -> float:
        session = self._session
        return float(session.unacknowledged) if session is not None else 0.0

    async def _sweep_outbox(self, cache: CacheInvalidator) -> None:
        """Finish the invalidations that batches of any indexer committed and did not settle:
        everything at the start, then, every ``outbox_age_s / 3``, what is older than
        ``outbox_age_s`` (younger rows belong to batches still in hand).  Failures wait for the
        next round."""
        older_than_s = 0.0
        async with Store(self.settings.database_url, self.settings.schema_name) as store:
            while True:
                try:
                    finished = await store.settle_owed(older_than_s, cache.invalidate)
                    if finished:
                        log.info("finished %d invalidation(s) left owing by earlier batches", finished)
                except Transient as exc:
                    log.warning("invalidation outbox sweep failed, trying again later: %s", exc)
                older_than_s = self.settings.outbox_age_s
                await asyncio.sleep(older_than_s / 3)

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


@dataclass
class _Window:
    """What the next summary line covers."""

    messages: int = 0
    dead_lettered: int = 0
    lag_max_s: float = 0.0


async def _within(awaitable: Awaitable[object], seconds: float) -> None:
    """Await ``awaitable`` for at most ``seconds`` (cancelled after that)."""
    try:
        await asyncio.wait_for(awaitable, max(0.0, seconds))
    except TimeoutError:
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
