"""A batch of changes folded into one write per mention: the row's last-writer-wins registers.

A mention's row holds three registers, each the value of the highest-version change (``indexer.changes``)
among some of its changes:

* the row itself (``deleted``, ``change_kind``, ``transaction_timestamp``): every change;
* ``organization_id``: the changes that carried an organization (a Delete may leave it out;
  0, protobuf's "not set", counts as left out);
* ``mention_date``: the changes that carried a date.

That is what applying every change in version order gives when a change leaves the fields it
omits as they are, so the result is independent of delivery order, duplicates and batching.  A
stale change can therefore still fill a field that every newer change left out.

Each register keeps its version (``changes.version_bytes``), ``b""`` when no change carried the
field: empty bytes sort below every version, so the store's guard is a plain ``>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from indexer.changes import Change, Kind, version_bytes

NOT_CARRIED = b""
"""Version of a register that no change has written yet."""


@dataclass(frozen=True, slots=True)
class RowWrite:
    """What a batch has to say about one mention."""

    mention_id: int
    version: bytes
    transaction_timestamp: datetime
    kind: Kind
    organization_id: int | None
    organization_version: bytes
    mention_date: datetime | None
    mention_date_version: bytes


def carries_organization(change: Change) -> bool:
    return bool(change.organization_id)  # None and 0 both mean "not set"


def fold(changes: Iterable[Change]) -> list[RowWrite]:
    """One ``RowWrite`` per mention, ordered by mention_id (the order rows are locked in).

    Raises ``ValueError`` for a change whose version cannot be encoded (organization beyond int64).
    """
    row: dict[int, tuple[bytes, Change]] = {}
    organization: dict[int, tuple[bytes, int]] = {}
    date: dict[int, tuple[bytes, datetime]] = {}
    for change in changes:
        version = version_bytes(change)
        mention_id = change.mention_id
        if mention_id not in row or version > row[mention_id][0]:
            row[mention_id] = (version, change)
        if carries_organization(change) and (mention_id not in organization or version > organization[mention_id][0]):
            organization[mention_id] = (version, change.organization_id)  # type: ignore[assignment]
        if change.mention_date is not None and (mention_id not in date or version > date[mention_id][0]):
            date[mention_id] = (version, change.mention_date)
    writes = []
    for mention_id in sorted(row):
        version, newest = row[mention_id]
        organization_version, organization_id = organization.get(mention_id, (NOT_CARRIED, None))
        date_version, mention_date = date.get(mention_id, (NOT_CARRIED, None))
        writes.append(
            RowWrite(
                mention_id=mention_id,
                version=version,
                transaction_timestamp=newest.transaction_timestamp,
                kind=newest.kind,
                organization_id=organization_id,
                organization_version=organization_version,
                mention_date=mention_date,
                mention_date_version=date_version,
            )
        )
    return writes
