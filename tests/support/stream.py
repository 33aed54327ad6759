"""Fault-test traffic: random mention histories, a pausable publisher, and the ack invariant.

The invariant every fault test checks at the moments it can be checked exactly (no consumer
attached, publisher paused): a message that is no longer in the queue was acknowledged, and an
acknowledged change must be in the table (its mention's row has at least its version).  Messages
are told apart by ``message_id`` = their sequence number in the publisher.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

import aio_pika

from indexer.changes import Change, Kind, version_key
from indexer.config import Settings
from indexer.ingest import declare_topology, wire
from tests.support.amqp import queue_state
from tests.support.service import change_body
from tests.support.store import Row, change
from tests.support.waiting import eventually

_NO_DATE = datetime.min.replace(tzinfo=timezone.utc)


# ---- histories ----------------------------------------------------------------------------------


def history(rng: random.Random, mention_ids: Iterable[int], orgs: Sequence[int]) -> list[Change]:
    """Per mention: an insert, then updates (some moving it to another organization), deletes,
    re-inserts, a few same-instant conflicts (tie-break), each change sometimes duplicated; all
    shuffled.  Every change carries its organization and date, so ``oracle`` applies."""
    changes: list[Change] = []
    for mention_id in mention_ids:
        t_ms = rng.randrange(0, 100_000)
        org = rng.choice(orgs)
        date_s = rng.randrange(0, 10_000_000)
        alive = True
        steps = [(Kind.INSERTED, org, date_s, t_ms)]
        for _ in range(rng.randint(2, 14)):
            t_ms += rng.choice((1, 7, 250, 1000, 60_000))
            if alive:
                if rng.random() < 0.7:
                    kind = Kind.UPDATED
                    if rng.random() < 0.35:
                        org = rng.choice(orgs)  # moves to another organization
                    if rng.random() < 0.5:
                        date_s = rng.randrange(0, 10_000_000)
                else:
                    kind, alive = Kind.DELETED, False
            elif rng.random() < 0.8:
                kind, alive = Kind.INSERTED, True  # re-insert after a delete
                if rng.random() < 0.3:
                    org = rng.choice(orgs)
            else:
                kind = Kind.DELETED  # deleted again
            steps.append((kind, org, date_s, t_ms))
            if rng.random() < 0.04:  # another change claiming the same instant and kind
                steps.append((kind, rng.choice(orgs), rng.randrange(0, 10_000_000), t_ms))
        for kind, o, d, t in steps:
            one = change(kind, mention_id, o, ts_s=t / 1000, date_s=d)
            changes.append(one)
            while rng.random() < 0.12:  # duplicate deliveries
                changes.append(one)
    rng.shuffle(changes)
    return changes


# ---- publishing ---------------------------------------------------------------------------------


class Publisher:
    """Publishes changes straight to the real broker (never through a proxy), with confirms.

    ``start`` streams a list in chunks in the background; ``pause``/``resume`` hold it (``pause``
    returns once nothing is in flight); ``publish_now`` sends at once.  ``confirmed`` maps each
    confirmed message's id to its change.
    """

    def __init__(self, settings: Settings, *, padding: int = 0) -> None:
        self.settings = settings
        self.padding = padding
        self.confirmed: dict[int, Change] = {}
        self.confirmed_at: dict[int, float] = {}
        self._next = 0
        self._backlog: list[tuple[int, Change]] = []
        self._gate = asyncio.Event()
        self._gate.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def __aenter__(self) -> Publisher:
        self._connection = await aio_pika.connect(self.settings.amqp_url)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        # The same topology the indexer declares (idempotent), so nothing published is unroutable
        # even before the indexer first starts.
        await declare_topology(channel, self.settings)
        self._exchange = await channel.get_exchange(self.settings.exchange)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()

    @property
    def changes(self) -> list[Change]:
        """Every change confirmed so far (duplicates included)."""
        return list(self.confirmed.values())

    def start(self, changes: Sequence[Change], *, chunk: int = 20, interval_s: float = 0.02) -> None:
        self._backlog.extend(self._number(changes))
        self._task = asyncio.create_task(self._stream(chunk, interval_s), name="publisher")

    async def finished(self) -> None:
        """Wait until the streamed list is all confirmed (raises what publishing raised)."""
        self.resume()
        if self._task is not None:
            await self._task

    async def pause(self) -> None:
        self._gate.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self._gate.set()

    async def publish_now(self, changes: Sequence[Change]) -> list[int]:
        numbered = self._number(changes)
        await self._send(numbered)
        return [seq for seq, _ in numbered]

    def _number(self, changes: Sequence[Change]) -> list[tuple[int, Change]]:
        first, self._next = self._next, self._next + len(changes)
        return list(zip(range(first, self._next), changes))

    async def _stream(self, chunk: int, interval_s: float) -> None:
        while self._backlog:
            await self._gate.wait()
            self._idle.clear()
            try:
                batch, self._backlog = self._backlog[:chunk], self._backlog[chunk:]
                await self._send(batch)
            finally:
                self._idle.set()
            await asyncio.sleep(interval_s)

    async def _send(self, numbered: Sequence[tuple[int, Change]]) -> None:
        assert self._exchange is not None
        exchange = self._exchange

        async def one(seq: int, change: Change) -> None:
            message = aio_pika.Message(
                change_body(change, padding=self.padding),
                content_type=wire.CONTENT_TYPE,
                message_id=str(seq),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, f"events.{change.kind.event_name}", mandatory=True)
            self.confirmed[seq] = change
            self.confirmed_at[seq] = time.monotonic()

        await asyncio.gather(*(one(seq, change) for seq, change in numbered))


# ---- the queue as seen from outside ------------------------------------------------------------


async def remaining_ids(settings: Settings, *, timeout_s: float = 20) -> set[int]:
    """The ``message_id`` of every message in the queue, left in the queue.

    Only meaningful with no consumer attached (then nothing is unacknowledged: a dead consumer's
    deliveries are back in the queue) and nobody publishing.
    """
    deadline = time.monotonic() + timeout_s

    async def unconsumed() -> tuple[int, int] | None:
        state = await queue_state(settings.amqp_url, settings.queue)
        return state if state[1] == 0 else None

    count, _ = await eventually(unconsumed, timeout_s=timeout_s, what="no consumer left on the queue")
    if count == 0:
        return set()
    ids: set[int] = set()
    seen = 0
    everything = asyncio.Event()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=min(count + 100, 65535))
        queue = await channel.declare_queue(settings.queue, passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            ids.add(int(message.message_id or -1))
            if seen >= count:
                everything.set()

        tag = await queue.consume(on_message)  # never acked: closing the channel requeues all
        try:
            await asyncio.wait_for(everything.wait(), max(1.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise AssertionError(f"read {seen} of the {count} messages in the queue") from None
        await queue.cancel(tag)
        await channel.close()
    return ids


def row_version(row: Row) -> tuple[datetime, int, int, datetime]:
    """``version_key`` of the change a stored row came from."""
    return (row.transaction_timestamp, row.change_kind, row.organization_id, row.mention_date or _NO_DATE)


def assert_acked_were_committed(confirmed: dict[int, Change], remaining: set[int], table: dict[int, Row]) -> int:
    """Every confirmed message missing from the queue (so acknowledged) is reflected in ``table``.

    Returns how many were acknowledged."""
    unknown = remaining - confirmed.keys()
    assert not unknown, f"messages in the queue that were never published: {sorted(unknown)[:10]}"
    acked = {seq: change for seq, change in confirmed.items() if seq not in remaining}
    missing = [
        (seq, change, table.get(change.mention_id))
        for seq, change in acked.items()
        if (row := table.get(change.mention_id)) is None or row_version(row) < version_key(change)
    ]
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged messages are not committed, e.g. "
        + "; ".join(f"#{seq} {change} vs stored {row}" for seq, change, row in missing[:3])
    )
    return len(acked)
