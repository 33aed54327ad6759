"""The order of one batch's steps, without a broker: dead letters confirmed, commit, invalidate.

The ports are small recording fakes of our own interfaces (not of RabbitMQ, Postgres or Redis,
whose behaviour the service tests cover against the real servers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from indexer.changes import Change, Kind
from indexer.errors import Refused, Unavailable
from indexer.ingest import wire
from indexer.pipeline import Pipeline
from tests.support.clock import T0


@dataclass(frozen=True)
class Msg:
    body: bytes
    content_type: str | None = wire.CONTENT_TYPE
    routing_key: str = "events.MentionInserted"


@dataclass(frozen=True)
class Result:
    applied: int
    skipped: int
    organizations: frozenset[int]
    duplicate: int = 0
    stale: int = 0
    applied_at: tuple[datetime, ...] = ()
    outbox_ids: tuple[int, ...] = ()


@dataclass
class Log:
    steps: list[tuple[str, object]] = field(default_factory=list)


class Store:
    def __init__(self, log: Log, refuse: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.log, self.refuse = log, refuse

    async def apply(self, changes: Sequence[Change]) -> Result:
        ids = sorted(c.mention_id for c in changes)
        if self.refuse & set(ids):
            raise Refused("value out of range")
        self.log.steps.append(("commit", ids))
        return Result(len(ids), 0, frozenset(c.organization_id for c in changes if c.organization_id))

    async def settled(self, outbox_ids: Sequence[int]) -> None:
        if outbox_ids:
            self.log.steps.append(("settle", list(outbox_ids)))


class Cache:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def invalidate(self, orgs: Iterable[int]) -> int:
        self.log.steps.append(("invalidate", sorted(orgs)))
        return 0

    async def invalidate_all(self) -> int:
        self.log.steps.append(("invalidate_all", None))
        return 0


class Sink:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def dead_letter(self, delivery: Msg, reason: str) -> None:
        self.log.steps.append(("dead_letter", reason))


def change(mention_id: int, org: int) -> Msg:
    return Msg(wire.encode(wire.build_event(wire.mention_message(Kind.INSERTED, mention_id, org, None, T0))))


def refresh(org: str) -> Msg:
    return Msg(wire.encode(wire.build_event(wire.refresh_message(), organization_id=org)))


async def test_dead_letters_then_one_commit_then_invalidation_of_every_named_org() -> None:
    log = Log()
    pipeline = Pipeline(Store(log), Cache(log), Sink(log), max_message_bytes=4096)
    outcome = await pipeline.handle([change(1, 10), Msg(b"\xff junk"), change(2, 11), refresh("12")])
    assert [step for step, _ in log.steps] == ["dead_letter", "commit", "invalidate"]
    assert log.steps[1] == ("commit", [1, 2])
    assert log.steps[2] == ("invalidate", [10, 11, 12])
    assert (outcome.applied, outcome.dead_lettered, outcome.refreshes) == (2, 1, 1)


async def test_refresh_of_every_org_flushes_all_after_the_commit() -> None:
    log = Log()
    await Pipeline(Store(log), Cache(log), Sink(log), max_message_bytes=4096).handle([change(1, 10), refresh("")])
    assert [step for step, _ in log.steps] == ["commit", "invalidate", "invalidate_all"]


async def test_a_change_postgres_refuses_is_dead_lettered_alone() -> None:
    log = Log()
    pipeline = Pipeline(Store(log, refuse={2}), Cache(log), Sink(log), max_message_bytes=4096)
    outcome = await pipeline.handle([change(1, 10), change(2, 11), change(3, 12)])
    assert ("dead_letter", "rejected by postgres: value out of range") in log.steps
    assert [ids for step, ids in log.steps if step == "commit"] == [[1], [3]]
    assert outcome.applied == 2 and outcome.dead_lettered == 1
    assert log.steps[-1] == ("invalidate", [10, 12])


async def test_a_failure_nobody_retried_reaches_the_caller_before_any_invalidation() -> None:
    class Down(Store):
        async def apply(self, changes: Sequence[Change]) -> Result:
            raise Unavailable("postgres", "postgresql://u:pw@h/db", "down")

    log = Log()
    with pytest.raises(Unavailable):
        await Pipeline(Down(log), Cache(log), Sink(log), max_message_bytes=4096).handle([change(1, 10)])
    assert log.steps == []  # nothing invalidated, so the caller cannot have a reason to ack
