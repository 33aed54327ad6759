"""Redis replies that pass by themselves are ``Unavailable`` (retried, nothing acknowledged), never
a crash, and never a reason for the key tracker to stop for good.

A Redis server of the test's own is started for the replies that need a server-wide setting (a
BUSY server, NOREPLICAS): the shared one is used by other tests and processes.  Replies that a
single server cannot give for real (cluster and failover states) come from a stub speaking RESP,
so they still go through redis-py's parser and pipeline the way a real reply does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions

from indexer import cache
from indexer.cache import CacheInvalidator
from indexer.errors import ConfigError, Unavailable
from tests.support.cache_fixtures import retrying, tracker_connection
from tests.support.process import free_port
from tests.support.waiting import eventually, eventually_sync

BUSY_MS = 100  # the server answers BUSY once a script has run this long


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    """The URL of a Redis server of this module's own, that answers BUSY after ``BUSY_MS``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: these tests need a Redis server of their own")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--busy-reply-threshold", str(BUSY_MS)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                if process.poll() is not None:
                    pytest.skip("redis-server would not start (Redis >= 7 needed)")
                return False

        eventually_sync(answers, timeout_s=10, interval_s=0.02, what="the module's own redis-server answering")
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def admin(own_redis: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(own_redis)
    yield client
    client.close()


@pytest.fixture
def prefix(unique: str) -> str:
    return f"{unique}-mentions"


_BUSY_LUA = """
local function now() local t = redis.call('TIME'); return tonumber(t[1]) * 1000000 + tonumber(t[2]) end
local start = now()
while now() - start < tonumber(ARGV[1]) * 1000 do end
return 1
"""


@contextlib.contextmanager
def busy(url: str, admin: redis.Redis, seconds: float = 1.5) -> Iterator[None]:
    """A script keeps the server busy: until it ends, every other command is answered BUSY."""
    thread = threading.Thread(target=lambda: redis.Redis.from_url(url).eval(_BUSY_LUA, 0, int(seconds * 1000)))
    thread.start()
    try:

        def busy_now() -> bool:
            try:
                admin.ping()
            except redis.exceptions.ResponseError as exc:
                assert str(exc).startswith("BUSY"), exc
                return True
            return False

        eventually_sync(busy_now, timeout_s=seconds, interval_s=0.01, what="the server busy")
        yield
    finally:
        thread.join()


# ---- the invalidator ----------------------------------------------------------------------------


async def test_busy_server_is_unavailable_then_invalidation_goes_through(
    own_redis: str, admin: redis.Redis, prefix: str
) -> None:
    admin.sadd(cache.index_key(prefix, 1), cache.data_key(prefix, 1, "k"))
    admin.set(cache.data_key(prefix, 1, "k"), b"v")
    async with CacheInvalidator(own_redis, prefix, track_direct_keys="off") as inv:
        await inv.start()
        with busy(own_redis, admin):
            for call in (inv.ping, lambda: inv.invalidate([1]), inv.invalidate_all):
                with pytest.raises(Unavailable, match="BUSY") as info:
                    await call()
                assert info.value.service == "redis"
        assert await inv.invalidate([1]) == 1


async def test_no_replicas_is_unavailable(own_redis: str, admin: redis.Redis, prefix: str) -> None:
    admin.sadd(cache.index_key(prefix, 1), cache.data_key(prefix, 1, "k"))
    admin.set(cache.data_key(prefix, 1, "k"), b"v")
    async with CacheInvalidator(own_redis, prefix, track_direct_keys="off") as inv:
        await inv.start()
        admin.config_set("min-replicas-to-write", 1)  # no replica here: every write is refused
        try:
            with pytest.raises(Unavailable, match="NOREPLICAS"):
                await inv.invalidate([1])
        finally:
            admin.config_set("min-replicas-to-write", 0)
        assert await inv.invalidate([1]) == 1


class StubRedis:
    """Answers like a Redis server, except that PING and EVALSHA get ``reply`` (an error)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readline()
                if not header:
                    return
                args = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2].decode())
                command = args[0].upper()
                if command == "SCRIPT":  # SCRIPT EXISTS sha...: every script is loaded
                    writer.write(f"*{len(args) - 2}\r\n".encode() + b":1\r\n" * (len(args) - 2))
                elif command in ("PING", "EVALSHA"):
                    writer.write(f"-{self.reply}\r\n".encode())
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


TRANSIENT_REPLIES = [
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "NOREPLICAS Not enough good replicas to write.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica.",
    "OOM command not allowed when used memory > 'maxmemory'. script: 0123abcd, on @user_script:30.",
]


@pytest.mark.parametrize("reply", TRANSIENT_REPLIES, ids=lambda reply: reply.split()[0])
async def test_transient_replies_are_unavailable(reply: str) -> None:
    async with StubRedis(reply) as url, CacheInvalidator(url, "p", track_direct_keys="off") as inv:
        for call in (inv.ping, lambda: inv.invalidate([1, 2])):
            with pytest.raises(Unavailable) as info:
                await call()
            assert info.value.service == "redis" and url in str(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        # An ACL that forbids the invalidator its commands: a configuration to fix, said loudly.
        "NOPERM User indexer has no permissions to run the 'evalsha' command",
        # A bug in a script.
        "ERR user_script:1: Script attempted to access nonexistent global variable 'x' script: 0123abcd",
    ],
    ids=["NOPERM", "script-error"],
)
async def test_other_replies_are_errors(reply: str) -> None:
    async with StubRedis(reply) as url, CacheInvalidator(url, "p", track_direct_keys="off") as inv:
        with pytest.raises(redis.exceptions.ResponseError) as info:
            await inv.invalidate([1])
        assert not isinstance(info.value, Unavailable)


def test_reply_codes() -> None:
    assert cache.reply_code(redis.exceptions.ResponseError("BUSY Redis is busy")) == "BUSY"
    in_pipeline = redis.exceptions.ResponseError(
        "Command # 1 (EVALSHA 82cd 1 p:{1}:) of pipeline caused error: ('NOREPLICAS Not enough good replicas',)"
    )
    assert cache.reply_code(in_pipeline) == "NOREPLICAS"
    assert cache.reply_code(redis.exceptions.ResponseError("unknown command 'CONFIG'")) == "ERR"
    assert cache.reply_code(redis.exceptions.NoPermissionError("no permissions", status_code="NOPERM")) == "NOPERM"


# ---- the key tracker ----------------------------------------------------------------------------


@pytest.fixture
async def tracking(own_redis: str, prefix: str) -> AsyncIterator[CacheInvalidator]:
    async with CacheInvalidator(own_redis, prefix, track_direct_keys="auto") as inv:
        await inv.start()
        assert inv.tracker.active is True
        yield inv


async def test_tracker_keeps_tracking_through_a_busy_server(
    tracking: CacheInvalidator, own_redis: str, admin: redis.Redis, prefix: str
) -> None:
    subscribed = tracker_connection(admin, tracking)["id"]
    with busy(own_redis, admin):
        # CONFIG GET and the barrier's PING are answered BUSY: wait, do not give up tracking.
        with pytest.raises(Unavailable, match="BUSY"):
            await tracking.invalidate([42])
        with pytest.raises(Unavailable, match="BUSY"):
            await tracking.start()
    assert tracking.tracker.active is True
    admin.set(f"{prefix}:{{42}}:direct", b"direct")
    assert (await retrying(lambda: tracking.invalidate([42])))[0] == 1
    assert admin.exists(f"{prefix}:{{42}}:direct") == 0
    # The BUSY answer to the barrier's PING did not cost the subscription (nor a SCAN).
    assert tracker_connection(admin, tracking)["id"] == subscribed


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("BUSY Redis is busy running a script."),
        redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"),
        redis.exceptions.ResponseError("something this code has never heard of"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
    ],
    ids=["BUSY", "MASTERDOWN", "unknown-error", "timeout"],
)
async def test_tracker_waits_out_a_reply_that_may_pass(
    tracking: CacheInvalidator, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch,
    error: redis.exceptions.RedisError,
) -> None:
    tracker = tracking.tracker
    real_flags = tracker._flags
    failing = [error, error]  # the barrier's CONFIG GET, then the start's

    async def flags() -> str:
        if failing:
            raise failing.pop()
        return await real_flags()

    monkeypatch.setattr(tracker, "_flags", flags)
    with pytest.raises(Unavailable):
        await tracking.invalidate([42])
    assert tracker.active is True
    admin.set(f"{prefix}:{{42}}:direct", b"direct")
    assert (await retrying(lambda: tracking.invalidate([42])))[0] == 1


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.NoPermissionError("this user has no permissions to run the 'config|get' command"),
        redis.exceptions.ResponseError("unknown command 'CONFIG', with args beginning with: 'GET'"),
        redis.exceptions.ResponseError("unknown subcommand 'GET'. Try CONFIG HELP."),
    ],
    ids=["NOPERM", "unknown-command", "unknown-subcommand"],
)
async def test_tracker_falls_back_only_when_refused_for_good(
    own_redis: str, prefix: str, monkeypatch: pytest.MonkeyPatch, error: redis.exceptions.RedisError
) -> None:
    async def refused() -> str:
        raise error

    async with CacheInvalidator(own_redis, prefix) as inv:
        monkeypatch.setattr(inv.tracker, "_flags", refused)
        await inv.start()
        assert inv.tracker.active is False
    async with CacheInvalidator(own_redis, prefix, track_direct_keys="on") as inv:
        monkeypatch.setattr(inv.tracker, "_flags", refused)
        with pytest.raises(ConfigError, match="INDEXER_TRACK_DIRECT_KEYS=on"):
            await inv.start()


async def test_restart_runs_in_the_background_never_inside_an_invalidation(
    tracking: CacheInvalidator, admin: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = tracking._client
    real_scan_iter = client.scan_iter
    gate = asyncio.Event()
    scans: list[asyncio.Task[Any] | None] = []

    async def gated_scan_iter(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        scans.append(asyncio.current_task())
        await gate.wait()  # a long SCAN of a big keyspace
        async for key in real_scan_iter(*args, **kwargs):
            yield key

    monkeypatch.setattr(client, "scan_iter", gated_scan_iter)
    killed = tracker_connection(admin, tracking)
    assert admin.client_kill_filter(_id=killed["id"]) == 1
    admin.set(f"{prefix}:{{42}}:written-while-down", b"direct")  # its notification is lost

    # The restart begins by itself, as soon as the subscription is lost, before any invalidation.
    async def restarting() -> bool:
        return bool(scans)

    await eventually(restarting, timeout_s=5, interval_s=0.01, what="a restart begun after the subscription was lost")
    # While its SCAN runs, an invalidation does not wait for it: it is unavailable at once.
    for _ in range(3):
        with pytest.raises(Unavailable, match="cache key tracking is starting"):
            await asyncio.wait_for(tracking.invalidate([42]), 1)
    assert len(scans) == 1  # one restart, not one per invalidation
    gate.set()
    assert (await retrying(lambda: tracking.invalidate([42])))[0] == 1
    assert admin.exists(f"{prefix}:{{42}}:written-while-down") == 0
    assert tracker_connection(admin, tracking)["id"] != killed["id"]
    current = asyncio.current_task()
    assert all(task is not current for task in scans)
