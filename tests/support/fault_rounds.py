"""Helpers of tests/clusters/test_fault_rounds.py: a publisher that survives the loss of the broker
node it is connected to, a watcher of every indexer's /metrics (when each acknowledged a batch),
a cache filler on the Redis Cluster, the broker node each indexer is connected to, and the
expected final state as a source table for ``mention-indexer audit --source-query``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
import psycopg
from psycopg import sql

from indexer.cache import AsyncCacheReader
from indexer.changes import Change
from indexer.config import Settings
from indexer.ingest import declare_topology, wire
from tests.support.clusters import RabbitCluster
from tests.support.indexer_process import IndexerProcess
from tests.support.service import change_body
from tests.support.store import Row

# ---- publishing to the cluster -------------------------------------------------------------------


class ClusterPublisher:
    """Streams numbered changes with confirms to one node of the cluster at a time.  When a chunk
    fails (its node died, a confirm did not come), it connects to the next node and publishes the
    chunk again: a change confirmed twice is only a duplicate, which the indexer must absorb.
    ``confirmed`` maps ``message_id`` to its change; ``outages`` the (start, seconds) of each
    interruption, from the failure to the next confirm."""

    def __init__(self, settings: Settings, urls: Sequence[str], *, confirm_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.urls = list(urls)
        self.confirm_timeout_s = confirm_timeout_s
        self.confirmed: dict[int, Change] = {}
        self.outages: list[tuple[float, float]] = []
        self.republished = 0
        self._node = 0
        self._next = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClusterPublisher:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    async def _connect(self) -> None:
        last: Exception | None = None
        for _ in range(len(self.urls)):
            url = self.urls[self._node % len(self.urls)]
            try:
                connection = await aio_pika.connect(url, timeout=5)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await declare_topology(channel, self.settings)
                self._exchange = await channel.get_exchange(self.settings.exchange)
                self._connection = connection
                return
            except Exception as exc:  # a node down or booting: the next one
                last = exc
                self._node += 1
        raise ConnectionError(f"no node of {self.urls} took the publisher: {last!r}")

    def start(self, changes: Sequence[Change], *, chunk: int, interval_s: float) -> None:
        numbered = list(enumerate(changes))
        self._next = len(numbered)
        self._task = asyncio.create_task(self._stream(numbered, chunk, interval_s), name="cluster-publisher")

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def finished(self) -> None:
        assert self._task is not None
        await self._task

    async def publish_now(self, changes: Sequence[Change]) -> None:
        """Publish ``changes`` at once (numbered after the stream), through the same failover."""
        first, self._next = self._next, self._next + len(changes)
        await self._send_reliably(list(zip(range(first, self._next), changes, strict=True)))

    async def _stream(self, numbered: list[tuple[int, Change]], chunk: int, interval_s: float) -> None:
        """A chunk every ``interval_s`` (on a fixed schedule: a stall is caught up afterwards)."""
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(numbered), chunk)):
            await asyncio.sleep(max(0.0, t0 + k * interval_s - time.monotonic()))
            await self._send_reliably(numbered[i : i + chunk])

    async def _send_reliably(self, batch: list[tuple[int, Change]]) -> None:
        failed_at: float | None = None
        while True:
            pending = [(seq, c) for seq, c in batch if seq not in self.confirmed]
            if not pending:
                break
            try:
                if self._exchange is None:
                    await self._connect()
                await asyncio.wait_for(self._send(pending), self.confirm_timeout_s)
            except Exception:
                if failed_at is None:
                    failed_at = time.monotonic()
                self.republished += len([1 for seq, _ in batch if seq not in self.confirmed])
                await self._close()
                self._node += 1
                await asyncio.sleep(0.2)
        if failed_at is not None:
            self.outages.append((failed_at, time.monotonic() - failed_at))

    async def _send(self, numbered: Sequence[tuple[int, Change]]) -> None:
        assert self._exchange is not None
        exchange = self._exchange

        async def one(seq: int, change: Change) -> None:
            message = aio_pika.Message(
                change_body(change),
                content_type=wire.CONTENT_TYPE,
                message_id=str(seq),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, f"events.{change.kind.event_name}", mandatory=True)
            self.confirmed[seq] = change

        await asyncio.gather(*(one(seq, change) for seq, change in numbered))


# ---- watching the indexers -----------------------------------------------------------------------


@dataclass
class Watched:
    process: IndexerProcess
    batch_times: list[float] = field(default_factory=list)
    ready_times: list[float] = field(default_factory=list)  # when /metrics said ready after not
    last: tuple[int, float] | None = None  # (starts, batches) last seen
    was_ready: bool = False


class Watcher:
    """A thread polling every indexer's /metrics: when each one's batch counter moved (a batch was
    acknowledged, to within ``interval_s``) and when it turned ready."""

    def __init__(self, processes: Sequence[IndexerProcess], interval_s: float = 0.15) -> None:
        self.watched = [Watched(p) for p in processes]
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-watcher")

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for w in self.watched:
                if not w.process.running:
                    w.was_ready = False
                    continue
                answer = w.process.http("/metrics")
                now = time.monotonic()
                if answer is None or answer[0] != 200:
                    continue
                batches, ready = 0.0, 0.0
                for line in answer[1].splitlines():
                    if line.startswith("mention_indexer_batches_total "):
                        batches = float(line.rpartition(" ")[2])
                    elif line.startswith("mention_indexer_ready "):
                        ready = float(line.rpartition(" ")[2])
                seen = (w.process.starts, batches)
                restarted = w.last is not None and seen[0] != w.last[0] and batches > 0
                moved = w.last is not None and seen[0] == w.last[0] and batches > w.last[1]
                if restarted or moved:
                    w.batch_times.append(now)
                w.last = seen
                if ready and not w.was_ready:
                    w.ready_times.append(now)
                w.was_ready = bool(ready)
            self._stop.wait(self.interval_s)

    def batches_now(self, index: int) -> float | None:
        """The batch counter of indexer ``index`` read right now (None if it does not answer)."""
        answer = self.watched[index].process.http("/metrics")
        if answer is None or answer[0] != 200:
            return None
        for line in answer[1].splitlines():
            if line.startswith("mention_indexer_batches_total "):
                return float(line.rpartition(" ")[2])
        return 0.0

    async def wait_more(
        self, baseline: dict[int, float | None], since: float, timeout_s: float, what: str
    ) -> dict[int, float]:
        """Until each indexer of ``baseline`` has acknowledged more batches than its baseline
        count (read after the fault); seconds from ``since`` to the first poll that saw it."""
        deadline = time.monotonic() + timeout_s
        found: dict[int, float] = {}
        while len(found) < len(baseline):
            for i, base in baseline.items():
                if i in found:
                    continue
                if not self.watched[i].process.running:
                    raise AssertionError(f"{what}: indexer {i} exited\n{self.watched[i].process.tail()}")
                now_count = await asyncio.to_thread(self.batches_now, i)
                if now_count is not None and now_count > (base or 0):
                    found[i] = time.monotonic() - since
            if time.monotonic() > deadline:
                missing = [i for i in baseline if i not in found]
                tails = "\n".join(self.watched[i].process.tail(40) for i in missing)
                raise AssertionError(f"{what}: no batch acknowledged by {missing} within {timeout_s}s\n{tails}")
            await asyncio.sleep(0.05)
        return found

    def next_batch(self, index: int, after: float) -> float | None:
        return next((t for t in self.watched[index].batch_times if t > after), None)

    def next_ready(self, index: int, after: float) -> float | None:
        return next((t for t in self.watched[index].ready_times if t > after), None)

    async def wait_batches(self, indexes: Sequence[int], after: float, timeout_s: float, what: str) -> dict[int, float]:
        """Until each of ``indexes`` acknowledged a batch after ``after``; seconds from ``after``."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = {i: self.next_batch(i, after) for i in indexes}
            if all(t is not None for t in found.values()):
                return {i: t - after for i, t in found.items() if t is not None}
            for i in indexes:
                if not self.watched[i].process.running:
                    raise AssertionError(f"{what}: indexer {i} exited\n{self.watched[i].process.tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(self.watched[i].process.tail(40) for i in indexes if found[i] is None)
                raise AssertionError(
                    f"{what}: no batch acknowledged by {[i for i in indexes if found[i] is None]}"
                    f" within {timeout_s}s\n{tails}"
                )
            await asyncio.sleep(0.05)


# ---- the broker node of each indexer -------------------------------------------------------------


def consumer_nodes(rabbit: RabbitCluster, queue: str) -> dict[int, int]:
    """pid of each indexer's consumer connection -> index of the node it is connected to, from
    ``rabbitmqctl list_connections`` (``connection_name`` "mention-indexer consumer of <queue> <pid>";
    ``port`` is the node's AMQP port)."""
    asked = next(n for n in rabbit.nodes if n.running)
    rows = rabbit.ctl_json(asked.index, "list_connections", "port", "client_properties", timeout_s=30)
    by_port = {n.amqp_port: n.index for n in rabbit.nodes}
    prefix = f"mention-indexer consumer of {queue} "
    found: dict[int, int] = {}
    for row in rows:
        props = row.get("client_properties")
        name = None
        if isinstance(props, dict):
            name = props.get("connection_name")
        elif isinstance(props, list):
            for item in props:
                if isinstance(item, list | tuple) and item and item[0] == "connection_name":
                    name = item[-1]
        if isinstance(name, str) and name.startswith(prefix) and row.get("port") in by_port:
            found[int(name[len(prefix) :])] = by_port[row["port"]]
    return found


# ---- the expected final state as a source -------------------------------------------------------


def create_source(url: str, schema: str, rows: dict[int, Row]) -> str:
    """A table in ``schema`` holding ``rows`` (the oracle); the ``--source-query`` reading it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.expected (mention_id bigint PRIMARY KEY, organization_id bigint, mention_date timestamptz,"
                " transaction_timestamp timestamptz NOT NULL, deleted boolean NOT NULL)"
            ).format(sql.Identifier(schema))
        )
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL(
                    "COPY {}.expected (mention_id, organization_id, mention_date, transaction_timestamp, deleted) FROM STDIN"
                ).format(sql.Identifier(schema))
            ) as copy,
        ):
            for mention_id, row in rows.items():
                copy.write_row(
                    (mention_id, row.organization_id, row.mention_date, row.transaction_timestamp, row.deleted)
                )
    return f"SELECT mention_id, organization_id, mention_date, transaction_timestamp, deleted FROM {schema}.expected"


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# ---- filling caches --------------------------------------------------------------------------------


def _value(org: int, key: str) -> str:
    return f"{key} of {org} at {time.time()}"


class CacheFiller:
    """Fills four keys (``list``, ``count``, ...) of every organization through the helper for every organization, over and
    over (an application reading); errors while the cluster fails over are counted and skipped."""

    def __init__(self, url: str, prefix: str, orgs: Sequence[int], pause_s: float = 0.3) -> None:
        self.url, self.prefix, self.orgs, self.pause_s = url, prefix, list(orgs), pause_s
        self.keys = ("list", "count", "top", "page-2")
        self.fills = 0
        self.errors = 0
        self.passes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cache-filler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with AsyncCacheReader(self.url, self.prefix) as reader:
            while True:
                for org in self.orgs:
                    for key in self.keys:
                        try:
                            await asyncio.wait_for(
                                reader.get_or_fill(org, key, functools.partial(_value, org, key)),
                                5,
                            )
                            self.fills += 1
                        except asyncio.CancelledError:
                            raise
                        except Exception:
                            self.errors += 1
                self.passes += 1
                await asyncio.sleep(self.pause_s)
