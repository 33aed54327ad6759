"""What an audit finds, and how it is told: counts, differences, stale cache entries, examples.

Kinds of difference between the source and the read model, for a mention in scope (docs/audit.md):

* ``missing``: live in the source, absent from the read model or a tombstone there;
* ``extra``: live in the read model, absent from the source or deleted there;
* ``changed``: live in both, with another ``organization_id`` or ``mention_date``.

A source row newer than everything the read model has applied (its ``transaction_timestamp``
after the watermark), or a difference gone when looked at again, is ``in_flight``: the live path
has not applied it yet.  It is counted, never reported as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from indexer.cache import EntryState

KINDS = ("missing", "extra", "changed")
EXAMPLES = 20  # at most this many examples in a report


@dataclass(frozen=True, slots=True)
class Seen:
    """One side's row of a mention: ``indexer.readmodel.checksums.ROW_COLUMNS``."""

    mention_id: int
    organization_id: int | None
    mention_date: datetime | None
    deleted: bool
    transaction_timestamp: datetime | None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> Seen:
        mention_id, organization_id, mention_date, deleted, transaction_timestamp = row
        return cls(int(mention_id), organization_id, mention_date, bool(deleted), transaction_timestamp)

    def as_json(self) -> dict[str, Any]:
        return {
            "organization_id": self.organization_id,
            "mention_date": None if self.mention_date is None else self.mention_date.isoformat(),
            "deleted": self.deleted,
            "transaction_timestamp": None
            if self.transaction_timestamp is None
            else self.transaction_timestamp.isoformat(),
        }


def live(seen: Seen | None) -> bool:
    return seen is not None and not seen.deleted


def difference_kind(source: Seen | None, model: Seen | None) -> str | None:
    """``missing``, ``extra``, ``changed`` or None (they agree)."""
    in_source, in_model = live(source), live(model)
    if in_source and not in_model:
        return "missing"
    if in_model and not in_source:
        return "extra"
    if in_source and in_model:
        assert source is not None and model is not None
        if source.organization_id != model.organization_id or source.mention_date != model.mention_date:
            return "changed"
    return None


def in_flight(source: Seen | None, watermark: datetime | None) -> bool:
    """The source row is newer than the newest version the read model has applied.  Without a
    version (no ``transaction_timestamp`` column) nothing is in flight, and nothing is either in a
    read model that has applied nothing yet (no watermark): all of it is missing."""
    if source is None or source.transaction_timestamp is None or watermark is None:
        return False
    return source.transaction_timestamp > watermark


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str
    mention_id: int
    source: Seen | None
    model: Seen | None
    seen_at: datetime
    """The time of the source snapshot it was last seen in: the version a repair gives it."""

    @property
    def organization_id(self) -> int | None:
        side = self.source if live(self.source) else self.model
        return None if side is None else side.organization_id

    @property
    def organizations(self) -> set[int]:
        """Every organization the mention is in on either side (whose caches a repair invalidates)."""
        return {s.organization_id for s in (self.source, self.model) if s is not None and s.organization_id}

    def detail(self) -> str:
        source, model = self.source, self.model
        if self.kind == "missing":
            return "live in the source, " + ("a tombstone in the read model" if model else "absent from the read model")
        if self.kind == "extra":
            return "live in the read model, " + ("deleted in the source" if source else "absent from the source")
        assert source is not None and model is not None
        parts = []
        if source.organization_id != model.organization_id:
            parts.append(
                f"organization_id {source.organization_id} in the source, {model.organization_id} in the read model"
            )
        if source.mention_date != model.mention_date:
            parts.append(
                f"mention_date {_when(source.mention_date)} in the source, {_when(model.mention_date)} in the read model"
            )
        return "; ".join(parts)

    def example(self) -> dict[str, Any]:
        return {
            "pair": "read_model",
            "kind": self.kind,
            "mention_id": self.mention_id,
            "organization_id": self.organization_id,
            "differs": self.detail(),
            "source": None if self.source is None else self.source.as_json(),
            "read_model": None if self.model is None else self.model.as_json(),
        }

    def line(self) -> str:
        return f"{self.kind:<8} mention {self.mention_id} (organization {self.organization_id}): {self.detail()}"


def _when(value: datetime | None) -> str:
    return "none" if value is None else value.isoformat()


@dataclass(slots=True)
class MentionCounts:
    checked: int = 0
    """Mentions compared: live on at least one side."""
    missing: int = 0
    extra: int = 0
    changed: int = 0
    in_flight: int = 0

    @property
    def differences(self) -> int:
        return self.missing + self.extra + self.changed

    def by_kind(self) -> dict[str, int]:
        return {"missing": self.missing, "extra": self.extra, "changed": self.changed}

    def as_json(self) -> dict[str, int]:
        return {"checked": self.checked, **self.by_kind(), "in_flight": self.in_flight}


@dataclass(slots=True)
class MentionResult:
    counts: MentionCounts = field(default_factory=MentionCounts)
    differences: list[Difference] = field(default_factory=list)

    def add(self, difference: Difference) -> None:
        self.differences.append(difference)
        setattr(self.counts, difference.kind, getattr(self.counts, difference.kind) + 1)


@dataclass(frozen=True, slots=True)
class StaleEntry:
    org: int
    entry: EntryState
    epoch: bytes | None
    """The organization's epoch when the entry was read."""

    @property
    def key(self) -> str:
        return self.entry.key.decode(errors="replace")

    def detail(self) -> str:
        now = "no epoch (evicted)" if self.epoch is None else f"epoch {self.epoch.decode()}"
        recorded = (self.entry.epoch or b"?").decode()
        return f"filled under epoch {recorded}, organization {self.org} is at {now}: it outlived an invalidation"

    def example(self) -> dict[str, Any]:
        return {
            "pair": "cache",
            "kind": "stale",
            "key": self.key,
            "organization_id": self.org,
            "differs": self.detail(),
        }

    def line(self) -> str:
        return f"stale    cache key {self.key} (organization {self.org}): {self.detail()}"


@dataclass(slots=True)
class CacheCounts:
    checked: int = 0
    """Entries filled through the helper, compared with their organization's epoch."""
    stale: int = 0
    unverifiable: int = 0
    """Keys written without the helper: no epoch recorded, nothing to compare."""

    def as_json(self) -> dict[str, int]:
        return {"checked": self.checked, "stale": self.stale, "unverifiable": self.unverifiable}


@dataclass(slots=True)
class CacheResult:
    counts: CacheCounts = field(default_factory=CacheCounts)
    stale: list[StaleEntry] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    read_model: MentionResult
    cache: CacheResult
    elapsed_s: float = 0.0

    @property
    def differences(self) -> int:
        return self.read_model.counts.differences + self.cache.counts.stale

    @property
    def clean(self) -> bool:
        return self.differences == 0

    def examples(self, limit: int = EXAMPLES) -> list[dict[str, Any]]:
        found = [d.example() for d in self.read_model.differences[:limit]]
        return found + [s.example() for s in self.cache.stale[: max(0, limit - len(found))]]

    def as_json(self) -> dict[str, Any]:
        return {
            "read_model": self.read_model.counts.as_json(),
            "cache": self.cache.counts.as_json(),
            "examples": self.examples(),
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def lines(self, limit: int = EXAMPLES) -> list[str]:
        m, c = self.read_model.counts, self.cache.counts
        lines = [
            f"read model: {m.checked} mentions checked: {m.missing} missing, {m.extra} extra, {m.changed} changed"
            f" ({m.in_flight} in flight)",
            f"caches: {c.checked} entries checked: {c.stale} stale"
            f" ({c.unverifiable} unverifiable: written without the helper)",
        ]
        if self.clean:
            lines.append(f"no difference ({self.elapsed_s:.2f} s)")
            return lines
        lines.append(f"{self.differences} difference(s) ({self.elapsed_s:.2f} s):")
        shown = [d.line() for d in self.read_model.differences[:limit]]
        shown += [s.line() for s in self.cache.stale[: max(0, limit - len(shown))]]
        lines += ["  " + line for line in shown]
        if self.differences > len(shown):
            lines.append(f"  … and {self.differences - len(shown)} more")
        return lines
