"""Invalidation never walks the keyspace and never leaves its organization.

Proved with Redis ACLs rather than server-wide statistics (other processes share the server): the
cache code runs as a user that may not SCAN, KEYS or RANDOMKEY and may only touch the key
patterns given, so any scan, and any key outside them, even from inside a Lua script, fails with
NOPERM.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.exceptions

from indexer import cache
from indexer.cache import AsyncCacheReader, CacheInvalidator, CacheReader
from indexer.config import Settings
from indexer.errors import ConfigError
from tests.support.cache_fixtures import assert_untouched, planted

RestrictedUrl = Callable[[list[str]], str]


@pytest.fixture
def restricted_url(admin: redis.Redis, settings: Settings) -> Iterator[RestrictedUrl]:
    """Makes an ACL user confined to key patterns, without scanning commands; its URL."""
    users: list[str] = []

    def make(patterns: list[str]) -> str:
        name, password = f"{settings.cache_prefix}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        rules = ["on", f">{password}", "resetkeys", *(f"~{p}" for p in patterns)]
        try:
            admin.execute_command("ACL", "SETUSER", name, *rules, "+@all", "-scan", "-keys", "-randomkey")
        except redis.exceptions.ResponseError as exc:
            pytest.skip(f"cannot create ACL users on this Redis: {exc}")
        users.append(name)
        parts = urlsplit(settings.redis_url)
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 6379}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    yield make
    for name in users:
        admin.execute_command("ACL", "DELUSER", name)


def org_patterns(prefix: str, org: int) -> list[str]:
    return [cache.namespace(prefix, org) + "*", cache.index_key(prefix, org), cache.epoch_key(prefix, org)]


@pytest.fixture
async def populated(settings: Settings, admin: redis.Redis) -> AsyncIterator[list[str]]:
    """Orgs 1 and 2 with cached keys, plus foreign keys next to the prefix; the foreign names."""
    prefix = settings.cache_prefix
    async with AsyncCacheReader.from_settings(settings) as reader:
        for org in (1, 2):
            for key in ("a", "b"):
                await reader.get_or_fill(org, key, lambda: b"v")
    with planted(admin, [f"{prefix}x:{{1}}:a", f"{prefix}-other:{{1}}:a"]) as foreign:
        yield foreign


def test_the_restricted_user_is_really_restricted(restricted_url: RestrictedUrl, settings: Settings) -> None:
    with redis.Redis.from_url(restricted_url(org_patterns(settings.cache_prefix, 1))) as client:
        for command in (("SCAN", 0), ("KEYS", "*"), ("RANDOMKEY",), ("GET", f"{settings.cache_prefix}:{{2}}:a")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        # Inside Lua too, including keys not declared in KEYS.
        for script in ("return redis.call('SCAN', '0')", f"return redis.call('GET', '{settings.cache_prefix}:{{2}}:a')"):
            with pytest.raises(redis.exceptions.ResponseError, match="user executing the script"):
                client.eval(script, 0)


async def test_invalidating_one_org_touches_only_that_org(
    restricted_url: RestrictedUrl, settings: Settings, admin: redis.Redis, populated: list[str]
) -> None:
    prefix = settings.cache_prefix
    url = restricted_url(org_patterns(prefix, 1))
    async with CacheInvalidator(url, prefix) as inv:
        await inv.start()
        assert await inv.invalidate([1]) == 2
        # Control: org 2 is out of bounds for this user, so the ACL does bite on this path.
        with pytest.raises(redis.exceptions.NoPermissionError):
            await inv.invalidate([2])
    assert admin.exists(cache.data_key(prefix, 1, "a"), cache.data_key(prefix, 1, "b")) == 0
    assert admin.exists(cache.data_key(prefix, 2, "a"), cache.data_key(prefix, 2, "b")) == 2
    assert_untouched(admin, populated)


async def test_invalidate_all_scans_only_its_registry(
    restricted_url: RestrictedUrl, settings: Settings, admin: redis.Redis, populated: list[str]
) -> None:
    prefix = settings.cache_prefix
    async with CacheInvalidator(restricted_url([f"{prefix}:*"]), prefix) as inv:
        await inv.start()
        assert await inv.invalidate_all() == 4
    assert_untouched(admin, populated)


async def test_readers_touch_only_their_org_and_the_registry(
    restricted_url: RestrictedUrl, settings: Settings
) -> None:
    prefix = settings.cache_prefix
    url = restricted_url([*org_patterns(prefix, 1), cache.registry_key(prefix)])
    async with AsyncCacheReader(url, prefix) as reader:
        assert await reader.get_or_fill(1, "k", lambda: b"async") == b"async"
    with CacheReader(url, prefix) as sync_reader:
        assert sync_reader.get_or_fill(1, "k", lambda: b"sync") == b"async"


def test_a_fill_that_cannot_reach_redis_still_returns_the_loaded_value(
    restricted_url: RestrictedUrl, settings: Settings, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = settings.cache_prefix
    url = restricted_url([*org_patterns(prefix, 1), cache.registry_key(prefix)])
    user = urlsplit(url).username

    def loader() -> bytes:
        # Redis turns this reader away between its read and its fill.
        admin.execute_command("ACL", "SETUSER", user, "off")
        admin.execute_command("CLIENT", "KILL", "USER", user)
        return b"loaded"

    with CacheReader(url, prefix) as reader, caplog.at_level(logging.WARNING, logger="indexer.cache"):
        assert reader.get_or_fill(1, "k", loader) == b"loaded"
    assert admin.exists(cache.data_key(prefix, 1, "k")) == 0
    assert "cache fill skipped" in caplog.text
    assert urlsplit(url).password not in caplog.text


async def test_key_tracking_needs_permissions_auto_falls_back_on_refuses(
    restricted_url: RestrictedUrl, settings: Settings, admin: redis.Redis, populated: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No SCAN (and, with Redis 7's default acl-pubsub-default, no channels): the key tracker
    # cannot run, so ``auto`` invalidates what the helpers indexed and ``on`` is a config error.
    prefix = settings.cache_prefix
    url = restricted_url([f"{prefix}:*"])
    async with CacheInvalidator(url, prefix) as inv:
        with caplog.at_level(logging.WARNING, logger="indexer.cache.tracker"):
            await inv.start()
            assert await inv.invalidate([1]) == 2
            assert await inv.invalidate_all() == 2
        assert inv.tracker.active is False
    assert caplog.text.count("cannot track keys written directly") == 1
    async with CacheInvalidator(url, prefix, track_direct_keys="on") as inv:
        with pytest.raises(ConfigError, match="INDEXER_TRACK_DIRECT_KEYS=on") as info:
            await inv.start()
    assert urlsplit(url).password not in str(info.value)
    assert_untouched(admin, populated)
