"""The backfill against a real Postgres and Redis: rows, versions, reruns, prune, scope, caches."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlencode

import psycopg
import pytest
from psycopg import sql

from indexer.cache import CacheReader
from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.errors import ConfigError
from indexer.ops.backfill.run import source_connection_options
from indexer.readmodel.store import Store
from tests.support.backfill import SourceRow, SourceTable, checkpoints, run_backfill
from tests.support.clock import at
from tests.support.commands import cli_env
from tests.support.process import Result, run_cli
from tests.support.store import Row, change, table
from tests.support.tables import read_mention

INS, UPD, DEL = Kind.INSERTED, Kind.UPDATED, Kind.DELETED
LATER = datetime.now(timezone.utc) + timedelta(days=1)  # after any snapshot of this test run


def rows(count: int, *, org_of: int = 5, version_at: datetime | None = None) -> list[SourceRow]:
    return [SourceRow(i, i % org_of + 1, at(i), version_at) for i in range(1, count + 1)]


async def test_rows_equal_the_source_read_through_renamed_columns(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(250))
    started = datetime.now(timezone.utc)
    report = await run_backfill(settings, source.query(), batch_size=100)
    finished = datetime.now(timezone.utc)
    assert (report.counts.read, report.counts.inserted) == (250, 250)
    got = table(settings)
    assert {i: (r.organization_id, r.mention_date, r.change_kind, r.deleted) for i, r in got.items()} == {
        i: (i % 5 + 1, at(i), INS, False) for i in range(1, 251)
    }
    # Without a version column, a row's version is its chunk's snapshot time.
    assert all(started - timedelta(seconds=1) <= r.transaction_timestamp <= finished for r in got.values())
    assert len({r.transaction_timestamp for r in got.values()}) == 3  # one snapshot per chunk
    (checkpoint,) = checkpoints(settings)
    assert checkpoint["last_mention_id"] == 250 and checkpoint["completed_at"] is not None


async def test_version_and_deleted_columns_are_used(settings: Settings, source: SourceTable) -> None:
    source.insert([SourceRow(1, 7, at(1), at(100)), SourceRow(2, 8, None, at(200), removed=True), SourceRow(3, 9, at(3), None)])
    await run_backfill(settings, source.query(versions=True, deleted=True))
    got = table(settings)
    assert got[1] == Row(7, at(1), at(100), INS, False)
    assert got[2] == Row(8, None, at(200), DEL, True)
    # A NULL version falls back to the snapshot's time.
    assert got[3].transaction_timestamp > at(100) and got[3].organization_id == 9


async def test_newer_live_change_is_not_regressed(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(10))
    async with Store(settings.database_url, settings.schema_name) as store:
        await store.apply(
            [
                Change(UPD, 3, 77, at(33), LATER),
                Change(DEL, 4, None, None, LATER),
                # Older than the snapshot: the source is newer and wins.
                change(UPD, 5, 99, ts_s=1, date_s=9),
            ]
        )
    report = await run_backfill(settings, source.query())
    got = table(settings)
    assert got[3] == Row(77, at(33), LATER, UPD, False)
    # The Delete named neither organization nor date: the older backfilled row fills them in.
    assert got[4] == Row(4 % 5 + 1, at(4), LATER, DEL, True)
    assert (got[5].organization_id, got[5].mention_date, got[5].change_kind) == (5 % 5 + 1, at(5), INS)
    c = report.counts
    assert (c.read, c.inserted, c.updated, c.stale) == (10, 7, 1, 2)


@pytest.mark.parametrize("versions", [False, True], ids=["snapshot-versions", "explicit-versions"])
async def test_second_identical_run_changes_nothing(settings: Settings, source: SourceTable, versions: bool) -> None:
    source.insert(rows(300, version_at=at(1000) if versions else None))
    source.execute("UPDATE {table} SET removed = true WHERE id % 10 = 0")
    query = source.query(versions=versions, deleted=True)
    await run_backfill(settings, query, batch_size=64)
    before = [read_mention(settings.database_url, settings.schema_name, i) for i in range(1, 301)]
    again = await run_backfill(settings, query, batch_size=64)
    c = again.counts
    assert (c.read, c.inserted, c.updated, c.unchanged, c.stale, c.tombstoned) == (300, 0, 0, 300, 0, 0)
    # Not even updated_at moved: nothing was written.
    assert [read_mention(settings.database_url, settings.schema_name, i) for i in range(1, 301)] == before


async def test_prune_tombstones_exactly_the_rows_the_source_lost(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(100))
    await run_backfill(settings, source.query(), batch_size=30)
    source.execute("DELETE FROM {table} WHERE id IN (1, 30, 31, 55, 99, 100)")
    async with Store(settings.database_url, settings.schema_name) as store:
        await store.apply(
            [
                change(INS, 500, 3, ts_s=1),  # only in the read model, older: goes (tail)
                Change(INS, 600, 3, None, LATER),  # newer than the snapshot: stays
            ]
        )
    report = await run_backfill(settings, source.query(), batch_size=30, prune=True)
    got = table(settings)
    assert {i for i, r in got.items() if r.deleted} == {1, 30, 31, 55, 99, 100, 500}
    assert not got[600].deleted
    assert report.counts.tombstoned == 7
    assert got[55].organization_id == 55 % 5 + 1  # a tombstone keeps its organization
    again = await run_backfill(settings, source.query(), batch_size=30, prune=True)
    assert (again.counts.tombstoned, again.counts.updated) == (0, 0)


async def test_prune_within_an_organization_scope_moves_rather_than_deletes(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(40, org_of=2))  # organizations 1 and 2
    await run_backfill(settings, source.query(), batch_size=8)
    source.execute("UPDATE {table} SET org = 3 WHERE id = 9")  # org 2 -> 3: out of the scope
    source.execute("DELETE FROM {table} WHERE id IN (11, 12)")  # orgs 2 and 1
    report = await run_backfill(settings, source.query(), batch_size=8, prune=True, organizations=(2,))
    got = table(settings)
    assert got[9] == Row(3, at(9), got[9].transaction_timestamp, INS, False)
    assert got[11].deleted and not got[12].deleted  # 12 was in organization 1: out of the scope
    # Read: organization 2's 20 rows, less 11 (deleted) and 9 (moved), plus 9 found by the lookup.
    assert (report.counts.read, report.counts.tombstoned, report.counts.updated) == (19, 1, 1)


async def test_dry_run_reports_and_changes_nothing(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(50))
    await run_backfill(settings, source.query())
    source.execute("UPDATE {table} SET org = 42 WHERE id <= 5")
    source.execute("DELETE FROM {table} WHERE id = 50")
    before = table(settings)
    checkpoint_before = checkpoints(settings)
    report = await run_backfill(settings, source.query(), batch_size=20, prune=True, dry_run=True)
    assert (report.counts.updated, report.counts.tombstoned, report.counts.unchanged) == (5, 1, 44)
    assert table(settings) == before and checkpoints(settings) == checkpoint_before


async def test_caches_of_changed_organizations_are_invalidated(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(20, org_of=4))  # organizations 1..4
    await run_backfill(settings, source.query())
    source.execute("UPDATE {table} SET org = 9 WHERE id = 4")  # moves from organization 1 to 9
    loads: list[int] = []
    with CacheReader(settings.redis_url, settings.cache_prefix) as reader:

        def fill(org: int) -> None:
            reader.get_or_fill(org, "listing", lambda: loads.append(org) or b"cached")

        for org in (1, 2, 9):
            fill(org)
        await run_backfill(settings, source.query())
        loads.clear()
        for org in (1, 2, 9):
            fill(org)
    assert sorted(loads) == [1, 9]  # organization 2 did not change: its cache stays


async def test_duplicate_mention_ids_are_a_configuration_error(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(5))
    with pytest.raises(ConfigError, match="more than once"):
        await run_backfill(settings, source.query() + " UNION ALL SELECT 3, 1, NULL")


@pytest.mark.parametrize("tail", [" WHERE 'a%' LIKE '%%' -- a comment", " ;\n"], ids=["percent-comment", "semicolon"])
async def test_query_is_wrapped_as_given(settings: Settings, source: SourceTable, tail: str) -> None:
    source.insert(rows(5))
    assert (await run_backfill(settings, source.query() + tail)).counts.inserted == 5


async def test_resume_without_a_checkpoint_starts_from_the_beginning(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(10))
    assert (await run_backfill(settings, source.query(), resume=True)).counts.inserted == 10
    # A completed run has nothing to continue: --resume starts over.
    assert (await run_backfill(settings, source.query(), resume=True)).counts.read == 10


# ---- through the command line ------------------------------------------------------------------


def cli(settings: Settings, *args: str, source_url: str | None = None) -> Result:
    env = cli_env(settings, SOURCE_DATABASE_URL=source_url or settings.database_url)
    return run_cli(env, "backfill", *args, timeout_s=60)


def test_cli_summary_line(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(12))
    done = cli(settings, "--source-query", source.query(), "--batch-size", "5")
    assert done.code == 0, done.err
    assert done.out.startswith(
        "backfill: read 12, inserted 12, updated 0, unchanged 0, stale-skipped 0, tombstoned 0; "
    )
    assert "rows/s" in done.out


@pytest.mark.parametrize(
    "query, message",
    [
        ("SELECT id AS mention_id, org AS organization_id FROM {schema}.posts", "no column 'mention_date'"),
        ("SELECT id AS mention_id, org, happened_at AS mention_date FROM {schema}.posts", "no column 'organization_id'"),
        ("SELEC 1", "syntax error"),
        ("SELECT 1 AS mention_id, 1 AS organization_id, now()::date > now() AS mention_date", "cannot cast type boolean"),
    ],
    ids=["missing-date", "missing-organization", "syntax", "wrong-type"],
)
def test_bad_source_query_exits_2_saying_what_is_wrong(
    settings: Settings, source: SourceTable, query: str, message: str
) -> None:
    done = cli(settings, "--source-query", query.format(schema=source.schema))
    assert done.code == 2, done.err
    assert message in done.err
    assert table(settings) == {}


def test_missing_default_source_table_exits_2(settings: Settings, source: SourceTable) -> None:
    # The test database has no public.mentions.
    done = cli(settings)
    assert done.code == 2 and "public.mentions" in done.err


def test_unreachable_source_exits_1_with_the_password_masked(settings: Settings, source: SourceTable) -> None:
    done = cli(settings, source_url="postgresql://someone:hunter2@127.0.0.1:1/nothing")
    assert done.code == 1
    assert "postgres unavailable at postgresql://someone:***@127.0.0.1:1/nothing" in done.err
    assert "hunter2" not in done.err + done.out


def test_empty_scope_completes(settings: Settings, source: SourceTable) -> None:
    done = cli(settings, "--source-query", source.query(), "--org", "12345", "--prune")
    assert done.code == 0, done.err
    assert "read 0," in done.out


async def test_source_in_another_database(settings: Settings, source: SourceTable) -> None:
    # A second database stands for a separate source server.
    name = settings.schema_name.lower()
    admin_url = settings.database_url
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        other_url = admin_url.rsplit("/", 1)[0] + "/" + name
        other = SourceTable(other_url, "elsewhere")
        other.create()
        other.insert(rows(7))
        report = await run_backfill(
            settings.model_copy(update={"source_database_url": other_url}), other.query()
        )
        assert report.counts.inserted == 7 and len(table(settings)) == 7
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# ---- the source is only read --------------------------------------------------------------------


def relation_exists(settings: Settings, name: str) -> bool:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)


def source_ids(source: SourceTable) -> list[int]:
    with psycopg.connect(source.url) as conn:
        return [row[0] for row in conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(source.table))]


COLUMNS = "id AS mention_id, org AS organization_id, happened_at AS mention_date"


def test_stacked_statements_are_refused_and_never_run(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(5))
    s = source.schema
    for query in (
        # Closes the wrapping subquery, stacks its own statements, reopens one for the rest.
        f"SELECT {COLUMNS} FROM {s}.posts) AS s; CREATE TABLE {s}.stacked (x int); SELECT * FROM (SELECT 1",
        f"SELECT {COLUMNS} FROM {s}.posts) AS s; DELETE FROM {s}.posts; SELECT * FROM (SELECT 1",
    ):
        done = cli(settings, "--source-query", query)
        assert done.code == 2, done.err
        assert "the source query must be a single SELECT" in done.err
    assert not relation_exists(settings, f"{s}.stacked")
    assert source_ids(source) == [1, 2, 3, 4, 5]
    assert table(settings) == {}


def test_data_modifying_query_is_refused_and_changes_nothing(settings: Settings, source: SourceTable) -> None:
    source.insert(rows(5))
    s = source.schema
    query = f"WITH d AS (DELETE FROM {s}.posts WHERE id > 2 RETURNING *) SELECT {COLUMNS} FROM d"
    done = cli(settings, "--source-query", query)
    assert done.code == 2, done.err
    assert "the source query must be a single SELECT that only reads" in done.err
    assert source_ids(source) == [1, 2, 3, 4, 5]
    assert table(settings) == {}


def test_a_query_calling_a_writing_function_is_refused_and_writes_nothing(
    settings: Settings, source: SourceTable
) -> None:
    source.insert(rows(5))
    s = source.schema
    source.execute(
        f"CREATE TABLE {s}.log (at timestamptz);"
        f" CREATE FUNCTION {s}.logged(bigint) RETURNS bigint LANGUAGE plpgsql AS"
        f" $$ BEGIN INSERT INTO {s}.log VALUES (now()); RETURN $1; END $$"
    )
    done = cli(settings, "--source-query", f"SELECT {s}.logged(id) AS mention_id, org AS organization_id,"
               f" happened_at AS mention_date FROM {s}.posts")
    assert done.code == 2, done.err
    assert "only reads" in done.err and "read-only transaction" in done.err
    with psycopg.connect(source.url) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(s, "log"))).fetchone() == (0,)
    assert table(settings) == {}


def test_stacked_statements_cannot_hide_from_the_check_in_a_copy(settings: Settings, source: SourceTable) -> None:
    # A single statement while checked; once it has switched standard_conforming_strings off
    # (when the count runs it), the same text reads as several statements: those of the COPY.
    # Only the extended protocol, for the COPY too, stops them.
    source.insert(rows(5))
    s = source.schema
    hidden = (
        f" IS NOT NULL) AS source) TO STDOUT (FORMAT BINARY); COMMIT; BEGIN READ WRITE;"
        f" CREATE TABLE {s}.sneaked (x int); COMMIT; BEGIN; COPY (SELECT * FROM (SELECT 1 AS mention_id --"
    )
    query = (
        f"SELECT {COLUMNS} FROM {s}.posts"
        f" WHERE set_config('standard_conforming_strings', 'off', false) IS NOT NULL AND 'x\\' <> '{hidden}'"
    )
    done = cli(settings, "--source-query", query)
    assert not relation_exists(settings, f"{s}.sneaked")
    assert done.code == 2, done.err
    assert "the source query must be a single SELECT" in done.err
    assert table(settings) == {}


async def test_the_source_session_is_read_only_and_keeps_the_urls_options(
    settings: Settings, source: SourceTable
) -> None:
    source.insert(rows(5))
    # The URL's own options (a search_path, so the query needs no schema) are kept next to ours.
    options = f"-c search_path={source.schema}"
    query_string = urlencode({"options": options}, quote_via=quote)
    url = f"{settings.database_url}{'&' if '?' in settings.database_url else '?'}{query_string}"
    query = (
        f"SELECT {COLUMNS} FROM posts"
        " WHERE current_setting('default_transaction_read_only')::boolean"
        " AND current_setting('transaction_read_only')::boolean"
    )
    report = await run_backfill(settings.model_copy(update={"source_database_url": url}), query)
    assert report.counts.inserted == 5


def test_source_options_are_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=64MB")
    read_only = "-c default_transaction_read_only=on"
    assert source_connection_options("postgresql://h/db")["options"] == f"-c work_mem=64MB {read_only}"
    # Options in the URL replace PGOPTIONS, as libpq has it.
    url = "postgresql://h/db?options=-c%20statement_timeout%3D5s"
    assert source_connection_options(url)["options"] == f"-c statement_timeout=5s {read_only}"
    monkeypatch.delenv("PGOPTIONS")
    assert source_connection_options("postgresql://h/db")["options"] == read_only


@pytest.mark.parametrize("parameter", ["password", "sslpassword"])
async def test_a_password_in_the_query_string_is_not_recorded(
    settings: Settings, source: SourceTable, parameter: str
) -> None:
    source.insert(rows(3))
    secret = "hunter2-in-the-query"
    url = f"{settings.database_url}{'&' if '?' in settings.database_url else '?'}{parameter}={secret}"
    await run_backfill(settings.model_copy(update={"source_database_url": url}), source.query())
    (checkpoint,) = checkpoints(settings)
    assert secret not in str(checkpoint["description"])
    assert "***" in str(checkpoint["description"])


def test_a_password_in_the_query_string_is_masked_in_messages(settings: Settings, source: SourceTable) -> None:
    done = cli(settings, source_url="postgresql://someone@127.0.0.1:1/nothing?password=hunter2")
    assert done.code == 1
    assert "postgresql://someone@127.0.0.1:1/nothing" in done.err
    assert "hunter2" not in done.err + done.out
