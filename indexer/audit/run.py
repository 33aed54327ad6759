"""One audit of a scope, and the repair after it: what ``mention-indexer audit`` runs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from indexer.audit.caches import CacheAudit
from indexer.audit.mentions import SETTLE_S, MentionAudit, Sides
from indexer.audit.model import Report
from indexer.audit.repair import Repair, repair
from indexer.cache import CacheInspector, CacheInvalidator
from indexer.config import Settings
from indexer.readmodel.migrate import migrate_async
from indexer.readmodel.source import normalized
from indexer.readmodel.source_run import SourceRun
from indexer.readmodel.store import Store
from indexer.retry import retry_transient


@dataclass(frozen=True, slots=True, kw_only=True)
class Options(SourceRun):
    database_url: str
    settle_s: float = SETTLE_S

    @classmethod
    def from_settings(cls, settings: Settings, query: str | None, organizations: Iterable[int] = ()) -> Options:
        return cls(
            database_url=settings.database_url,
            schema=settings.schema_name,
            source_url=settings.source_url,
            query=query if query is not None else settings.audit_source_query,
            organizations=tuple(sorted(set(organizations))),
            retry_initial_s=settings.retry_initial_s,
            retry_max_s=settings.retry_max_s,
        )


async def audit(options: Options, inspector: CacheInspector) -> Report:
    """The read model against the source, then the caches against the read model, read-only.

    Raises ``ConfigError`` (a bad query, a read model never migrated) or ``Unavailable``."""
    started = time.monotonic()
    sides = await Sides.open(
        database_url=options.database_url,
        schema=options.schema,
        source_url=options.source_url,
        query=normalized(options.query),
        organizations=options.organizations,
    )
    try:
        # The watermark first: whatever the read model applies after it is newer, never missing.
        watermark = await sides.model.watermark()
        mentions = await MentionAudit(sides, watermark=watermark, settle_s=options.settle_s).full()
    finally:
        await sides.aclose()
    caches = await CacheAudit(inspector, options.organizations).full()
    return Report(mentions, caches, time.monotonic() - started)


async def audit_with(options: Options, settings: Settings) -> Report:
    """``audit`` with the cache of ``settings`` (``REDIS_URL``, ``INDEXER_CACHE_PREFIX``)."""
    async with CacheInspector.from_settings(settings) as inspector:
        return await audit(options, inspector)


async def audit_and_repair(
    options: Options, settings: Settings, *, dry_run: bool
) -> tuple[Report, Repair | None, Report | None]:
    """Audit; if anything differs, repair it (or, ``dry_run``, say how) and audit again.

    Returns the first report, the repair (None when nothing differed) and the second report (None
    unless something was repaired)."""
    async with CacheInspector.from_settings(settings) as inspector:
        first = await audit(options, inspector)
        if first.clean:
            return first, None, None
        async with (
            CacheInvalidator.from_settings(settings) as invalidator,
            Store(options.database_url, options.schema) as store,
        ):
            if not dry_run:
                # The repair writes: the read model must be at this version's schema, as for backfill.
                await migrate_async(options.database_url, options.schema)
                # Starts the key tracker (its one SCAN) before the invalidation, as the backfill does.
                await retry_transient(
                    invalidator.start, what="redis", initial_s=options.retry_initial_s, max_s=options.retry_max_s
                )
            done = await repair(first, store, inspector, _Retrying(invalidator, options), dry_run=dry_run)
        if dry_run:
            return first, done, None
        return first, done, await audit(options, inspector)


class _Retrying:
    """Invalidations retried while Redis is away: the repair has committed, they must happen."""

    def __init__(self, invalidator: CacheInvalidator, options: Options) -> None:
        self._invalidator = invalidator
        self._options = options

    async def invalidate(self, orgs: Iterable[int]) -> int:
        unique = sorted(set(orgs))
        return await retry_transient(
            lambda: self._invalidator.invalidate(unique),
            what="redis",
            initial_s=self._options.retry_initial_s,
            max_s=self._options.retry_max_s,
        )
