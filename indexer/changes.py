"""Mention changes and the version order every path obeys (docs/ordering.md). No I/O here.

A change's version is ``(transaction_timestamp, kind, organization_id, mention_date)``:

* later ``transaction_timestamp`` wins;
* on equal timestamps the kind decides, ranked Inserted < Updated < Deleted, so a delete
  committed in the same instant as an update is never undone by it;
* on equal timestamp and kind (two different events claiming the same instant) the contents
  decide: the higher ``organization_id`` wins, then the later ``mention_date`` (a missing date
  ranks lowest).  This tie-break is arbitrary but deterministic and computable by Postgres from the
  stored row alone, so every replica and every delivery order converge on the same row.

``version_key`` is the order as a Python tuple (coalescing, tests' oracles); ``version_bytes`` is
the same order as a byte string that Postgres compares with memcmp, so the store keeps a change's
version in one ``bytea`` column and compares it with ``>`` (and ``greatest``).  The migration
defines the SQL twin ``<schema>.version_bytes(...)`` for versions computed in Postgres (backfill).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# Sorts below every real date; used where a change carries no mention_date.
_NO_DATE = datetime.min.replace(tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_VERSION = struct.Struct(">QHQQ")
_BIAS_64, _BIAS_16 = 1 << 63, 1 << 15


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
    """The version order as a sortable tuple (see module docstring for the tie-break)."""
    return (
        change.transaction_timestamp,
        int(change.kind),
        change.organization_id if change.organization_id is not None else -1,
        change.mention_date if change.mention_date is not None else _NO_DATE,
    )


def version_bytes(change: Change) -> bytes:
    """``version_key`` as 26 bytes whose bytewise (memcmp) order is the ``version_key`` order.

    Each component is a fixed-width big-endian integer with its sign bit flipped (so negatives
    sort first): the transaction timestamp in µs since the Unix epoch (8 bytes), the kind rank
    (2), the organization (8; -1 when absent, as in ``version_key``) and the mention date in µs
    (8; ``datetime.min`` when absent).  Fixed widths make the byte order the tuple order; equal
    keys give equal bytes.  Raises ``ValueError`` for an organization outside int64.
    """
    timestamp, kind, organization, date = version_key(change)
    try:
        # One pack, as it runs for every change the live path applies; the biases flip the signs.
        return _VERSION.pack(
            _microseconds(timestamp) + _BIAS_64,
            kind + _BIAS_16,
            organization + _BIAS_64,
            _microseconds(date) + _BIAS_64,
        )
    except struct.error:
        pass
    # Out of range: the piecewise form says which value does not fit.
    return b"".join(
        (
            _sortable(_microseconds(timestamp), 8),
            _sortable(kind, 2),
            _sortable(organization, 8),
            _sortable(_microseconds(date), 8),
        )
    )


def _microseconds(instant: datetime) -> int:
    return (instant - _EPOCH) // _ONE_US


def _sortable(value: int, width_bytes: int) -> bytes:
    """Two's complement with the sign bit flipped, big-endian: unsigned order == signed order."""
    bias = 1 << (8 * width_bytes - 1)
    if not -bias <= value < bias:
        raise ValueError(f"{value} does not fit in a signed {8 * width_bytes}-bit integer")
    return (value + bias).to_bytes(width_bytes, "big")


def supersedes(new: Change, old: Change) -> bool:
    """True when ``new`` must replace ``old``; equal versions are duplicates and never replace."""
    return version_key(new) > version_key(old)


def coalesce(changes: Iterable[Change]) -> list[Change]:
    """Keep, per mention, only the change with the highest version; result ordered by mention_id.

    Lossy where the kept change leaves out a field a dropped one carried; ``Store.apply`` takes
    the uncoalesced batch and folds it per field itself (``registers.fold``).

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
