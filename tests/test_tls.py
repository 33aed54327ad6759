"""TLS to Redis and to Postgres, configured in the URLs alone, against servers the test starts
with certificates it makes; a certificate that does not match is refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from indexer.cache import AsyncCacheReader, CacheInvalidator
from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.errors import Unavailable
from indexer.readmodel.migrate import migrate_async
from indexer.readmodel.store import Store
from tests.support import tls
from tests.support.commands import cli_env
from tests.support.process import Indexer, free_port
from tests.support.service import publish_changes
from tests.support.tables import aread_mentions
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("tls")
    ours, other = tls.authority(folder / "ours"), tls.authority(folder / "other")
    return {
        "ca": ours.ca,
        "other_ca": other.ca,
        "server": ours.server("server"),
        "elsewhere": ours.server("elsewhere", "DNS:db.example.org"),  # right CA, wrong host
        "folder": folder,
    }


@pytest.fixture(scope="module")
def redis_port(certs: dict[str, object]) -> Iterator[int]:
    cert, key = certs["server"]  # type: ignore[misc]
    with tls.redis_tls(certs["folder"], cert, key, certs["ca"]) as port:  # type: ignore[arg-type]
        yield port


@pytest.fixture(scope="module")
def redis_elsewhere_port(certs: dict[str, object]) -> Iterator[int]:
    cert, key = certs["elsewhere"]  # type: ignore[misc]
    with tls.redis_tls(certs["folder"], cert, key, certs["ca"]) as port:  # type: ignore[arg-type]
        yield port


@pytest.fixture(scope="module")
def postgres_port(certs: dict[str, object]) -> Iterator[int]:
    cert, key = certs["server"]  # type: ignore[misc]
    with tls.postgres_tls(cert, key) as port:
        yield port


@pytest.fixture(scope="module")
def postgres_elsewhere_port(certs: dict[str, object]) -> Iterator[int]:
    cert, key = certs["elsewhere"]  # type: ignore[misc]
    with tls.postgres_tls(cert, key) as port:
        yield port


def _rediss(port: int, ca: object) -> str:
    return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"


def _postgres(port: int, ca: object, mode: str = "verify-full") -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode={mode}&sslrootcert={ca}"


async def test_redis_over_tls_invalidates_tracks_and_fills(redis_port: int, certs: dict[str, object], unique: str) -> None:
    url = _rediss(redis_port, certs["ca"])
    async with CacheInvalidator(url, unique) as invalidator, AsyncCacheReader(url, unique) as reader:
        await invalidator.start()  # the key tracker's own connection goes over TLS too
        assert invalidator.tracker.active is True
        assert await reader.get_or_fill(7, "k", lambda: b"v") == b"v"
        assert await invalidator.invalidate([7]) == 1


@pytest.mark.parametrize("case", ["untrusted CA", "other host"])
async def test_redis_refuses_a_certificate_that_does_not_match(
    case: str, redis_port: int, redis_elsewhere_port: int, certs: dict[str, object], unique: str
) -> None:
    url = (_rediss(redis_port, certs["other_ca"]) if case == "untrusted CA"
           else _rediss(redis_elsewhere_port, certs["ca"]))
    async with CacheInvalidator(url, unique) as invalidator:
        with pytest.raises(Unavailable, match="redis unavailable"):
            await invalidator.start()


async def test_postgres_over_tls_with_verify_full(postgres_port: int, certs: dict[str, object], unique: str) -> None:
    url = _postgres(postgres_port, certs["ca"])
    await migrate_async(url, f"{unique}_tls")
    async with Store(url, f"{unique}_tls") as store:
        change = Change(Kind.INSERTED, 1, 2, None, datetime(2026, 1, 1, tzinfo=UTC))
        assert (await store.apply([change])).applied == 1


@pytest.mark.parametrize("case", ["untrusted CA", "other host"])
async def test_postgres_refuses_a_certificate_that_does_not_match(
    case: str, postgres_port: int, postgres_elsewhere_port: int, certs: dict[str, object]
) -> None:
    url = (_postgres(postgres_port, certs["other_ca"]) if case == "untrusted CA"
           else _postgres(postgres_elsewhere_port, certs["ca"]))
    async with Store(url, "public") as store:
        with pytest.raises(Unavailable, match="postgres unavailable") as caught:
            await store.ping()
    assert "certificate" in str(caught.value).lower() or "ssl" in str(caught.value).lower(), caught.value


async def test_run_over_tls_end_to_end(
    postgres_port: int, redis_port: int, certs: dict[str, object], settings: Settings, tmp_path: Path
) -> None:
    database_url, redis_url = _postgres(postgres_port, certs["ca"]), _rediss(redis_port, certs["ca"])
    env = cli_env(settings, DATABASE_URL=database_url, REDIS_URL=redis_url, INDEXER_HTTP_PORT=str(free_port()))
    proc = Indexer(env, tmp_path / "indexer.log")
    try:
        await proc.start_ready()
        at = datetime(2026, 1, 1, tzinfo=UTC)
        await publish_changes(settings, [Change(Kind.INSERTED, n, 5, None, at) for n in (1, 2, 3)])

        async def applied() -> bool:
            return len(await aread_mentions(database_url, settings.schema_name, missing_ok=True)) == 3

        await eventually(applied, what="three rows over TLS")
        assert proc.terminate()[0] == 0
    finally:
        proc.stop()
