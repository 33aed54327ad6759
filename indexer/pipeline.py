"""One batch through the data path: wire → changes → store → cache.  Acknowledging is the caller's.

Written against small protocols, not against aio-pika, psycopg or redis, so the order of the steps
(dead letters confirmed, then commit, then invalidate; only then may the caller ack) is visible in
one function and testable without a broker.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from . import wire
from .changes import CacheRefresh, Change
from .errors import Refused

log = logging.getLogger(__name__)
T = TypeVar("T")


class Inbound(Protocol):
    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...


D = TypeVar("D", bound=Inbound)


class ApplyResultLike(Protocol):
    @property
    def applied(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def organizations(self) -> frozenset[int]: ...


class StorePort(Protocol):
    async def apply(self, changes: Sequence[Change]) -> ApplyResultLike: ...


class CachePort(Protocol):
    async def invalidate(self, orgs: Iterable[int]) -> int: ...
    async def invalidate_all(self) -> int: ...


class DeadLetterPort(Protocol[D]):
    async def dead_letter(self, delivery: D, reason: str) -> None: ...


# Runs one step until it succeeds; the service passes its retry policy, tests pass a plain call.
Retry = Callable[[Callable[[], Awaitable[T]], str], Awaitable[T]]


async def call_once(operation: Callable[[], Awaitable[T]], _service: str) -> T:
    return await operation()


@dataclass
class BatchOutcome:
    applied: int = 0
    skipped: int = 0
    ignored: int = 0
    dead_lettered: int = 0
    refreshes: int = 0
    organizations: set[int] = field(default_factory=set)
    flushed_all: bool = False


@dataclass
class _Decoded:
    changes: list[tuple[Change, Inbound]] = field(default_factory=list)
    refreshes: list[CacheRefresh] = field(default_factory=list)
    ignored: int = 0


class Pipeline:
    def __init__(self, store: StorePort, cache: CachePort, *, max_message_bytes: int, retry: Retry = call_once) -> None:
        self._store = store
        self._cache = cache
        self._max_message_bytes = max_message_bytes
        self._retry = retry

    async def handle(self, batch: Sequence[D], sink: DeadLetterPort[D]) -> BatchOutcome:
        """Everything but the ack.  When this returns, the whole batch may be acknowledged."""
        outcome = BatchOutcome()
        decoded = await self._decode(batch, sink, outcome)
        await self._apply(decoded.changes, sink, outcome)
        outcome.ignored = decoded.ignored
        outcome.refreshes = len(decoded.refreshes)
        for refresh in decoded.refreshes:
            if refresh.organization_id is None:
                outcome.flushed_all = True
            else:
                outcome.organizations.add(refresh.organization_id)
        await self._invalidate(outcome)
        return outcome

    async def _decode(self, batch: Sequence[D], sink: DeadLetterPort[D], outcome: BatchOutcome) -> _Decoded:
        decoded = _Decoded()
        for delivery in batch:
            try:
                item = wire.decode(delivery.body, delivery.content_type, max_bytes=self._max_message_bytes)
            except Refused as refusal:
                await self._dead_letter(delivery, refusal.reason, sink, outcome)
                continue
            if isinstance(item, Change):
                decoded.changes.append((item, delivery))
            elif isinstance(item, CacheRefresh):
                decoded.refreshes.append(item)
            else:
                decoded.ignored += 1
        return decoded

    async def _dead_letter(self, delivery: D, reason: str, sink: DeadLetterPort[D], outcome: BatchOutcome) -> None:
        log.warning("dead-lettering a message: %s", reason)
        await self._retry(lambda: sink.dead_letter(delivery, reason), "rabbitmq")
        outcome.dead_lettered += 1

    async def _apply(self, pairs: list[tuple[Change, Inbound]], sink: DeadLetterPort[D], outcome: BatchOutcome) -> None:
        if not pairs:
            return
        # The whole batch, not coalesced: the store folds it per field (an older change may carry
        # a field the newest one left out) and reports every organization any of them names.
        changes = [change for change, _ in pairs]
        try:
            result = await self._retry(lambda: self._store.apply(changes), "postgres")
        except Refused:
            # Postgres refused a value the codec let through: find the culprits one by one, so one
            # bad change never holds back or dead-letters the good ones.
            await self._apply_one_by_one(pairs, sink, outcome)
            return
        outcome.applied += result.applied
        outcome.skipped += result.skipped
        outcome.organizations |= result.organizations

    async def _apply_one_by_one(
        self, pairs: list[tuple[Change, Inbound]], sink: DeadLetterPort[D], outcome: BatchOutcome
    ) -> None:
        for change, delivery in pairs:
            try:
                result = await self._retry(lambda: self._store.apply([change]), "postgres")
            except Refused as refusal:
                await self._dead_letter(delivery, f"rejected by postgres: {refusal.reason}", sink, outcome)  # type: ignore[arg-type]
                continue
            outcome.applied += result.applied
            outcome.skipped += result.skipped
            outcome.organizations |= result.organizations

    async def _invalidate(self, outcome: BatchOutcome) -> None:
        if outcome.organizations:
            orgs = sorted(outcome.organizations)
            await self._retry(lambda: self._cache.invalidate(orgs), "redis")
        if outcome.flushed_all:
            await self._retry(self._cache.invalidate_all, "redis")
