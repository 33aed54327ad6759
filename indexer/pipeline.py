"""One batch through the data path: wire → changes → store → cache.  Acknowledging is the caller's.

A step runner over three ports (store, cache, dead letters) given at construction.  Written
against small protocols, not against aio-pika, psycopg or redis, so the order of the steps (dead
letters confirmed, then commit, then invalidate; only then may the caller ack) is visible in one
function and testable without a broker.  Retries, health and metrics are the ports' wrappers'
business (``supervision``): the pipeline never calls back into the service that drives it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from indexer.changes import CacheRefresh, Change
from indexer.errors import Refused, Transient, Undecodable
from indexer.ingest import wire

log = logging.getLogger(__name__)


class Inbound(Protocol):
    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def routing_key(self) -> str: ...


class RejectedByPostgres(Refused):
    """A value the codec let through and Postgres would not store."""

    kind = "rejected_by_postgres"

    def __init__(self, detail: str) -> None:
        super().__init__(f"rejected by postgres: {detail}")


def _letter_fields(delivery: Inbound, refusal: Refused) -> dict[str, object]:
    """What a dead letter's log line carries besides its message (structured logs keep them)."""
    return {
        "reason": refusal.reason,
        "reason_class": refusal.kind,
        "routing_key": delivery.routing_key,
        "event_id": refusal.event_id,
    }


D = TypeVar("D", bound=Inbound)


class ApplyResultLike(Protocol):
    @property
    def applied(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def organizations(self) -> frozenset[int]: ...
    @property
    def duplicate(self) -> int: ...
    @property
    def stale(self) -> int: ...
    @property
    def applied_at(self) -> tuple[datetime, ...]: ...
    @property
    def outbox_ids(self) -> tuple[int, ...]: ...


class StorePort(Protocol):
    async def apply(self, changes: Sequence[Change]) -> ApplyResultLike: ...
    async def settled(self, outbox_ids: Sequence[int]) -> None: ...


class CachePort(Protocol):
    async def invalidate(self, orgs: Iterable[int]) -> int: ...
    async def invalidate_all(self) -> int: ...


D_contra = TypeVar("D_contra", bound=Inbound, contravariant=True)


class DeadLetterPort(Protocol[D_contra]):
    async def dead_letter(self, delivery: D_contra, reason: str) -> None: ...


@dataclass
class BatchOutcome(Generic[D]):
    applied: int = 0
    skipped: int = 0
    duplicate: int = 0
    stale: int = 0
    applied_at: list[datetime] = field(default_factory=list)
    dead_letter_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    trace_contexts: list[dict[str, str]] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)
    """The store's record of the invalidations this batch owes (settled once they are done)."""
    """The producers' trace contexts of the batch's changes (``VtEvent.trace``)."""
    ignored: int = 0
    dead_lettered: int = 0
    refreshes: int = 0
    organizations: set[int] = field(default_factory=set)
    flushed_all: bool = False
    held: list[D] = field(default_factory=list)
    """Deliveries that could not even be dead-lettered: never to be acknowledged."""

    def add(self, result: ApplyResultLike) -> None:
        self.applied += result.applied
        self.skipped += result.skipped
        self.duplicate += result.duplicate
        self.stale += result.stale
        self.applied_at.extend(result.applied_at)
        self.outbox_ids.extend(result.outbox_ids)
        self.organizations |= result.organizations


@dataclass
class _Decoded(Generic[D]):
    changes: list[tuple[Change, D]] = field(default_factory=list)
    refreshes: list[CacheRefresh] = field(default_factory=list)
    ignored: int = 0


class Pipeline(Generic[D]):
    def __init__(
        self, store: StorePort, cache: CachePort, dead_letters: DeadLetterPort[D], *, max_message_bytes: int
    ) -> None:
        self._store = store
        self._cache = cache
        self._dead_letters = dead_letters
        self._max_message_bytes = max_message_bytes

    async def handle(self, batch: Sequence[D]) -> BatchOutcome[D]:
        """Everything but the ack.  When this returns, the whole batch may be acknowledged."""
        outcome: BatchOutcome[D] = BatchOutcome()
        decoded = await self._decode(batch, outcome)
        await self._apply(decoded.changes, outcome)
        outcome.ignored = decoded.ignored
        outcome.refreshes = len(decoded.refreshes)
        for refresh in decoded.refreshes:
            if refresh.organization_id is None:
                outcome.flushed_all = True
            else:
                outcome.organizations.add(refresh.organization_id)
        await self._invalidate(outcome)
        await self._store.settled(outcome.outbox_ids)
        return outcome

    async def _decode(self, batch: Sequence[D], outcome: BatchOutcome[D]) -> _Decoded[D]:
        decoded: _Decoded[D] = _Decoded()
        for delivery in batch:
            try:
                item = wire.decode(delivery.body, delivery.content_type, max_bytes=self._max_message_bytes)
            except Refused as refusal:
                await self._dead_letter(delivery, refusal, outcome)
                continue
            except Exception as exc:  # a codec bug must cost one message, never the consumer
                log.exception("the codec failed on a message; dead-lettering it")
                await self._dead_letter(
                    delivery, Undecodable(f"cannot be decoded: {type(exc).__name__}: {exc}"), outcome
                )
                continue
            if isinstance(item, Change):
                decoded.changes.append((item, delivery))
                if item.trace_context:
                    outcome.trace_contexts.append(item.trace_context)
            elif isinstance(item, CacheRefresh):
                decoded.refreshes.append(item)
            else:
                decoded.ignored += 1
        return decoded

    async def _dead_letter(self, delivery: D, refusal: Refused, outcome: BatchOutcome[D]) -> None:
        reason = refusal.reason
        log.warning("dead-lettering a message: %s", reason, extra=_letter_fields(delivery, refusal))
        try:
            await self._dead_letters.dead_letter(delivery, reason)
        except Transient:
            raise  # the broker or the session: the whole batch waits, nothing is acknowledged
        except Exception:
            # Not even the letter can be written: keep the message (unacknowledged, so the broker
            # has it back when this session ends) and go on with the others.
            log.exception("cannot dead-letter a message (%s); leaving it unacknowledged", reason)
            outcome.held.append(delivery)
            return
        outcome.dead_lettered += 1
        outcome.dead_letter_reasons[refusal.kind] += 1

    async def _apply(self, pairs: list[tuple[Change, D]], outcome: BatchOutcome[D]) -> None:
        if not pairs:
            return
        # The whole batch, not coalesced: the store folds it per field (an older change may carry
        # a field the newest one left out) and reports every organization any of them names.
        try:
            result = await self._store.apply([change for change, _ in pairs])
        except Refused:
            # Postgres refused a value the codec let through: find the culprits one by one, so one
            # bad change never holds back or dead-letters the good ones.
            for change, delivery in pairs:
                try:
                    outcome.add(await self._store.apply([change]))
                except Refused as refusal:
                    await self._dead_letter(delivery, RejectedByPostgres(refusal.reason), outcome)
            return
        outcome.add(result)

    async def _invalidate(self, outcome: BatchOutcome[D]) -> None:
        if outcome.organizations:
            await self._cache.invalidate(sorted(outcome.organizations))
        if outcome.flushed_all:
            await self._cache.invalidate_all()
