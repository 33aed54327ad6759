"""Bring the differences an audit found back, through the version guard, and drop stale entries.

Every difference becomes a change at the time of the source snapshot it was last seen in, applied
by ``Store.apply``: the live path's statement (``indexer.readmodel.merge``), so a live change newer
than that snapshot is never regressed, and one older is already in what the snapshot showed.

* ``missing`` and ``changed``: an Insert with the source's organization and date;
* ``extra``: a Delete (the tombstone keeps the organization), as ``backfill --prune`` does.

Then the stale cache entries are deleted (only if still stale: same header, epoch moved on) and
every organization concerned is invalidated: those of each repaired mention on either side, those
a write moved a mention away from, and those of the stale entries.  A dry run only says so.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from indexer.audit.model import Difference, Report
from indexer.cache import CacheInspector, EntryState
from indexer.changes import Change, Kind
from indexer.errors import Conflict
from indexer.pipeline import ApplyResultLike

log = logging.getLogger(__name__)

_CHANGES_PER_BATCH = 1000
_CONFLICT_ATTEMPTS = 5


class Applier(Protocol):
    async def apply(self, changes: Sequence[Change]) -> ApplyResultLike: ...
    async def settled(self, outbox_ids: Sequence[int]) -> None: ...


class Invalidator(Protocol):
    async def invalidate(self, orgs: Iterable[int]) -> int: ...


@dataclass(slots=True)
class Repair:
    dry_run: bool
    written: int = 0
    """Mentions brought back to the source's state (missing and changed)."""
    tombstoned: int = 0
    """Extras deleted."""
    kept: int = 0
    """Changes the version guard refused: the read model holds a newer version (see docs/audit.md)."""
    unusable: int = 0
    """Source rows a change cannot carry (live without an organization)."""
    dropped: int = 0
    """Stale cache entries deleted."""
    organizations: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "written": self.written,
            "tombstoned": self.tombstoned,
            "kept": self.kept,
            "unusable": self.unusable,
            "dropped_cache_entries": self.dropped,
            "invalidated_organizations": self.organizations,
        }

    def line(self) -> str:
        if self.dry_run:
            head, verbs = "repair (dry run, nothing changed): would ", ("write", "tombstone", "drop", "invalidate")
        else:
            head, verbs = "repair: ", ("wrote", "tombstoned", "dropped", "invalidated")
        text = (
            f"{head}{verbs[0]} {self.written} mention(s) back to the source's state, {verbs[1]} {self.tombstoned}"
            f" extra(s), {verbs[2]} {self.dropped} stale cache entry(ies), {verbs[3]}"
            f" {len(self.organizations)} organization(s)"
        )
        if self.kept:
            text += f"; {self.kept} kept by the version guard (the read model holds a newer version)"
        if self.unusable:
            text += f"; {self.unusable} source row(s) unusable (live without an organization)"
        return text


def changes_for(differences: Iterable[Difference]) -> tuple[list[Change], int]:
    """The changes that repair ``differences``, and how many cannot be made."""
    changes: list[Change] = []
    unusable = 0
    for d in differences:
        if d.kind == "extra":
            changes.append(Change(Kind.DELETED, d.mention_id, None, None, d.seen_at))
        elif d.source is not None and d.source.organization_id:
            source = d.source
            changes.append(Change(Kind.INSERTED, d.mention_id, source.organization_id, source.mention_date, d.seen_at))
        else:
            unusable += 1
    return changes, unusable


async def repair(
    report: Report,
    store: Applier,
    inspector: CacheInspector,
    cache: Invalidator,
    *,
    dry_run: bool,
) -> Repair:
    """Repair what ``report`` found (``dry_run``: only count what would be done)."""
    done = Repair(dry_run)
    differences = report.read_model.differences
    changes, done.unusable = changes_for(differences)
    organizations: set[int] = set()
    for d in differences:
        organizations |= d.organizations
    stale: dict[int, list[EntryState]] = defaultdict(list)
    for entry in report.cache.stale:
        stale[entry.org].append(entry.entry)
        organizations.add(entry.org)
    if dry_run:
        done.tombstoned = sum(1 for change in changes if change.kind is Kind.DELETED)
        done.written = len(changes) - done.tombstoned
        done.dropped = len(report.cache.stale)
        done.organizations = sorted(organizations - {0})
        return done

    owed: list[int] = []  # the store's record of the invalidations the writes owe
    # Deletes and inserts in batches of their own, so the counts tell which was kept.
    for kind in (Kind.INSERTED, Kind.DELETED):
        of_kind = [change for change in changes if change.kind is kind]
        for start in range(0, len(of_kind), _CHANGES_PER_BATCH):
            batch = of_kind[start : start + _CHANGES_PER_BATCH]
            result = await _apply(store, batch)  # one change per mention: applied + skipped = len(batch)
            if kind is Kind.DELETED:
                done.tombstoned += result.applied
            else:
                done.written += result.applied
            done.kept += len(batch) - result.applied
            organizations |= result.organizations
            owed += result.outbox_ids
    for org in sorted(stale):
        done.dropped += await inspector.drop_stale(org, stale[org])
    done.organizations = sorted(organizations - {0})
    if done.organizations:
        await cache.invalidate(done.organizations)
    await store.settled(owed)
    log.info("%s", done.line())
    return done


async def _apply(store: Applier, batch: Sequence[Change]) -> ApplyResultLike:
    for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
        try:
            return await store.apply(batch)
        except Conflict as exc:
            if attempt == _CONFLICT_ATTEMPTS:
                raise
            log.warning("repair batch aborted by postgres (attempt %d), applying it again: %s", attempt, exc)
    raise AssertionError("unreachable")
