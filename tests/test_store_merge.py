"""Changes that leave a field out (a Delete without organization, a change without mention_date).

Each such field is a register of its own (``indexer.readmodel.registers``): it holds the value of the
highest-version change that carried it, which is what applying the changes in version order
gives.  So the table is the same in every delivery order, even when a stale change arrives after
a newer one that left the field out (it fills the field and changes nothing else).
"""

from __future__ import annotations

import pytest

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.readmodel.store import Store
from tests.support.clock import at
from tests.support.store import Row, change, oracle, table, truncate

INS, UPD, DEL = Kind.INSERTED, Kind.UPDATED, Kind.DELETED


async def both_orders(store: Store, settings: Settings, base: list[Change], a: Change, b: Change) -> list[dict[int, Row]]:
    tables = []
    for order in ([a, b], [b, a]):
        truncate(settings.database_url, settings.schema_name)
        for one in [*base, *order]:
            await store.apply([one])
        tables.append(table(settings))
    return tables


async def test_missing_field_converges_when_the_newest_change_carries_it(store: Store, settings: Settings) -> None:
    base = [change(INS, 1, 10, ts_s=1, date_s=5)]
    first, second = await both_orders(
        store, settings, base, change(UPD, 1, 10, ts_s=2, date_s=None), change(UPD, 1, 10, ts_s=3, date_s=7)
    )
    assert first == second


@pytest.mark.parametrize(
    "base, a, b",
    [
        # Same instant and kind, one without date: stored date 9 ranks above 7 only when stored first.
        ([change(INS, 1, 10, ts_s=1, date_s=9)], change(UPD, 1, 10, ts_s=2, date_s=None), change(UPD, 1, 10, ts_s=2, date_s=7)),
        # Same instant, both deletes, one without organization: the stored 30 beats 20 only when kept first.
        ([change(INS, 1, 30, ts_s=1)], change(DEL, 1, None, ts_s=2), change(DEL, 1, 20, ts_s=2)),
        # A move delivered after a later Delete without organization: the tombstone stays in 10,
        # though the mention was in 20 when it was deleted.
        ([change(INS, 1, 10, ts_s=1)], change(DEL, 1, None, ts_s=3), change(UPD, 1, 20, ts_s=2)),
        # Likewise a date delivered after a later change without date is lost.
        ([change(INS, 1, 10, ts_s=1, date_s=5)], change(UPD, 1, 10, ts_s=3, date_s=None), change(UPD, 1, 10, ts_s=2, date_s=7)),
    ],
    ids=["date-same-instant", "organization-same-instant", "late-move", "late-date"],
)
async def test_omitted_field_converges_in_every_delivery_order(
    store: Store, settings: Settings, base: list[Change], a: Change, b: Change
) -> None:
    first, second = await both_orders(store, settings, base, a, b)
    assert first == second == oracle([*base, a, b])


async def test_stale_change_fills_only_the_field_newer_changes_left_out(store: Store, settings: Settings) -> None:
    await store.apply([change(DEL, 1, None, ts_s=3, date_s=None)])
    result = await store.apply([change(UPD, 1, 20, ts_s=2, date_s=7)])
    # Stale for the row (still the Delete at 3), but the only change that named an organization
    # and a date: the tombstone takes both, as in-order application would.
    assert table(settings) == {1: Row(20, at(7), at(3), DEL, True)}
    assert (result.applied, result.skipped) == (0, 1)
    assert result.organizations == {20}


async def test_filled_field_is_not_overwritten_by_an_older_change(store: Store, settings: Settings) -> None:
    await store.apply([change(DEL, 1, None, ts_s=3, date_s=None)])
    await store.apply([change(UPD, 1, 20, ts_s=2, date_s=7)])
    await store.apply([change(INS, 1, 10, ts_s=1, date_s=5)])
    assert table(settings) == {1: Row(20, at(7), at(3), DEL, True)}


async def test_one_batch_folds_fields_from_several_changes(store: Store, settings: Settings) -> None:
    # What coalescing would lose: the newest change carries neither field.
    batch = [change(INS, 1, 10, ts_s=1, date_s=5), change(UPD, 1, 20, ts_s=2, date_s=None), change(DEL, 1, None, ts_s=3, date_s=None)]
    result = await store.apply(batch)
    assert table(settings) == {1: Row(20, at(5), at(3), DEL, True)} == oracle(batch)
    assert (result.applied, result.skipped) == (1, 2)


async def test_newer_change_carrying_a_field_beats_an_older_one_that_filled_it(store: Store, settings: Settings) -> None:
    await store.apply([change(DEL, 1, None, ts_s=3, date_s=None)])
    await store.apply([change(UPD, 1, 20, ts_s=2)])
    await store.apply([change(INS, 1, 30, ts_s=4, date_s=9)])
    assert table(settings) == {1: Row(30, at(9), at(4), INS, False)}
