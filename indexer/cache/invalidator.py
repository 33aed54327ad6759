"""The indexer's side of the caches: delete organizations' caches after their changes commit."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Self

import redis.asyncio

from indexer.cache.client import OwnedAsyncClient
from indexer.cache.errors import unavailable
from indexer.cache.keys import check_prefix, epoch_key, fresh_epoch, index_key, namespace, registry_key
from indexer.cache.scripts import INVALIDATE_LUA
from indexer.cache.tracker import KeyTracker, TrackMode
from indexer.ids import InvalidId, check_organization_id, parse_id

if TYPE_CHECKING:
    from indexer.config import Settings

log = logging.getLogger(__name__)

_ORGS_PER_PIPELINE = 500  # bounds the size of one round trip in invalidate_all


class CacheInvalidator(OwnedAsyncClient):
    """Deletes organizations' caches after their changes are committed.

    Every Redis failure that may pass is raised as ``Unavailable``; nothing is retried here.
    Constructed from a URL it owns its client (``aclose`` closes it).

    ``start`` starts the key tracker (``tracker`` module) and waits for it; ``invalidate`` and
    ``invalidate_all`` never run a start themselves: while tracking is not running they begin one
    in the background and raise ``Unavailable``.  With ``on`` they raise ``ConfigError`` if the
    server does not allow tracking.  ``ping`` only asks whether Redis answers.
    """

    def __init__(
        self, client: redis.asyncio.Redis | str, prefix: str, *, track_direct_keys: TrackMode = "auto"
    ) -> None:
        super().__init__(client)
        self._prefix = check_prefix(prefix)
        self._invalidate = self._client.register_script(INVALIDATE_LUA)
        self.tracker = KeyTracker(self._client, self._prefix, self.url, track_direct_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.cache_prefix, track_direct_keys=settings.track_direct_keys)

    async def ping(self) -> None:
        """``Unavailable`` unless Redis answers."""
        with unavailable(self.url):
            await self._client.ping()

    async def start(self) -> None:
        """Redis answers and the key tracker runs (started here if it does not, and waited for)."""
        await self.ping()
        await self.tracker.start()
        await self.tracker.barrier()

    async def invalidate(self, orgs: Iterable[int]) -> int:
        """Delete every cached key of each organization (each once); the number of keys deleted.

        All ids are validated before anything is deleted.  Idempotent, so a failed call is simply
        made again."""
        unique = sorted({check_organization_id(org) for org in orgs})
        await self.tracker.barrier()
        return await self._delete(unique)

    async def _delete(self, unique: list[int]) -> int:
        deleted = 0
        for start in range(0, len(unique), _ORGS_PER_PIPELINE):
            chunk = unique[start : start + _ORGS_PER_PIPELINE]
            with unavailable(self.url):
                # Not a transaction: each script is atomic on its own slot, orgs need not be.
                async with self._client.pipeline(transaction=False) as pipe:
                    for org in chunk:
                        await self._invalidate(
                            keys=[epoch_key(self._prefix, org), index_key(self._prefix, org)],
                            args=[namespace(self._prefix, org), fresh_epoch()],
                            client=pipe,
                        )
                    deleted += sum(await pipe.execute())
        return deleted

    async def invalidate_all(self) -> int:
        """Invalidate every organization in the registry; the number of keys deleted.

        The registry is never shrunk: removing an org is racy against a reader that registered it
        and is about to fill (the fill would then be invisible to the next invalidate_all).  It
        holds one small integer per organization ever cached, and an invalidation of an org without
        keys costs O(1)."""
        await self.tracker.barrier()  # also registers the orgs of keys written directly
        orgs: set[int] = set()
        with unavailable(self.url):
            async for member in self._client.sscan_iter(registry_key(self._prefix), count=1000):
                org = _registered_org(member)
                if org is not None:
                    orgs.add(org)
        return await self._delete(sorted(orgs))

    async def aclose(self) -> None:
        await self.tracker.aclose()
        await super().aclose()


def _registered_org(member: bytes | str) -> int | None:
    """A registry member as an org id; anything else (never written by us) is skipped."""
    try:
        return parse_id(member)
    except InvalidId:
        text = member.decode(errors="replace") if isinstance(member, bytes) else member
        log.warning("ignoring a registry member that is not an organization id: %r", text[:80])
        return None
