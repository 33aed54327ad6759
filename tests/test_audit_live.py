"""The audit beside the live path: an audit while the stream flows reports no false difference
(changes not applied yet are in flight), and the continuous audit inside ``run`` samples, exports
its metrics, catches an inconsistency at the next interval, and never stops the live path."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import aio_pika
import psycopg
import pytest
import redis
from psycopg import sql

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.ingest import wire
from indexer.service import Service
from tests.support.audit import counts, metric, model_sql, restore_after_invalidation, run_audit
from tests.support.backfill import SourceRow, SourceTable, run_backfill
from tests.support.cache_fixtures import fill
from tests.support.clock import at
from tests.support.service import acknowledged, change_body, publish_changes, running

ROWS = 20_000
NO_DIFFERENCE = {"missing": 0, "extra": 0, "changed": 0}


class Producer:
    """The service that owns the mentions table: each change commits to the source, then its
    event is published (or held back, to be published later), with the same version."""

    def __init__(self, settings: Settings, source: SourceTable, rows: list[SourceRow], rng: random.Random) -> None:
        self._settings = settings
        self._table = source.table
        self._url = source.url
        self._rng = rng
        self.state = {r.id: (r.org, r.happened_at) for r in rows if not r.removed}  # the live rows
        self._next_id = max(r.id for r in rows) + 1
        self._last = datetime.now(UTC)
        self.published = 0
        self.held: list[Change] = []
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self, connection: aio_pika.abc.AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True)
        self._exchange = await channel.get_exchange(self._settings.exchange)

    async def _publish(self, changes: list[Change]) -> None:
        assert self._exchange is not None
        for change in changes:
            message = aio_pika.Message(change_body(change), content_type=wire.CONTENT_TYPE)
            await self._exchange.publish(message, f"events.{change.kind.event_name}")
        self.published += len(changes)

    def _version(self) -> datetime:
        # Strictly increasing, as the source's commit order.
        self._last = max(self._last + timedelta(microseconds=1), datetime.now(UTC))
        return self._last

    async def step(self, conn: psycopg.AsyncConnection, *, publish: bool = True, hard_deletes: bool = True) -> None:
        kinds = ["insert", "move", "redate", "delete"] + (["hard-delete"] if hard_deletes else [])
        kind = self._rng.choice(kinds)
        ts = self._version()
        table = self._table
        if kind == "insert" or not self.state:
            mention_id, org, date = self._next_id, self._rng.randint(1, 6), at(self._rng.randint(0, 10**6))
            self._next_id += 1
            await conn.execute(
                sql.SQL("INSERT INTO {} (id, org, happened_at, version_at) VALUES (%s, %s, %s, %s)").format(table),
                (mention_id, org, date, ts),
            )
            self.state[mention_id] = (org, date)
            change = Change(Kind.INSERTED, mention_id, org, date, ts)
        else:
            mention_id = self._rng.choice(sorted(self.state))
            org, date = self.state[mention_id]
            if kind == "move":
                org = org % 6 + 1
                await conn.execute(
                    sql.SQL("UPDATE {} SET org = %s, version_at = %s WHERE id = %s").format(table),
                    (org, ts, mention_id),
                )
                self.state[mention_id] = (org, date)
                change = Change(Kind.UPDATED, mention_id, org, date, ts)
            elif kind == "redate":
                date = date + timedelta(hours=1)
                await conn.execute(
                    sql.SQL("UPDATE {} SET happened_at = %s, version_at = %s WHERE id = %s").format(table),
                    (date, ts, mention_id),
                )
                self.state[mention_id] = (org, date)
                change = Change(Kind.UPDATED, mention_id, org, date, ts)
            elif kind == "delete":
                await conn.execute(
                    sql.SQL("UPDATE {} SET removed = true, version_at = %s WHERE id = %s").format(table),
                    (ts, mention_id),
                )
                del self.state[mention_id]
                change = Change(Kind.DELETED, mention_id, org, None, ts)
            else:  # the row itself goes: nothing in the source tells when
                await conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(table), (mention_id,))
                del self.state[mention_id]
                change = Change(Kind.DELETED, mention_id, org, None, ts)
        if publish:
            await self._publish([change])
        else:
            self.held.append(change)

    async def release(self) -> None:
        held, self.held = self.held, []
        await self._publish(held)


async def source_connection(source: SourceTable) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(source.url, autocommit=True)


async def test_an_audit_while_the_stream_flows_reports_no_false_difference(
    settings: Settings, source: SourceTable
) -> None:
    rng = random.Random(2024)
    rows = [SourceRow(i, rng.randint(1, 6), at(i), at(i)) for i in range(1, ROWS + 1)]
    source.insert(rows)
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    producer = Producer(settings, source, rows, rng)
    async with (
        running(settings) as service,
        await source_connection(source) as conn,
        await aio_pika.connect(settings.amqp_url) as amqp,
    ):
        await producer.open(amqp)
        # Changes committed to the source whose events are not out yet: in flight, exactly.
        for _ in range(5):
            await producer.step(conn, publish=False, hard_deletes=False)
        read_model, _ = counts(await run_audit(settings, query))
        assert {k: read_model[k] for k in (*NO_DIFFERENCE, "in_flight")} == {**NO_DIFFERENCE, "in_flight": 5}
        await producer.release()
        await acknowledged(service, producer.published)
        read_model, _ = counts(await run_audit(settings, query))
        assert {k: read_model[k] for k in (*NO_DIFFERENCE, "in_flight")} == {**NO_DIFFERENCE, "in_flight": 0}

        # Now audits while changes flow, hard deletes included, as the command runs them.
        stop = asyncio.Event()

        async def flow() -> None:
            while not stop.is_set():
                await producer.step(conn)

        flowing = asyncio.create_task(flow())
        in_flight = 0
        try:
            for _ in range(5):
                before = producer.published
                report = await run_audit(settings, query, settle_s=1.0)
                assert not flowing.done()
                assert producer.published > before, "no change flowed during the audit"
                found = report.read_model.counts
                assert found.by_kind() == NO_DIFFERENCE, report.lines()
                assert found.checked >= len(producer.state) * 0.9
                in_flight += found.in_flight
        finally:
            stop.set()
            await flowing
        assert in_flight > 0, "the audits never met a change in flight"
        await acknowledged(service, producer.published, timeout_s=60)
        report = await run_audit(settings, query)
        assert counts(report)[0] == {"checked": len(producer.state), **NO_DIFFERENCE, "in_flight": 0}


def audit_settings(settings: Settings, query: str) -> Settings:
    return settings.model_copy(update={"audit_interval_s": 1, "audit_sample": 1000, "audit_source_query": query})


async def samples(service: Service, count: int) -> None:
    try:
        await asyncio.wait_for(service.wait_audited(count), 30)
    except TimeoutError:
        raise AssertionError(f"{service.audit_samples} of {count} audit samples within 30 s") from None


async def test_the_continuous_audit_exports_its_metrics_and_catches_an_inconsistency(
    settings: Settings, source: SourceTable, admin: redis.Redis
) -> None:
    rows = [SourceRow(i, i % 3 + 1, at(i), at(i)) for i in range(1, 51)]
    source.insert(rows)
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    await fill(settings, 1, "open-mentions")
    async with running(audit_settings(settings, query)) as service:
        m = service.metrics
        await samples(service, 1)
        checked = metric(m, "mention_indexer_audit_checked_total", pair="read_model")
        assert 1 <= checked <= len(rows)
        assert metric(m, "mention_indexer_audit_checked_total", pair="cache") == 1
        for pair, kinds in (("read_model", ("missing", "extra", "changed")), ("cache", ("stale",))):
            for kind in kinds:
                assert metric(m, "mention_indexer_audit_differences_total", pair=pair, kind=kind) == 0
            assert metric(m, "mention_indexer_audit_consistency_ratio", pair=pair) == 1
        assert metric(m, "mention_indexer_audit_failures_total") == 0

        # Every row moved behind the indexer's back, and the cached entry back after its invalidation.
        model_sql(settings, "UPDATE {mentions} SET organization_id = organization_id + 100")
        await restore_after_invalidation(settings, admin, 1, "open-mentions")
        done = service.audit_samples
        await samples(service, done + 2)  # one whole sample after the change, at least
        assert metric(m, "mention_indexer_audit_differences_total", pair="read_model", kind="changed") >= 1
        assert metric(m, "mention_indexer_audit_consistency_ratio", pair="read_model") == 0
        assert metric(m, "mention_indexer_audit_differences_total", pair="cache", kind="stale") >= 1
        assert metric(m, "mention_indexer_audit_consistency_ratio", pair="cache") == 0
        assert metric(m, "mention_indexer_audit_failures_total") == 0

        # The live path went on all along.
        await publish_changes(settings, [Change(Kind.INSERTED, 999, 1, at(1), datetime.now(UTC))])
        await acknowledged(service, 1)


async def test_a_failing_continuous_audit_only_logs_and_tries_again(
    settings: Settings, source: SourceTable, caplog: pytest.LogCaptureFixture
) -> None:
    broken = audit_settings(settings, f"SELECT id AS mention_id FROM {source.schema}.nowhere")
    async with running(broken) as service:
        await samples(service, 2)
        assert metric(service.metrics, "mention_indexer_audit_failures_total") == 2
        assert service.health.snapshot()[0]
        await publish_changes(settings, [Change(Kind.INSERTED, 1, 1, at(1), at(2))])
        await acknowledged(service, 1)
    assert any("audit sample failed" in r.getMessage() and "nowhere" in r.getMessage() for r in caplog.records)


async def test_the_continuous_audit_is_off_by_default(settings: Settings) -> None:
    async with running(settings) as service:
        names = {family.name for family in service.metrics.registry.collect()}
    assert not any(name.startswith("mention_indexer_audit") for name in names)
