"""The store against a real Postgres: the ordering rule case by case, results, failures."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from indexer.changes import Kind
from indexer.config import Settings
from indexer.errors import Refused, Unavailable
from indexer.readmodel.store import ApplyResult, Store
from tests.support.clock import at
from tests.support.store import Row, change, table
from tests.support.tables import read_mention

INS, UPD, DEL = Kind.INSERTED, Kind.UPDATED, Kind.DELETED


async def test_insert_creates_row_and_reports_its_organization(store: Store, settings: Settings) -> None:
    result = await store.apply([change(INS, 1, 10, ts_s=1, date_s=5)])
    assert result == ApplyResult(applied=1, skipped=0, organizations=frozenset({10}))
    assert table(settings) == {1: Row(10, at(5), at(1), INS, False)}


async def test_empty_batch_touches_nothing(store: Store) -> None:
    assert await store.apply([]) == ApplyResult(0, 0, frozenset())


@pytest.mark.parametrize("late_kind", [INS, UPD])
async def test_late_insert_or_update_never_resurrects_a_later_delete(
    store: Store, settings: Settings, late_kind: Kind
) -> None:
    await store.apply([change(INS, 1, 10, ts_s=1)])
    await store.apply([change(DEL, 1, 10, ts_s=3)])
    result = await store.apply([change(late_kind, 1, 10, ts_s=2)])
    assert (result.applied, result.skipped) == (0, 1)
    assert table(settings)[1].deleted


async def test_update_in_the_same_instant_as_a_delete_loses(store: Store, settings: Settings) -> None:
    await store.apply([change(DEL, 1, 10, ts_s=3)])
    await store.apply([change(UPD, 1, 10, ts_s=3)])
    assert table(settings)[1].deleted


async def test_newer_insert_revives_a_deleted_mention(store: Store, settings: Settings) -> None:
    await store.apply([change(INS, 1, 10, ts_s=1)])
    await store.apply([change(DEL, 1, 10, ts_s=2)])
    await store.apply([change(INS, 1, 11, ts_s=3, date_s=7)])
    assert table(settings) == {1: Row(11, at(7), at(3), INS, False)}


async def test_equal_duplicate_changes_nothing(store: Store, settings: Settings) -> None:
    await store.apply([change(UPD, 1, 10, ts_s=1)])
    before = read_mention(settings.database_url, settings.schema_name, 1)
    result = await store.apply([change(UPD, 1, 10, ts_s=1)])
    assert (result.applied, result.skipped) == (0, 1)
    # updated_at too: a skipped change does not even rewrite the row.
    assert read_mention(settings.database_url, settings.schema_name, 1) == before


@pytest.mark.parametrize("first_org, second_org", [(10, 20), (20, 10)])
async def test_same_timestamp_and_kind_resolve_by_higher_organization(
    store: Store, settings: Settings, first_org: int, second_org: int
) -> None:
    await store.apply([change(UPD, 1, first_org, ts_s=1)])
    await store.apply([change(UPD, 1, second_org, ts_s=1)])
    assert table(settings)[1].organization_id == 20


@pytest.mark.parametrize("first_date, second_date", [(5, 9), (9, 5)])
async def test_same_timestamp_kind_and_organization_resolve_by_later_date(
    store: Store, settings: Settings, first_date: int, second_date: int
) -> None:
    await store.apply([change(UPD, 1, 10, ts_s=1, date_s=first_date)])
    await store.apply([change(UPD, 1, 10, ts_s=1, date_s=second_date)])
    assert table(settings)[1].mention_date == at(9)


async def test_delete_without_organization_keeps_the_stored_one(store: Store, settings: Settings) -> None:
    await store.apply([change(INS, 1, 10, ts_s=1, date_s=5)])
    result = await store.apply([change(DEL, 1, None, ts_s=2, date_s=None)])
    assert table(settings) == {1: Row(10, at(5), at(2), DEL, True)}
    # The organization comes from the stored row, and its cache must go.
    assert result.organizations == {10}


async def test_delete_without_organization_of_unknown_mention_leaves_tombstone_in_organization_0(
    store: Store, settings: Settings
) -> None:
    result = await store.apply([change(DEL, 1, None, ts_s=2)])
    assert table(settings) == {1: Row(0, at(0), at(2), DEL, True)}
    assert result.organizations == frozenset()
    # A later insert takes the mention out of the placeholder organization.
    await store.apply([change(INS, 1, 10, ts_s=3)])
    assert table(settings)[1].organization_id == 10


async def test_change_without_date_keeps_the_stored_date(store: Store, settings: Settings) -> None:
    await store.apply([change(INS, 1, 10, ts_s=1, date_s=5)])
    await store.apply([change(UPD, 1, 11, ts_s=2, date_s=None)])
    assert table(settings) == {1: Row(11, at(5), at(2), UPD, False)}


async def test_move_reports_both_organizations(store: Store, settings: Settings) -> None:
    await store.apply([change(INS, 1, 10, ts_s=1)])
    result = await store.apply([change(UPD, 1, 20, ts_s=2)])
    assert result.organizations == {10, 20}
    row = read_mention(settings.database_url, settings.schema_name, 1)
    assert row is not None and row["previous_organization_id"] == 10


async def test_redelivered_move_still_reports_both_organizations(store: Store) -> None:
    # The first delivery may have committed and then lost its invalidation, so its redelivery
    # must name both organizations again.
    await store.apply([change(INS, 1, 10, ts_s=1)])
    await store.apply([change(UPD, 1, 20, ts_s=2)])
    result = await store.apply([change(UPD, 1, 20, ts_s=2)])
    assert (result.applied, result.skipped) == (0, 1)
    assert result.organizations == {10, 20}


async def test_skipped_stale_change_still_reports_its_organization(store: Store) -> None:
    await store.apply([change(UPD, 1, 10, ts_s=5)])
    result = await store.apply([change(UPD, 1, 30, ts_s=1), change(INS, 2, 40, ts_s=1)])
    assert (result.applied, result.skipped) == (1, 1)
    assert {10, 30, 40} <= result.organizations


async def test_uncoalesced_batch_is_coalesced_and_counted(store: Store, settings: Settings) -> None:
    batch = [change(INS, 2, 10, ts_s=1), change(UPD, 1, 10, ts_s=2), change(UPD, 2, 11, ts_s=3), change(UPD, 1, 10, ts_s=2)]
    result = await store.apply(batch)
    assert (result.applied, result.skipped) == (2, 2)
    assert result.organizations == {10, 11}
    assert table(settings)[2].organization_id == 11


async def test_unreachable_postgres_is_unavailable_without_password() -> None:
    store = Store("postgresql://postgres:secret@127.0.0.1:1/x", "s", connect_timeout_s=2)
    for attempt in (store.ping(), store.apply([change(INS, 1, 10, ts_s=1)])):
        with pytest.raises(Unavailable) as caught:
            await attempt
        assert caught.value.service == "postgres"
        assert "secret" not in str(caught.value)
        assert "127.0.0.1:1" in str(caught.value)
    await store.aclose()


async def test_reconnects_after_losing_its_connection(store: Store, settings: Settings) -> None:
    await store.ping()
    backend_pid = store._conn.info.backend_pid  # type: ignore[union-attr]  # white-box: kill exactly this one
    with psycopg.connect(settings.database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
    with pytest.raises(Unavailable):
        await store.apply([change(INS, 1, 10, ts_s=1)])
    # Nothing was committed, and the next call simply opens a new connection.
    assert table(settings) == {}
    await store.apply([change(INS, 1, 10, ts_s=1)])
    assert table(settings)[1].organization_id == 10


async def test_value_postgres_cannot_take_is_refused(store: Store, settings: Settings) -> None:
    with pytest.raises(Refused):
        await store.apply([change(INS, 2**63, 10, ts_s=1)])
    # The connection survives a refusal.
    await store.apply([change(INS, 1, 10, ts_s=1)])
    assert list(table(settings)) == [1]


@pytest.mark.parametrize("delay_s", [0, 0.001, 0.003])
async def test_cancelled_apply_leaves_the_store_usable(store: Store, settings: Settings, delay_s: float) -> None:
    # The service cancels the batch in hand on SIGTERM; the next apply must still work.
    big = [change(INS, i, 10, ts_s=1) for i in range(1, 5001)]
    task = asyncio.create_task(store.apply(big))
    await asyncio.sleep(delay_s)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    result = await store.apply([change(UPD, 1, 11, ts_s=2)])
    assert result.applied == 1
    assert len(table(settings)) in (1, 5000)  # all or nothing of the cancelled batch
