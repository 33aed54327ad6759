"""Mention changes and the version order every path obeys (SPEC §6). No I/O here.

A change's version is ``(transaction_timestamp, kind, organization_id, mention_date)``:

* later ``transaction_timestamp`` wins;
* on equal timestamps the kind decides, ranked Inserted < Updated < Deleted, so a delete
  committed in the same instant as an update is never undone by it;
* on equal timestamp and kind (two different events claiming the same instant) the contents
  decide: the higher ``organization_id`` wins, then the later ``mention_date`` (a missing date
  ranks lowest).  This tie-break is arbitrary but deterministic and computable by Postgres from the
  stored row alone, so every replica and every delivery order converge on the same row.

Postgres evaluates the same tuple in ``store`` (``ROW(...) > ROW(...)``); ``version_key`` is the
Python twin used to coalesce a batch and by tests as the oracle.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

# Sorts below every real date; used where a change carries no mention_date.
_NO_DATE = datetime.min.replace(tzinfo=timezone.utc)


class Kind(enum.IntEnum):
    """Change kinds; the integer value is the rank used in the version order."""

    INSERTED = 1
    UPDATED = 2
    DELETED = 3

    @property
    def event_name(self) -> str:
        return f"Mention{self.name.capitalize()}"


@dataclass(frozen=True, slots=True)
class Change:
    """One mention change, decoded and validated.

    ``organization_id`` is None only for a Delete whose payload left it out; the store then keeps
    the organization it already has.  ``mention_date`` is None when the change did not carry one;
    the store then keeps the stored date.
    """

    kind: Kind
    mention_id: int
    organization_id: int | None
    mention_date: datetime | None
    transaction_timestamp: datetime
    event_id: str = ""
    trace_context: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.transaction_timestamp.tzinfo is None:
            raise ValueError("transaction_timestamp must be timezone-aware")
        if self.mention_date is not None and self.mention_date.tzinfo is None:
            raise ValueError("mention_date must be timezone-aware")
        if self.organization_id is None and self.kind is not Kind.DELETED:
            raise ValueError(f"{self.kind.event_name} needs an organization_id")

    @property
    def deleted(self) -> bool:
        return self.kind is Kind.DELETED


@dataclass(frozen=True, slots=True)
class CacheRefresh:
    """A TriggerCacheRefresh: one organization, or every organization when ``organization_id`` is None."""

    organization_id: int | None
    event_id: str = ""


VersionKey = tuple[datetime, int, int, datetime]


def version_key(change: Change) -> VersionKey:
    """The total order of SPEC §6 as a sortable tuple (see module docstring for the tie-break)."""
    return (
        change.transaction_timestamp,
        int(change.kind),
        change.organization_id if change.organization_id is not None else -1,
        change.mention_date if change.mention_date is not None else _NO_DATE,
    )


def supersedes(new: Change, old: Change) -> bool:
    """True when ``new`` must replace ``old``; equal versions are duplicates and never replace."""
    return version_key(new) > version_key(old)


def coalesce(changes: Iterable[Change]) -> list[Change]:
    """Keep, per mention, only the change with the highest version; result ordered by mention_id.

    Ordering by mention_id makes concurrent indexers lock rows in the same order, so two batches
    touching the same mentions cannot deadlock each other.
    """
    best: dict[int, Change] = {}
    for change in changes:
        current = best.get(change.mention_id)
        if current is None or supersedes(change, current):
            best[change.mention_id] = change
    return [best[mention_id] for mention_id in sorted(best)]


def touched_organizations(changes: Iterable[Change]) -> set[int]:
    """Organizations named by the changes themselves (the store adds the ones rows moved away from)."""
    return {c.organization_id for c in changes if c.organization_id is not None}
