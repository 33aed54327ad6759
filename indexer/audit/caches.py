"""The caches against the read model: every entry filled through the helper must have been filled
under its organization's current epoch, that is after the last invalidation, which follows the
last change committed for the organization.  One filled under an older epoch outlived an
invalidation (restored by a failover, a ``RESTORE`` of an old dump): it is ``stale``.  Keys written
without the helper record no epoch: ``unverifiable``.

``full`` walks every data key of the prefix (one SCAN, as the key tracker does when it starts);
``sample`` draws indexed keys at random from the registry and the indexes, the ones a read could
serve, without walking anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable

from indexer.audit.model import CacheResult, StaleEntry
from indexer.cache import CacheInspector, OrgEntries

_BATCH = 1000  # keys held before they are inspected


class CacheAudit:
    def __init__(self, inspector: CacheInspector, organizations: Collection[int] = ()) -> None:
        self._inspector = inspector
        self._organizations = frozenset(organizations)
        self.result = CacheResult()

    async def full(self) -> CacheResult:
        batch: list[tuple[int, bytes]] = []
        async for found in self._inspector.keys(self._organizations):
            batch.append(found)
            if len(batch) >= _BATCH:
                await self._inspect(batch)
                batch = []
        await self._inspect(batch)
        return self.result

    async def sample(self, size: int) -> CacheResult:
        await self._inspect(await self._inspector.sample(size, self._organizations))
        return self.result

    async def _inspect(self, keys: Iterable[tuple[int, bytes]]) -> None:
        by_org: dict[int, list[bytes]] = defaultdict(list)
        for org, key in keys:
            by_org[org].append(key)
        for org in sorted(by_org):
            self._judge(await self._inspector.inspect(org, sorted(set(by_org[org]))))

    def _judge(self, entries: OrgEntries) -> None:
        counts = self.result.counts
        counts.unverifiable += len(entries.unverifiable)
        present = entries.present
        counts.checked += len(present) - len(entries.unverifiable)
        for entry in entries.stale:
            counts.stale += 1
            self.result.stale.append(StaleEntry(entries.org, entry, entries.epoch))
