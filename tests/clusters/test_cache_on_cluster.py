"""The caches on a Redis Cluster (3 primaries, 3 replicas): invalidation of organizations in every
slot range, keys written directly on every primary (the tracker on each), ``invalidate_all``, the
reader helper from a replica's URL and from a cluster client, and invalidations that survive a
failover (``min_replicas``).  Without cluster support every one of these fails: a plain client on
one node gets MOVED for two organizations in three."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from indexer.cache import AsyncCacheReader, CacheInvalidator, CacheReader, data_key, epoch_key, stored_value
from indexer.cache.cluster_tracker import ClusterKeyTracker
from indexer.changes import Kind
from indexer.config import Settings
from indexer.errors import Unavailable
from indexer.ingest import wire
from tests.support import clusters
from tests.support.amqp import publish_raw
from tests.support.cache_fixtures import retrying
from tests.support.clusters import RedisCluster, RedisNode
from tests.support.service import acknowledged, change_body, running
from tests.support.store import change
from tests.support.waiting import eventually

ORGS = list(range(1, 201))


@pytest.fixture
def prefix(unique: str) -> str:
    return f"{unique}-mentions"


@pytest.fixture
def admin(redis_nodes: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """A cluster client, as another service would use (bytes)."""
    client = redis_nodes.client(decode_responses=False)
    yield client
    client.close()


def a_replica(cluster: RedisCluster) -> RedisNode:
    return next(n for n in cluster.nodes if n.role == "replica" and not n.failed)


def org_on(cluster: RedisCluster, prefix: str, primary: RedisNode, skip: int = 0) -> int:
    """An organization whose slot ``primary`` holds."""
    found = [org for org in range(1, 10_000) if primary.owns(key_slot(epoch_key(prefix, org).encode()))]
    return found[skip]


@pytest.fixture
async def invalidator(redis_nodes: RedisCluster, prefix: str) -> AsyncIterator[CacheInvalidator]:
    # From a replica's URL: any node is a way in.
    async with CacheInvalidator(a_replica(redis_nodes).url, prefix) as inv:
        await inv.start()
        yield inv


async def test_invalidation_reaches_every_slot_range(
    redis_nodes: RedisCluster, prefix: str, invalidator: CacheInvalidator, admin: redis.cluster.RedisCluster
) -> None:
    primaries = redis_nodes.primaries_now()
    assert invalidator.cluster is True
    assert isinstance(invalidator.tracker, ClusterKeyTracker)
    assert invalidator.tracker.active is True
    assert sorted(invalidator.tracker.nodes) == sorted(f"127.0.0.1:{p.port}" for p in primaries)
    by_primary = {p.port: [o for o in ORGS if p.owns(key_slot(epoch_key(prefix, o).encode()))] for p in primaries}
    assert all(len(orgs) > 30 for orgs in by_primary.values()), {k: len(v) for k, v in by_primary.items()}

    async with AsyncCacheReader(primaries[0].url, prefix) as reader:  # auto: detects the cluster
        for org in ORGS:
            await reader.get_or_fill(org, "list", lambda org=org: f"v{org}")
        assert reader.cluster is True
    direct = [data_key(prefix, org, "direct") for org in ORGS[::5]]
    for name in direct:
        admin.set(name, b"written directly")
    other = f"{prefix}x:{{7}}:list"  # another prefix: never touched
    admin.set(other, b"keep")
    try:
        filled = [data_key(prefix, org, "list") for org in ORGS]
        assert admin.exists(*filled) == len(filled)
        deleted = await invalidator.invalidate(ORGS)
        assert deleted == len(filled) + len(direct)
        assert admin.exists(*filled, *direct) == 0
        assert admin.get(other) == b"keep"
    finally:
        admin.delete(other)


async def test_direct_keys_on_every_primary_and_invalidate_all(
    redis_nodes: RedisCluster, prefix: str, admin: redis.cluster.RedisCluster
) -> None:
    primaries = redis_nodes.primaries_now()
    before = {p.port: data_key(prefix, org_on(redis_nodes, prefix, p, 0), "before") for p in primaries}
    for name in before.values():  # written while no indexer ran: adopted by each primary's SCAN
        admin.set(name, b"old")
    async with CacheInvalidator(primaries[1].url, prefix) as inv:
        await inv.start()
        # Notifications were switched on on every primary.
        for p in primaries:
            reply = clusters.redis_command(p.port, "CONFIG", "GET", "notify-keyspace-events")
            flags = reply["notify-keyspace-events"] if isinstance(reply, dict) else reply[1]
            assert "K" in flags and "n" in flags, (p.port, flags)
        only_direct = {p.port: org_on(redis_nodes, prefix, p, 1) for p in primaries}  # never through the helper
        after = {port: data_key(prefix, org, "after") for port, org in only_direct.items()}
        for name in after.values():
            admin.set(name, b"new")
        async with AsyncCacheReader(primaries[2].url, prefix) as reader:
            await reader.get_or_fill(3, "helper", lambda: b"filled")
        deleted = await inv.invalidate_all()
        assert deleted >= len(before) + len(after) + 1
        assert admin.exists(*before.values(), *after.values(), data_key(prefix, 3, "helper")) == 0
        registered = {int(m) for m in admin.smembers(f"{prefix}:orgs")}
        assert set(only_direct.values()) <= registered


async def test_reader_from_a_replica_url_and_from_cluster_clients(
    redis_nodes: RedisCluster, prefix: str, invalidator: CacheInvalidator
) -> None:
    loads: list[int] = []

    def loader(org: int) -> bytes:
        loads.append(org)
        return f"fresh {org}".encode()

    orgs = ORGS[:30]
    with CacheReader(a_replica(redis_nodes).url, prefix) as from_url:
        assert [from_url.get_or_fill(o, "k", lambda o=o: loader(o)) for o in orgs] == [f"fresh {o}".encode() for o in orgs]
        assert from_url.cluster is True
    assert loads == orgs
    client = redis_nodes.client(decode_responses=False)
    try:
        with CacheReader(client, prefix) as from_client:
            assert [from_client.get_or_fill(o, "k", lambda o=o: loader(o)) for o in orgs] == [
                f"fresh {o}".encode() for o in orgs
            ]
        assert loads == orgs  # served, not loaded again
        aclient = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=redis_nodes.ports[0])
        async with AsyncCacheReader(aclient, prefix) as from_async:
            assert await from_async.get_or_fill(orgs[0], "k", lambda: loader(-1)) == f"fresh {orgs[0]}".encode()
            await invalidator.invalidate(orgs)
            assert await from_async.get_or_fill(orgs[0], "k", lambda: b"after") == b"after"
        await aclient.aclose()
        with CacheReader(client, prefix) as from_client:
            assert from_client.get_or_fill(orgs[1], "k", lambda: b"after") == b"after"
    finally:
        client.close()


async def test_invalidation_with_min_replicas_survives_a_failover(
    redis_nodes: RedisCluster, prefix: str, admin: redis.cluster.RedisCluster
) -> None:
    primary = redis_nodes.primaries_now()[0]
    orgs = [org_on(redis_nodes, prefix, primary, i) for i in range(50)]
    async with AsyncCacheReader(primary.url, prefix) as reader:
        for org in orgs:
            await reader.get_or_fill(org, "list", lambda: b"before the commit")
    keys = [data_key(prefix, org, "list") for org in orgs]
    assert admin.exists(*keys) == len(keys)
    async with CacheInvalidator(primary.url, prefix, min_replicas=1) as inv:
        await inv.start()
        t0 = time.monotonic()
        assert await inv.invalidate(orgs) == len(keys)
        waited_s = time.monotonic() - t0
        redis_nodes.kill(primary)  # at once: only WAIT stands between the delete and its loss
        failover_s = redis_nodes.wait_failover(primary)
        clusters.record_timing("cache: invalidate 50 orgs with WAIT 1", waited_s)
        clusters.record_timing("cache: failover after kill -9 of a primary", failover_s)
        promoted = redis_nodes.primary_for(epoch_key(prefix, orgs[0]))
        assert promoted.port != primary.port
        # Gone on the promoted replica ...
        assert sum(clusters.redis_command(promoted.port, "EXISTS", key) for key in keys) == 0
        # ... and never served by the helper: every read loads.
        with CacheReader(redis_nodes.client(decode_responses=False), prefix) as helper:
            loaded: list[int] = []
            for org in orgs:
                got = helper.get_or_fill(org, "list", lambda org=org: loaded.append(org) or b"after the commit")
                assert got == b"after the commit"
            assert loaded == orgs
        # TriggerCacheRefresh for all after the failover: the tracker follows the promoted primary,
        # so a key written there directly now is invalidated too.
        direct = data_key(prefix, orgs[1], "direct")
        t1 = time.monotonic()
        admin.set(direct, b"written after the failover")

        async def short_of_replicas() -> bool:  # the promoted primary has no replica yet
            try:
                await inv.invalidate_all()
            except Unavailable as exc:
                return "reached 0 replica(s)" in str(exc)
            return False

        await eventually(short_of_replicas, timeout_s=20)
        redis_nodes.start(primary)  # rejoins as a replica of the promoted one
        deleted, unavailable = await retrying(inv.invalidate_all, within_s=30)
        clusters.record_timing(f"cache: invalidate_all after the failover ({unavailable} retries)", time.monotonic() - t1)
        assert isinstance(inv.tracker, ClusterKeyTracker)
        assert f"127.0.0.1:{promoted.port}" in inv.tracker.nodes
        assert f"127.0.0.1:{primary.port}" not in inv.tracker.nodes
        assert deleted >= 0  # the attempts short of replicas deleted already; only WAIT failed
        assert admin.exists(direct, *keys) == 0


async def test_min_replicas_unavailable_while_the_replica_is_down(
    redis_nodes: RedisCluster, prefix: str
) -> None:
    primary, other = redis_nodes.primaries_now()[:2]
    (replica,) = redis_nodes.replicas_of(primary)
    org, elsewhere = org_on(redis_nodes, prefix, primary), org_on(redis_nodes, prefix, other)
    async with CacheInvalidator(other.url, prefix, min_replicas=1, track_direct_keys="off") as inv:
        assert await inv.invalidate([org, elsewhere]) == 0
        redis_nodes.kill(replica)
        with pytest.raises(Unavailable, match="reached 0 replica"):
            await inv.invalidate([org])
        with pytest.raises(Unavailable):
            await inv.invalidate([org, elsewhere])  # one primary short: the batch is not done
        assert await inv.invalidate([elsewhere]) == 0  # the other primary still has its replica
    redis_nodes.start(replica)


def _refresh_body(org: str) -> bytes:
    event = wire.build_event(wire.refresh_message())
    event.core.organization_id = org
    return wire.encode(event)


async def test_the_service_invalidates_on_the_cluster(
    redis_nodes: RedisCluster, settings: Settings, admin: redis.cluster.RedisCluster
) -> None:
    node = a_replica(redis_nodes)
    on_cluster = settings.model_copy(update={"redis_url": node.url})
    orgs = [10, 11, 12, 13]
    assert len({redis_nodes.primary_for(epoch_key(settings.cache_prefix, o)).port for o in orgs}) >= 2
    async with AsyncCacheReader(node.url, settings.cache_prefix) as reader:

        async def fill(org: int) -> str:
            await reader.get_or_fill(org, "list", lambda: b"cached")
            return data_key(settings.cache_prefix, org, "list")

        async with running(on_cluster) as service:
            keys = {org: await fill(org) for org in orgs}
            await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [
                change_body(change(Kind.INSERTED, 1, 10, 1)), change_body(change(Kind.INSERTED, 2, 11, 1)),
                change_body(change(Kind.INSERTED, 3, 12, 1)),
            ])
            await acknowledged(service, 3)
            assert [admin.exists(keys[o]) for o in orgs] == [0, 0, 0, 1]
            assert stored_value(admin.get(keys[13]) or b"") == b"cached"
            direct = data_key(settings.cache_prefix, 14, "direct")  # only ever written directly
            admin.set(direct, b"x")
            keys = {org: await fill(org) for org in orgs}
            await publish_raw(settings.amqp_url, settings.exchange, "events.TriggerCacheRefresh", [_refresh_body("")])
            await acknowledged(service, 4)
            assert admin.exists(direct, *keys.values()) == 0
