"""The SQL twin ``<schema>.version_bytes`` (used by the backfill) gives the very bytes of
``indexer.changes.version_bytes`` (used by the live path), so both paths compare alike."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg import sql

from indexer.changes import Change, version_bytes
from indexer.config import Settings
from indexer.readmodel.migrate import migrate
from tests.unit.test_version_bytes import changes


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    migrate(settings.database_url, settings.schema_name)
    with psycopg.connect(settings.database_url, autocommit=True) as c:
        yield c


@hypothesis_settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(changes(), min_size=1, max_size=50))
def test_sql_version_bytes_equals_python(settings: Settings, conn: psycopg.Connection, batch: list[Change]) -> None:
    query = sql.SQL(
        "SELECT {}(t, k, o, d) FROM unnest(%s::timestamptz[], %s::smallint[], %s::bigint[], %s::timestamptz[])"
        " WITH ORDINALITY AS c(t, k, o, d, n) ORDER BY n"
    ).format(sql.Identifier(settings.schema_name, "version_bytes"))
    params = (
        [c.transaction_timestamp for c in batch],
        [int(c.kind) for c in batch],
        [c.organization_id for c in batch],
        [c.mention_date for c in batch],
    )
    in_sql = [row[0] for row in conn.execute(query, params)]
    assert in_sql == [version_bytes(c) for c in batch]
