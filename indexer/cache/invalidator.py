"""The indexer's side of the caches: delete organizations' caches after their changes commit.

On a Redis Cluster (``client``: ``INDEXER_REDIS_CLUSTER``) the organizations are grouped by the
primary that holds their slot, and each primary gets its scripts and then ``WAIT`` on one
connection to it (``cluster.NodeMap``): ``WAIT`` counts the replicas that have that connection's
writes, so only there does ``min_replicas`` mean what it says.  A node that says the slot map
changed (MOVED, ASK, CLUSTERDOWN, TRYAGAIN, READONLY, a lost connection) makes the map be read
again and the call raise ``Unavailable``: the caller retries it, with the new map.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Self

import redis.asyncio
import redis.asyncio.cluster
import redis.exceptions

from indexer.cache.client import AsyncClient, ClusterMode, OwnedAsyncClient
from indexer.cache.cluster import NodeMap
from indexer.cache.cluster_tracker import ClusterKeyTracker
from indexer.cache.errors import as_unavailable, is_topology_change, unavailable
from indexer.cache.keys import check_prefix, epoch_key, fresh_epoch, index_key, namespace, registry_key
from indexer.cache.scripts import INVALIDATE_LUA
from indexer.cache.tracker import KeyTracker, TrackMode
from indexer.errors import Unavailable
from indexer.ids import InvalidId, check_organization_id, parse_id

if TYPE_CHECKING:
    from indexer.config import Settings

log = logging.getLogger(__name__)

_ORGS_PER_PIPELINE = 500  # bounds the size of one round trip in invalidate_all
# On a single server one script invalidates this many organizations: the client's cost per call
# was most of an invalidation (bench/drain.py: 1.18 -> 0.71 s of invalidation in a 50,000-event
# drain), and a bounded call keeps one script from holding Redis for long when organizations
# have many keys.
_ORGS_PER_SCRIPT = 100


class CacheInvalidator(OwnedAsyncClient):
    """Deletes organizations' caches after their changes are committed.

    Every Redis failure that may pass is raised as ``Unavailable``; nothing is retried here.
    Constructed from a URL it owns its client (``aclose`` closes it).

    ``start`` starts the key tracker (``tracker`` module) and waits for it; ``invalidate`` and
    ``invalidate_all`` never run a start themselves: while tracking is not running they begin one
    in the background and raise ``Unavailable``.  With ``on`` they raise ``ConfigError`` if the
    server does not allow tracking.  ``ping`` only asks whether Redis answers.

    ``client`` may be a URL of a single server or of any node of a Redis Cluster (``cluster``),
    or a client: ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``.
    """

    tracker: KeyTracker | ClusterKeyTracker

    def __init__(
        self,
        client: AsyncClient | str,
        prefix: str,
        *,
        track_direct_keys: TrackMode = "auto",
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
        cluster: ClusterMode = "auto",
    ) -> None:
        self._prefix = check_prefix(prefix)
        self._min_replicas = min_replicas
        self._replica_timeout_ms = replica_timeout_ms
        self._track_direct_keys = track_direct_keys
        self._nodes: NodeMap | None = None
        super().__init__(client, cluster=cluster)
        self._bind()

    def _bind(self) -> None:
        self._invalidate = self._client.register_script(INVALIDATE_LUA)
        if isinstance(self._client, redis.asyncio.cluster.RedisCluster):
            self._nodes = NodeMap(self._client, self.url)
            self.tracker = ClusterKeyTracker(self._nodes, self._prefix, self.url, self._track_direct_keys)
        else:
            self.tracker = KeyTracker(self._client, self._prefix, self.url, self._track_direct_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            settings.redis_url,
            settings.cache_prefix,
            track_direct_keys=settings.track_direct_keys,
            min_replicas=settings.redis_min_replicas,
            cluster=settings.redis_cluster,
        )

    async def ping(self) -> None:
        """``Unavailable`` unless Redis answers."""
        client = await self._connected()
        with unavailable(self.url):
            await client.ping()

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
        await self._connected()
        if isinstance(self.tracker, KeyTracker) and self.tracker.active:
            return await self._delete_beside_barrier(self.tracker, unique)
        await self.tracker.barrier()
        return await self._delete(unique)

    async def _delete_beside_barrier(self, tracker: KeyTracker, unique: list[int]) -> int:
        """The deletes and the tracker's barrier at once, one round trip instead of two on every
        batch's path.  A key created before this call whose event the tracker had not read yet may
        be indexed only after the deletes ran: its organization is then invalidated once more,
        after the barrier, when every such key is indexed."""
        with tracker.watching() as indexed_meanwhile:
            deleted, barrier = await asyncio.gather(self._delete(unique), tracker.barrier(), return_exceptions=True)
        for outcome in (barrier, deleted):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(deleted, int)
        again = sorted(indexed_meanwhile.intersection(unique))
        return deleted + (await self._delete(again) if again else 0)

    async def _delete(self, unique: list[int]) -> int:
        if self._nodes is not None:
            return await self._delete_on_cluster(self._nodes, unique)
        assert isinstance(self._client, redis.asyncio.Redis)
        return await self._delete_on(self._client, self.url, unique)

    async def _delete_on_cluster(self, nodes: NodeMap, unique: list[int]) -> int:
        """Per primary, its organizations' scripts and ``WAIT`` on one connection to it (module doc)."""
        try:
            await nodes.ready()
            groups: dict[str, tuple[redis.asyncio.cluster.ClusterNode, list[int]]] = {}
            with unavailable(self.url):
                for org in unique:
                    node = nodes.primary_of(epoch_key(self._prefix, org))
                    groups.setdefault(node.name, (node, []))[1].append(org)
            results = await asyncio.gather(
                *(self._delete_on(nodes.client(node), nodes.url_of(node), chunk) for node, chunk in groups.values()),
                return_exceptions=True,
            )
        except Unavailable:
            await self._map_changed(nodes)
            raise
        failures = [result for result in results if isinstance(result, BaseException)]
        if not failures:
            return sum(result for result in results if isinstance(result, int))
        await self._map_changed(nodes)
        for failure in failures:
            if isinstance(failure, Unavailable):
                raise failure
            if isinstance(failure, redis.exceptions.RedisError) and is_topology_change(failure):
                raise as_unavailable(self.url, failure) from failure
        raise failures[0]

    async def _map_changed(self, nodes: NodeMap) -> None:
        """Read the slot map again now (the retry needs it), and before the tracker's next barrier."""
        if isinstance(self.tracker, ClusterKeyTracker):
            self.tracker.map_changed()
        try:
            await nodes.refresh()
        except Unavailable as exc:
            log.debug("reading the slot map failed: %s", exc)

    async def _delete_on(self, client: redis.asyncio.Redis, url: str, unique: list[int]) -> int:
        # A script's keys must share a slot on a Redis Cluster, and each organization has its own.
        per_script = 1 if self._nodes is not None else _ORGS_PER_SCRIPT
        deleted = 0
        for start in range(0, len(unique), _ORGS_PER_PIPELINE):
            chunk = unique[start : start + _ORGS_PER_PIPELINE]
            calls: list[tuple[list[str], list[str]]] = []
            for first in range(0, len(chunk), per_script):
                keys: list[str] = []
                args: list[str] = []
                for org in chunk[first : first + per_script]:
                    keys += (epoch_key(self._prefix, org), index_key(self._prefix, org))
                    args += (namespace(self._prefix, org), fresh_epoch())
                calls.append((keys, args))
            with unavailable(url):
                if len(calls) == 1 and not self._min_replicas:
                    # One EVALSHA: a pipeline of scripts first asks SCRIPT EXISTS, a round trip more.
                    deleted += await self._invalidate(keys=calls[0][0], args=calls[0][1], client=client)
                    continue
                # Not a transaction: each script is atomic on its own, orgs need not be together.
                async with client.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        await self._invalidate(keys=keys, args=args, client=pipe)
                    if self._min_replicas:
                        # On the same connection, after the deletes: how many replicas have them.
                        pipe.execute_command("WAIT", self._min_replicas, self._replica_timeout_ms)
                    results = await pipe.execute()
            if self._min_replicas:
                replicas = int(results.pop())
                if replicas < self._min_replicas:
                    # A failover now could promote a replica that still serves the deleted entries:
                    # not done, and so not acknowledged; the caller retries it like an outage.
                    raise Unavailable(
                        "redis",
                        url,
                        f"the invalidation reached {replicas} replica(s), INDEXER_REDIS_MIN_REPLICAS is "
                        f"{self._min_replicas}",
                    )
            deleted += sum(results)
        return deleted

    async def invalidate_all(self) -> int:
        """Invalidate every organization in the registry; the number of keys deleted.

        The registry is never shrunk: removing an org is racy against a reader that registered it
        and is about to fill (the fill would then be invisible to the next invalidate_all).  It
        holds one small integer per organization ever cached, and an invalidation of an org without
        keys costs O(1)."""
        client = await self._connected()
        await self.tracker.barrier()  # also registers the orgs of keys written directly
        orgs: set[int] = set()
        with unavailable(self.url):
            async for member in client.sscan_iter(registry_key(self._prefix), count=1000):
                org = _registered_org(member)
                if org is not None:
                    orgs.add(org)
        return await self._delete(sorted(orgs))

    async def aclose(self) -> None:
        await self.tracker.aclose()
        if self._nodes is not None:
            await self._nodes.aclose()
        await super().aclose()


def _registered_org(member: bytes | str) -> int | None:
    """A registry member as an org id; anything else (never written by us) is skipped."""
    try:
        return parse_id(member)
    except InvalidId:
        text = member.decode(errors="replace") if isinstance(member, bytes) else member
        log.warning("ignoring a registry member that is not an organization id: %r", text[:80])
        return None
