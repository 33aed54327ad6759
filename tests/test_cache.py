"""Per-organization caches on the real Redis: layout, invalidation, the fill helper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInvalidator, CacheReader
from indexer.config import Settings
from indexer.errors import Unavailable
from tests.support.cache_fixtures import assert_untouched, planted


class Loader:
    """A loader standing in for a database read; counts its calls."""

    def __init__(self, value: bytes | str = b"v") -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> bytes | str:
        self.calls += 1
        return self.value


@pytest.fixture
def sync_reader(settings: Settings) -> Iterator[CacheReader]:
    with CacheReader.from_settings(settings) as r:
        yield r


@pytest.fixture
def foreign_keys(admin: redis.Redis, prefix: str) -> Iterator[list[str]]:
    """Keys that look like cache keys but are outside every namespace of ``prefix``."""
    names = [
        f"{prefix}-other:{{1}}:x",  # another prefix that starts like ours
        f"{prefix}x:{{1}}:y",
        f"{prefix}:{{1}}x",  # the org's tag without the namespace's colon
        f"{prefix}:{{1",
    ]
    with planted(admin, names):
        yield names


# ---- layout and validation ----------------------------------------------------------------------


def test_key_layout() -> None:
    assert cache.namespace("p", 7) == "p:{7}:"
    assert cache.data_key("p", 7, "a:b {c}") == "p:{7}:a:b {c}"
    assert cache.index_key("p", 7) == "p:idx:{7}"
    assert cache.epoch_key("p", 7) == "p:epoch:{7}"
    assert cache.registry_key("p") == "p:orgs"


# 0 is protobuf's "not set": never an organization, so never a namespace either.
@pytest.mark.parametrize("org", [0, -1, 2**63, True, "1", 1.0, None])
async def test_bad_org_is_refused_before_any_io(org: object) -> None:
    # A closed port: a refusal must come from validation, not from Redis.
    async with AsyncCacheReader("redis://127.0.0.1:1/0", "p") as r, CacheInvalidator("redis://127.0.0.1:1/0", "p") as inv:
        with pytest.raises((TypeError, ValueError)):
            await r.get_or_fill(org, "k", Loader())  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError)):
            await inv.invalidate([1, org])  # type: ignore[list-item]


@pytest.mark.parametrize("key", ["", "a\nb", "a\x00", "x" * 1025, b"k", 3])
def test_bad_key_is_refused(key: object) -> None:
    with CacheReader("redis://127.0.0.1:1/0", "p") as r, pytest.raises((TypeError, ValueError)):
        r.get_or_fill(1, key, Loader())  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "a b", "a*"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        CacheReader("redis://127.0.0.1:1/0", prefix)


@pytest.mark.parametrize("ttl_s", [-1, float("inf"), float("nan"), True])
def test_bad_ttl_is_refused(ttl_s: float) -> None:
    with pytest.raises(ValueError):
        CacheReader("redis://127.0.0.1:1/0", "p", ttl_s=ttl_s)


async def test_invalid_org_list_deletes_nothing(
    reader: AsyncCacheReader, invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    await reader.get_or_fill(1, "k", Loader())
    with pytest.raises(ValueError):
        await invalidator.invalidate([1, -5])
    assert admin.exists(cache.data_key(prefix, 1, "k")) == 1


# ---- get_or_fill --------------------------------------------------------------------------------


async def test_miss_fills_hit_serves_invalidation_refills(reader: AsyncCacheReader, invalidator: CacheInvalidator) -> None:
    first, second = Loader(b"one"), Loader(b"two")
    assert await reader.get_or_fill(1, "k", first) == b"one"
    assert await reader.get_or_fill(1, "k", second) == b"one"
    assert (first.calls, second.calls) == (1, 0)

    assert await invalidator.invalidate([1]) == 1
    assert await reader.get_or_fill(1, "k", second) == b"two"
    assert second.calls == 1


def test_sync_reader_miss_hit_and_invalidation(sync_reader: CacheReader, settings: Settings) -> None:
    first, second = Loader("één"), Loader(b"two")
    assert sync_reader.get_or_fill(3, "k", first) == "één".encode()  # str is stored as UTF-8
    assert sync_reader.get_or_fill(3, "k", second) == "één".encode()
    assert (first.calls, second.calls) == (1, 0)

    async def invalidate() -> int:
        async with CacheInvalidator.from_settings(settings) as inv:
            await inv.start()
            return await inv.invalidate([3])

    assert asyncio.run(invalidate()) == 1
    assert sync_reader.get_or_fill(3, "k", second) == b"two"


async def test_async_reader_accepts_coroutine_loaders(reader: AsyncCacheReader) -> None:
    async def load() -> bytes:
        await asyncio.sleep(0)
        return b"async"

    assert await reader.get_or_fill(1, "k", load) == b"async"
    assert await reader.get_or_fill(1, "k", Loader(b"other")) == b"async"


async def test_sync_and_async_readers_share_entries(reader: AsyncCacheReader, sync_reader: CacheReader) -> None:
    assert sync_reader.get_or_fill(2, "k", Loader(b"from sync")) == b"from sync"
    loader = Loader(b"from async")
    assert await reader.get_or_fill(2, "k", loader) == b"from sync"
    assert loader.calls == 0


async def test_loader_failure_propagates_and_stores_nothing(
    reader: AsyncCacheReader, admin: redis.Redis, prefix: str
) -> None:
    def broken() -> bytes:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        await reader.get_or_fill(1, "k", broken)
    with pytest.raises(TypeError):
        await reader.get_or_fill(1, "k", Loader(42))  # type: ignore[arg-type]
    assert admin.exists(cache.data_key(prefix, 1, "k")) == 0


async def test_ttl_applies_and_index_outlives_its_members(
    settings: Settings, admin: redis.Redis, prefix: str
) -> None:
    async with AsyncCacheReader(settings.redis_url, prefix, ttl_s=100) as r:
        await r.get_or_fill(1, "short", Loader(), ttl_s=10)
        await r.get_or_fill(1, "long", Loader())
        index_ttl_ms = admin.pttl(cache.index_key(prefix, 1))
        assert 0 < admin.pttl(cache.data_key(prefix, 1, "short")) <= 10_000
        assert 10_000 < admin.pttl(cache.data_key(prefix, 1, "long")) <= index_ttl_ms <= 100_000

        await r.get_or_fill(1, "shorter", Loader(), ttl_s=1)  # never shortens the index
        assert admin.pttl(cache.index_key(prefix, 1)) > 10_000

        await r.get_or_fill(1, "forever", Loader(), ttl_s=0)
        assert admin.pttl(cache.data_key(prefix, 1, "forever")) == -1
        assert admin.pttl(cache.index_key(prefix, 1)) == -1
        assert admin.pttl(cache.epoch_key(prefix, 1)) == -1  # the epoch must never expire


async def test_value_missing_from_the_index_is_not_served(
    reader: AsyncCacheReader, settings: Settings, admin: redis.Redis, prefix: str
) -> None:
    # Index lost (eviction) or a key written behind the helper's back where the key tracker does
    # not run (test_cache_direct_keys: where it runs, it indexes such a key): invalidation cannot
    # see it, so the reader must not serve it.
    await reader.get_or_fill(1, "k", Loader(b"old"))
    admin.delete(cache.index_key(prefix, 1))
    admin.set(cache.data_key(prefix, 1, "rogue"), b"rogue")

    fresh = Loader(b"new")
    assert await reader.get_or_fill(1, "k", fresh) == b"new"
    assert await reader.get_or_fill(1, "rogue", fresh) == b"new"
    assert fresh.calls == 2
    async with CacheInvalidator(settings.redis_url, prefix, track_direct_keys="off") as invalidator:
        assert await invalidator.invalidate([1]) == 2  # both are indexed again


# ---- invalidation -------------------------------------------------------------------------------


async def test_invalidate_deletes_exactly_that_orgs_keys(
    reader: AsyncCacheReader,
    invalidator: CacheInvalidator,
    admin: redis.Redis,
    prefix: str,
    foreign_keys: list[str],
) -> None:
    for org in (1, 2, 11):
        for key in ("a", "b:c"):
            await reader.get_or_fill(org, key, Loader(f"{org}/{key}"))
    # A damaged index naming keys outside the namespace must not widen the deletion.
    admin.sadd(cache.index_key(prefix, 1), *foreign_keys)

    assert await invalidator.invalidate([1]) == 2

    assert admin.exists(cache.data_key(prefix, 1, "a"), cache.data_key(prefix, 1, "b:c")) == 0
    assert admin.exists(cache.index_key(prefix, 1)) == 0
    for org in (2, 11):
        # (Stored behind the header that records the epoch they were filled under.)
        assert cache.stored_value(admin.get(cache.data_key(prefix, org, "a"))) == f"{org}/a".encode()
        assert cache.stored_value(admin.get(cache.data_key(prefix, org, "b:c"))) == f"{org}/b:c".encode()
    assert_untouched(admin, foreign_keys)


async def test_invalidate_of_orgs_without_keys(invalidator: CacheInvalidator, admin: redis.Redis, prefix: str) -> None:
    assert await invalidator.invalidate([]) == 0
    assert await invalidator.invalidate([42, 43]) == 0
    # It still moves the epoch on: a fill in flight for that org must not store.
    assert admin.exists(cache.epoch_key(prefix, 42)) == 1


async def test_each_org_is_invalidated_once(
    reader: AsyncCacheReader, invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    await reader.get_or_fill(5, "k", Loader())
    await reader.get_or_fill(6, "k", Loader())
    before = {org: int(admin.get(cache.epoch_key(prefix, org)) or 0) for org in (5, 6)}

    assert await invalidator.invalidate(iter([5, 6, 5, 5, 6])) == 2

    after = {org: int(admin.get(cache.epoch_key(prefix, org)) or 0) for org in (5, 6)}
    assert {org: after[org] - before[org] for org in (5, 6)} == {5: 1, 6: 1}


async def test_invalidate_many_keys_and_many_orgs(
    invalidator: CacheInvalidator, admin: redis.Redis, prefix: str
) -> None:
    # Beyond the script's 1000-key delete chunks and the 500-org pipelines.
    fill = admin.register_script(cache.FILL_LUA)

    def fill_keys(org: int, count: int) -> None:
        admin.set(cache.epoch_key(prefix, org), b"1")
        pipe = admin.pipeline(transaction=False)
        keys = [cache.epoch_key(prefix, org), cache.index_key(prefix, org)]
        for n in range(count):
            fill(keys=[*keys, cache.data_key(prefix, org, f"k{n}")], args=[b"1", b"v", 60_000], client=pipe)
        assert all(pipe.execute())

    fill_keys(1, 2500)
    assert await invalidator.invalidate([1]) == 2500
    assert admin.exists(cache.index_key(prefix, 1)) == 0

    for org in range(1, 1201):
        fill_keys(org, 1)
    assert await invalidator.invalidate(range(1, 1201)) == 1200


async def test_invalidate_all_clears_every_registered_org(
    reader: AsyncCacheReader,
    sync_reader: CacheReader,
    invalidator: CacheInvalidator,
    admin: redis.Redis,
    prefix: str,
    foreign_keys: list[str],
) -> None:
    for org in (1, 2, 3):
        await reader.get_or_fill(org, "a", Loader())
        sync_reader.get_or_fill(org, "b", Loader())
    admin.sadd(cache.registry_key(prefix), b"not-an-org", b"-1")  # never becomes a key name

    assert await invalidator.invalidate_all() == 6

    for org in (1, 2, 3):
        assert admin.exists(cache.data_key(prefix, org, "a"), cache.data_key(prefix, org, "b")) == 0
    loader = Loader()
    await reader.get_or_fill(2, "a", loader)
    assert loader.calls == 1
    assert_untouched(admin, foreign_keys)
    # The registry is kept (see CacheInvalidator.invalidate_all): a second flush finds org 2 again.
    assert await invalidator.invalidate_all() == 1


async def test_invalidate_all_with_empty_registry(invalidator: CacheInvalidator) -> None:
    assert await invalidator.invalidate_all() == 0


async def test_client_passed_in_stays_open(settings: Settings) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        async with CacheInvalidator(client, settings.cache_prefix) as inv:
            await inv.start()
            assert "127.0.0.1" in inv.url or "localhost" in inv.url
        assert await client.ping()
    finally:
        await client.aclose()


# ---- Redis unreachable --------------------------------------------------------------------------

SECRET_URL = "redis://user:s3cret-pw@127.0.0.1:1/0"  # nothing listens on port 1


def assert_unavailable(exc: Unavailable) -> None:
    assert exc.service == "redis"
    assert "s3cret-pw" not in str(exc)
    assert "127.0.0.1:1" in str(exc)


async def test_unreachable_redis_is_unavailable_without_leaking_the_password() -> None:
    started = time.monotonic()
    async with CacheInvalidator(SECRET_URL, "p") as inv:
        for call in (inv.start(), inv.invalidate([1]), inv.invalidate_all()):
            with pytest.raises(Unavailable) as info:
                await call
            assert_unavailable(info.value)
    async with AsyncCacheReader(SECRET_URL, "p") as r:
        with pytest.raises(Unavailable) as info:
            await r.get_or_fill(1, "k", Loader())
        assert_unavailable(info.value)
    with CacheReader(SECRET_URL, "p") as s, pytest.raises(Unavailable) as info:
        s.get_or_fill(1, "k", Loader())
    assert_unavailable(info.value)
    assert time.monotonic() - started < 5  # no retry loop inside: the caller owns the backoff
