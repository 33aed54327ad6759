"""The store's array literals (``readmodel.arrays``) read back in Postgres as the very values."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from indexer.config import Settings
from indexer.readmodel import arrays

BIGINT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
AWARE = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.one_of(st.just(UTC), OFFSETS)
)
SETTINGS = hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as c:
        yield c


def _read(conn: psycopg.Connection, literal: str, cast: str) -> list[object]:
    row = conn.execute(f"SELECT %s::{cast}", (literal,)).fetchone()
    assert row is not None
    return list(row[0])


@SETTINGS
@given(values=st.lists(st.one_of(st.none(), BIGINT), max_size=40))
def test_bigints_read_back(conn: psycopg.Connection, values: list[int | None]) -> None:
    assert _read(conn, arrays.bigints(values), "bigint[]") == values


@SETTINGS
@given(values=st.lists(st.binary(max_size=40), max_size=40))
def test_byteas_read_back(conn: psycopg.Connection, values: list[bytes]) -> None:
    assert _read(conn, arrays.byteas(values), "bytea[]") == values


@SETTINGS
@given(values=st.lists(st.one_of(st.none(), AWARE), max_size=40))
def test_timestamptzs_read_back_as_the_same_instants(conn: psycopg.Connection, values: list[datetime | None]) -> None:
    # Another session time zone must not move an aware instant.
    conn.execute("SET TIME ZONE 'America/St_Johns'")
    assert _read(conn, arrays.timestamptzs(values), "timestamptz[]") == values


def test_a_value_beyond_bigint_is_refused_by_postgres(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        _read(conn, arrays.bigints([2**63]), "bigint[]")
