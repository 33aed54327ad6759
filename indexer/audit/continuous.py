"""The continuous audit inside ``run`` (``INDEXER_AUDIT_INTERVAL_S``): each interval, a random sample
of mentions and of cache entries, checked as the ``audit`` command checks them, into metrics.

Read-only, on connections of its own (never the live path's), and bounded: per interval at most
``INDEXER_AUDIT_SAMPLE`` rows read from each side in windows of 100 consecutive ids (index range
scans), a few more by id for what differs, and as many cache entries drawn from the indexes.  The
read model's watermark is read once, at the first sample (one pass over the table); after that it
is the newest version the live path of this process applied, if that is newer.  Statements time
out after ``STATEMENT_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime

from indexer.audit.caches import CacheAudit
from indexer.audit.mentions import SETTLE_S, MentionAudit, Sides
from indexer.audit.model import CacheResult, MentionResult
from indexer.cache import CacheInspector
from indexer.config import Settings
from indexer.metrics import AuditMetrics
from indexer.readmodel.source import normalized

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_S = 30
_LOGGED_EXAMPLES = 5


class ContinuousAudit:
    """One sample per ``sample()`` call; ``aclose`` when done.  Connections are opened at the
    first sample and again after a failure."""

    def __init__(
        self,
        settings: Settings,
        metrics: AuditMetrics,
        live_watermark: Callable[[], datetime | None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._live_watermark = live_watermark
        self._rng = rng or random.Random()
        self._settle_s = min(SETTLE_S, settings.audit_interval_s / 2) if settings.audit_interval_s else SETTLE_S
        self._sides: Sides | None = None
        self._inspector: CacheInspector | None = None
        self._table_watermark: datetime | None = None
        self._watermark_read = False
        self.samples = 0

    async def sample(self) -> tuple[MentionResult, CacheResult]:
        """Check one sample and record it in the metrics; raises what went wrong (the caller logs
        it, counts it and tries again next interval)."""
        settings = self._settings
        try:
            sides = await self._open()
            if not self._watermark_read:
                self._table_watermark = await sides.model.watermark()
                self._watermark_read = True
            mentions = await MentionAudit(sides, watermark=self._watermark(), settle_s=self._settle_s).sample(
                settings.audit_sample, self._rng
            )
            if self._inspector is None:
                self._inspector = CacheInspector.from_settings(settings)
            caches = await CacheAudit(self._inspector).sample(settings.audit_sample)
        except asyncio.CancelledError:
            await self.aclose()
            raise
        except Exception:
            self._metrics.failures.inc()
            await self.aclose()  # opened again at the next sample
            raise
        self._record(mentions, caches)
        self.samples += 1
        return mentions, caches

    def _watermark(self) -> datetime | None:
        found = [w for w in (self._table_watermark, self._live_watermark()) if w is not None]
        return max(found) if found else None

    async def _open(self) -> Sides:
        if self._sides is None:
            settings = self._settings
            self._sides = await Sides.open(
                database_url=settings.database_url,
                schema=settings.schema_name,
                source_url=settings.source_url,
                query=normalized(settings.audit_source_query),
                organizations=(),
                statement_timeout_s=STATEMENT_TIMEOUT_S,
            )
        return self._sides

    def _record(self, mentions: MentionResult, caches: CacheResult) -> None:
        metrics = self._metrics
        metrics.sampled("read_model", mentions.counts.checked, mentions.counts.by_kind())
        metrics.in_flight.inc(mentions.counts.in_flight)
        metrics.sampled("cache", caches.counts.checked, {"stale": caches.counts.stale})
        differences = [d.line() for d in mentions.differences] + [s.line() for s in caches.stale]
        if differences:
            log.warning(
                "audit: %d of %d sampled mentions and %d of %d sampled cache entries differ; e.g. %s"
                " (`mention-indexer audit --repair` brings them back)",
                mentions.counts.differences,
                mentions.counts.checked,
                caches.counts.stale,
                caches.counts.checked,
                "; ".join(differences[:_LOGGED_EXAMPLES]),
                extra={
                    "audit_mentions_checked": mentions.counts.checked,
                    **{f"audit_{kind}": count for kind, count in mentions.counts.by_kind().items()},
                    "audit_cache_checked": caches.counts.checked,
                    "audit_stale": caches.counts.stale,
                },
            )
        else:
            log.debug(
                "audit: %d sampled mentions and %d sampled cache entries agree (%d in flight)",
                mentions.counts.checked,
                caches.counts.checked,
                mentions.counts.in_flight,
            )

    async def aclose(self) -> None:
        sides, self._sides = self._sides, None
        inspector, self._inspector = self._inspector, None
        try:
            if sides is not None:
                await sides.aclose()
        finally:
            if inspector is not None:
                await inspector.aclose()
