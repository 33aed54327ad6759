"""``mention-indexer audit`` against a real Postgres and Redis: a consistent model is clean; known
differences, made behind the indexer's back with plain SQL and plain Redis commands, are reported
exactly; ``--repair`` brings them back through the version guard; exit statuses and messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis
from psycopg import sql

from indexer.audit import mentions
from indexer.audit.repair import repair
from indexer.cache import CacheInspector, CacheInvalidator, data_key
from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.readmodel.store import Store
from tests.support.audit import add_only_to_the_model, counts, model_sql, restore_after_invalidation, run_audit
from tests.support.backfill import SourceRow, SourceTable, run_backfill
from tests.support.cache_fixtures import fill
from tests.support.clock import at
from tests.support.commands import call_main, cli_env
from tests.support.process import Result, arun_cli
from tests.support.tables import read_mentions

ROWS = 600
ORGS = 6
CLEAN_CACHE = {"checked": 0, "stale": 0, "unverifiable": 0}


def org_of(i: int) -> int:
    return i % ORGS + 1


def source_rows(count: int = ROWS, *, start: int = 1) -> list[SourceRow]:
    """Versioned rows, every 50th removed (deleted in the source: a tombstone in the read model)."""
    return [SourceRow(i, org_of(i), at(i), at(i), removed=i % 50 == 0) for i in range(start, start + count)]


def live_count(rows: list[SourceRow]) -> int:
    return sum(1 for r in rows if not r.removed)


Cli = Callable[..., Result]


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``mention-indexer audit ARGS`` in this process, with the test's settings (and ``env``); in a
    thread of its own, since the command runs an event loop and the test is inside one."""

    def call(*args: str, **env: str) -> Result:
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(call_main, ["audit", *args], cli_env(settings, **env), monkeypatch, capsys).result()

    return call


def source_table(source: SourceTable) -> dict[int, tuple[int | None, datetime | None, bool]]:
    """The source as it is now: id → (org, happened_at, removed)."""
    with psycopg.connect(source.url) as conn:
        found = conn.execute(sql.SQL("SELECT id, org, happened_at, removed FROM {}").format(source.table)).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in found}


def assert_model_is_the_source(settings: Settings, source: SourceTable) -> None:
    """Every live source row live in the read model with its organization and date; every other
    read-model row a tombstone."""
    table = read_mentions(settings.database_url, settings.schema_name, ("organization_id", "mention_date", "deleted"))
    now = source_table(source)
    for mention_id, (org, date, removed) in now.items():
        if not removed:
            assert table[mention_id] == (org, date, False), mention_id
    for mention_id, (_, _, deleted) in table.items():
        if mention_id not in now or now[mention_id][2]:
            assert deleted, mention_id


def audit_json(result: Result) -> dict[str, object]:
    lines = result.out.strip().splitlines()
    assert len(lines) == 1, result
    found: dict[str, object] = json.loads(lines[0])
    return found


async def test_a_consistent_model_is_clean(
    settings: Settings, source: SourceTable, admin: redis.Redis, cli: Cli
) -> None:
    rows = source_rows()
    source.insert(rows)
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    for org in (1, 2, 3):
        await fill(settings, org, "open-mentions")
    admin.set(f"{settings.cache_prefix}:{{4}}:written-directly", b"plain")

    result = cli("--json", "--source-query", query)
    assert result.code == 0, result
    found = audit_json(result)
    assert found["read_model"] == {"checked": live_count(rows), "missing": 0, "extra": 0, "changed": 0, "in_flight": 0}
    assert found["cache"] == {"checked": 3, "stale": 0, "unverifiable": 1}
    assert found["examples"] == []

    text = cli("--source-query", query)
    assert text.code == 0, text
    assert f"read model: {live_count(rows)} mentions checked: 0 missing, 0 extra, 0 changed" in text.out
    assert "no difference" in text.out


async def test_known_differences_are_reported_exactly_then_repaired(
    settings: Settings, source: SourceTable, admin: redis.Redis, cli: Cli
) -> None:
    rows = source_rows()
    source.insert(rows)
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    for org, key in ((1, "a"), (2, "b"), (3, "c")):
        await fill(settings, org, key)
    admin.set(f"{settings.cache_prefix}:{{4}}:written-directly", b"plain")

    # Missing: rows gone from the read model, and one tombstoned there.
    model_sql(settings, "DELETE FROM {mentions} WHERE mention_id IN (11, 12)")
    model_sql(settings, "UPDATE {mentions} SET deleted = true, change_kind = 3 WHERE mention_id = 13")
    # Extra: a row deleted from the source, one removed there, one only ever in the read model.
    source.execute("DELETE FROM {table} WHERE id = 21")
    source.execute("UPDATE {table} SET removed = true WHERE id = 22")
    add_only_to_the_model(settings, 900, 2, at(900), at(5))
    # Changed: moved to another organization, given another date (on either side).
    source.execute("UPDATE {table} SET org = 6 WHERE id = 31")
    model_sql(settings, "UPDATE {mentions} SET organization_id = 5 WHERE mention_id = 32")
    source.execute("UPDATE {table} SET happened_at = happened_at + interval '1 day' WHERE id = 41")
    model_sql(settings, "UPDATE {mentions} SET mention_date = NULL WHERE mention_id = 42")
    # Not a difference: a mention deleted on both sides, whatever its organization.
    model_sql(settings, "UPDATE {mentions} SET organization_id = 4 WHERE mention_id = 50")
    # Stale: two entries back after their invalidation, as a failover to a stale replica does.
    await restore_after_invalidation(settings, admin, 1, "a")
    await restore_after_invalidation(settings, admin, 2, "b")

    result = cli("--json", "--source-query", query)
    assert result.code == 3, result
    found = audit_json(result)
    checked = live_count(rows) + 1  # the row only in the read model
    assert found["read_model"] == {"checked": checked, "missing": 3, "extra": 3, "changed": 4, "in_flight": 0}
    assert found["cache"] == {"checked": 3, "stale": 2, "unverifiable": 1}
    examples = found["examples"]
    assert isinstance(examples, list)
    assert {(e.get("mention_id"), e["kind"]) for e in examples if e["pair"] == "read_model"} == {
        (11, "missing"),
        (12, "missing"),
        (13, "missing"),
        (21, "extra"),
        (22, "extra"),
        (900, "extra"),
        (31, "changed"),
        (32, "changed"),
        (41, "changed"),
        (42, "changed"),
    }
    assert {(e["key"], e["organization_id"]) for e in examples if e["pair"] == "cache"} == {
        (data_key(settings.cache_prefix, 1, "a"), 1),
        (data_key(settings.cache_prefix, 2, "b"), 2),
    }
    moved = next(e for e in examples if e.get("mention_id") == 31)
    assert moved["organization_id"] == 6 and "organization_id 6 in the source, 2 in the read model" in moved["differs"]

    repaired = cli("--json", "--repair", "--source-query", query)
    assert repaired.code == 0, repaired
    done = audit_json(repaired)
    assert done["read_model"] == found["read_model"]  # what it found first
    assert done["repair"] == {
        "dry_run": False,
        "written": 7,
        "tombstoned": 3,
        "kept": 0,
        "unusable": 0,
        "dropped_cache_entries": 2,
        "invalidated_organizations": [1, 2, 3, 4, 5, 6],
    }
    after = done["after"]
    live_now = live_count(rows) - 2  # 21 and 22 are gone from the source
    assert after == {
        "read_model": {"checked": live_now, "missing": 0, "extra": 0, "changed": 0, "in_flight": 0},
        "cache": {"checked": after["cache"]["checked"], "stale": 0, "unverifiable": after["cache"]["unverifiable"]},  # type: ignore[index]
        "examples": [],
        "elapsed_s": after["elapsed_s"],  # type: ignore[index]
    }
    # Nothing restored survived the repair, and the read model is the source's again.
    assert not admin.exists(data_key(settings.cache_prefix, 1, "a"), data_key(settings.cache_prefix, 2, "b"))
    assert_model_is_the_source(settings, source)

    again = cli("--json", "--source-query", query)
    assert again.code == 0, again
    assert audit_json(again)["read_model"] == after["read_model"]  # type: ignore[index]


async def test_dry_run_says_what_it_would_do_and_changes_nothing(
    settings: Settings, source: SourceTable, admin: redis.Redis, cli: Cli
) -> None:
    source.insert(source_rows(100))
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    await fill(settings, 1, "a")
    model_sql(settings, "DELETE FROM {mentions} WHERE mention_id = 7")
    await restore_after_invalidation(settings, admin, 1, "a")
    before = read_mentions(settings.database_url, settings.schema_name)

    result = cli("--repair", "--dry-run", "--json", "--source-query", query)
    assert result.code == 3, result
    found = audit_json(result)
    assert found["repair"] == {
        "dry_run": True,
        "written": 1,
        "tombstoned": 0,
        "kept": 0,
        "unusable": 0,
        "dropped_cache_entries": 1,
        "invalidated_organizations": [1, org_of(7)],
    }
    assert found["after"] is None
    assert read_mentions(settings.database_url, settings.schema_name) == before
    assert admin.exists(data_key(settings.cache_prefix, 1, "a"))

    text = cli("--repair", "--dry-run", "--source-query", query)
    assert text.code == 3, text
    assert "repair (dry run, nothing changed): would write 1 mention(s)" in text.out
    assert "missing  mention 7" in text.out
    assert cli("--dry-run", "--source-query", query).code == 2


async def test_source_changes_newer_than_the_watermark_are_in_flight(settings: Settings, source: SourceTable) -> None:
    source.insert(source_rows(100))
    versioned = source.query(versions=True, deleted=True)
    await run_backfill(settings, versioned)
    newer = at(10_000)  # after every version the read model has applied (at(100) at most)
    source.execute(f"UPDATE {{table}} SET org = 99, version_at = '{newer.isoformat()}' WHERE id = 5")
    source.execute(f"UPDATE {{table}} SET removed = true, version_at = '{newer.isoformat()}' WHERE id = 6")
    source.insert([SourceRow(500, 1, at(500), newer)])
    # Changed without a newer version: a difference, not something in flight.
    source.execute("UPDATE {table} SET org = 98 WHERE id = 7")

    read_model, _ = counts(await run_audit(settings, versioned))
    assert {k: read_model[k] for k in ("missing", "extra", "changed", "in_flight")} == {
        "missing": 0,
        "extra": 0,
        "changed": 1,
        "in_flight": 3,
    }
    # Without a version column nothing is in flight: all four are differences.
    read_model, _ = counts(await run_audit(settings, source.query(deleted=True)))
    assert {k: read_model[k] for k in ("missing", "extra", "changed", "in_flight")} == {
        "missing": 1,
        "extra": 1,
        "changed": 2,
        "in_flight": 0,
    }


async def test_the_descent_finds_every_difference_across_chunks_gaps_and_checksums(
    settings: Settings, source: SourceTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks and buckets, so 20,000 rows take every path: chunks that agree, several levels
    # of buckets, leaves read together, a gap of a million ids stepped over.
    monkeypatch.setattr(mentions, "CHUNK_ROWS", 700)
    monkeypatch.setattr(mentions, "FANOUT", 4)
    monkeypatch.setattr(mentions, "LEAF_ROWS", 9)
    monkeypatch.setattr(mentions, "_RANGES_PER_STATEMENT", 3)
    rows = [SourceRow(i, org_of(i), at(i), at(1)) for i in [*range(1, 10_001), *range(1_000_001, 1_010_001)]]
    source.insert(rows)
    query = source.query(versions=True)
    await run_backfill(settings, query)
    gone = [3, 4_097, 9_999, 1_000_001, 1_005_000]
    moved = [1, 2_048, 7_777, 1_000_500, 1_010_000]
    model_sql(settings, "DELETE FROM {mentions} WHERE mention_id = ANY(%s)", (gone,))
    model_sql(
        settings, "UPDATE {mentions} SET organization_id = organization_id + 10 WHERE mention_id = ANY(%s)", (moved,)
    )
    for mention_id in (10_500, 500_000, 2_000_000):  # in the gap, and past the end
        add_only_to_the_model(settings, mention_id, 1, at(1), at(1))

    report = await run_audit(settings, query)
    assert counts(report)[0] == {"checked": len(rows) + 3, "missing": 5, "extra": 3, "changed": 5, "in_flight": 0}
    assert sorted((d.kind, d.mention_id) for d in report.read_model.differences) == sorted(
        [("missing", i) for i in gone]
        + [("changed", i) for i in moved]
        + [("extra", i) for i in (10_500, 500_000, 2_000_000)]
    )

    # The same with md5 checksums, as when the two servers hash rows differently.
    async def disagree(session: object) -> None:
        return None

    monkeypatch.setattr(mentions, "_probe", disagree)
    again = await run_audit(settings, query)
    assert counts(again) == counts(report)


async def test_org_scope(settings: Settings, source: SourceTable, admin: redis.Redis, cli: Cli) -> None:
    rows = [SourceRow(i, org_of(i), at(i), at(i)) for i in range(1, 121)]
    source.insert(rows)
    query = source.query(versions=True)
    await run_backfill(settings, query)
    for org in (1, 2):
        await fill(settings, org, "k")
        await restore_after_invalidation(settings, admin, org, "k")
    model_sql(settings, "DELETE FROM {mentions} WHERE mention_id IN (6, 7)")  # organizations 1 and 2
    source.execute("UPDATE {table} SET org = 3 WHERE id = 12")  # out of organization 1's scope

    result = cli("--json", "--org", "1", "--source-query", query)
    assert result.code == 3, result
    found = audit_json(result)
    in_org_1 = sum(1 for r in rows if r.org == 1)
    # 12 moved out of the scope: changed (it is in organization 3 now), not extra.
    assert found["read_model"] == {"checked": in_org_1, "missing": 1, "extra": 0, "changed": 1, "in_flight": 0}
    assert found["cache"] == {"checked": 1, "stale": 1, "unverifiable": 0}
    assert {(e.get("mention_id"), e["kind"]) for e in found["examples"]} == {
        (6, "missing"),
        (12, "changed"),
        (None, "stale"),
    }  # type: ignore[union-attr]

    assert cli("--repair", "--org", "1", "--source-query", query).code == 0
    assert cli("--org", "1", "--source-query", query).code == 0
    assert cli("--org", "2", "--source-query", query).code == 3  # left alone


async def test_a_repair_never_regresses_a_newer_live_change(settings: Settings, source: SourceTable) -> None:
    source.insert(source_rows(20))
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    model_sql(settings, "UPDATE {mentions} SET organization_id = 6 WHERE mention_id IN (3, 4)")
    report = await run_audit(settings, query)
    assert counts(report)[0]["changed"] == 2
    # After the audit, before its repair: a live change newer than the audit's snapshot.
    later = datetime.now(UTC) + timedelta(hours=1)
    async with Store(settings.database_url, settings.schema_name) as store:
        await store.apply([Change(Kind.UPDATED, 3, 77, at(3), later)])
        async with (
            CacheInspector.from_settings(settings) as inspector,
            CacheInvalidator(settings.redis_url, settings.cache_prefix, track_direct_keys="off") as invalidator,
        ):
            done = await repair(report, store, inspector, invalidator, dry_run=False)
    assert (done.written, done.kept) == (1, 1)
    table = read_mentions(settings.database_url, settings.schema_name, ("organization_id", "transaction_timestamp"))
    assert table[3] == (77, later)
    assert table[4][0] == org_of(4)


async def test_bad_usage_and_failures(settings: Settings, source: SourceTable, cli: Cli, unique: str) -> None:
    source.insert(source_rows(5))
    query = source.query(versions=True)

    result = cli("--source-query", f"SELECT id AS mention_id FROM {source.schema}.posts")
    assert result.code == 2, result
    assert "returns no column 'organization_id', 'mention_date'" in result.err

    result = cli("--source-query", f"DELETE FROM {source.schema}.posts RETURNING id AS mention_id")
    assert result.code == 2, result

    result = cli("--source-query", query, "--schema", f"{unique}_never")
    assert result.code == 2, result
    assert "run `mention-indexer migrate` first" in result.err

    result = cli("--source-query", query, SOURCE_DATABASE_URL="postgresql://auditor:s3cret@127.0.0.1:1/db")
    assert result.code == 1, result
    assert "postgres unavailable at postgresql://auditor:***@127.0.0.1:1/db" in result.err
    assert "s3cret" not in result.err + result.out

    result = cli("--source-query", query, REDIS_URL="redis://:s3cret@127.0.0.1:1/0")
    assert result.code == 1, result
    assert "redis unavailable at redis://:***@127.0.0.1:1/0" in result.err
    assert "s3cret" not in result.err + result.out

    assert cli("--org", "0").code == 2
    assert cli("--dry-run").code == 2


async def test_the_default_source_and_the_audit_source_query_setting(
    settings: Settings, source: SourceTable, cli: Cli
) -> None:
    source.insert(source_rows(30))
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    result = cli("--json", INDEXER_AUDIT_SOURCE_QUERY=query)
    assert result.code == 0, result
    assert audit_json(result)["read_model"]["checked"] == live_count(source_rows(30))  # type: ignore[index]
    # --source-query wins over the setting.
    assert cli("--source-query", query, INDEXER_AUDIT_SOURCE_QUERY="SELECT 1").code == 0
    assert cli("--source-query", query, INDEXER_AUDIT_SOURCE_QUERY=" ;").code == 2


async def test_the_real_entry_point(settings: Settings, source: SourceTable) -> None:
    source.insert(source_rows(40))
    query = source.query(versions=True, deleted=True)
    await run_backfill(settings, query)
    model_sql(settings, "DELETE FROM {mentions} WHERE mention_id = 9")
    env = cli_env(settings)

    found = await arun_cli(env, "audit", "--json", "--source-query", query)
    assert found.code == 3, found
    assert audit_json(found)["read_model"]["missing"] == 1  # type: ignore[index]
    repaired = await arun_cli(env, "audit", "--repair", "--source-query", query)
    assert repaired.code == 0, repaired
    assert "repair: wrote 1 mention(s) back to the source's state" in repaired.out
    assert "no difference" in repaired.out.splitlines()[-1]
    assert (await arun_cli(env, "audit", "--source-query", query)).code == 0
