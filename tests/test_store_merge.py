"""Changes that leave a field out (a Delete without organization, a change without mention_date).

The store keeps the stored value for the missing field, as ``Change`` documents.  That value is
whatever had arrived before the change, not the value of the newest change that carries the field,
so SPEC §6's "any delivery order gives the same table" does not hold once a change that carries
the field arrives after a newer one that omits it.  The strict xfail tests pin the gap down
(reported to the lead; the fix is a version per mergeable field).  When the newest change carries
every field, the result converges.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.migrate import migrate
from indexer.store import Store
from tests.support.store import Row, change, read_table, truncate

INS, UPD, DEL = Kind.INSERTED, Kind.UPDATED, Kind.DELETED


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    migrate(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name) as s:
        yield s


async def both_orders(store: Store, settings: Settings, base: list[Change], a: Change, b: Change) -> list[dict[int, Row]]:
    tables = []
    for order in ([a, b], [b, a]):
        truncate(settings.database_url, settings.schema_name)
        for one in [*base, *order]:
            await store.apply([one])
        tables.append(read_table(settings.database_url, settings.schema_name))
    return tables


async def test_missing_field_converges_when_the_newest_change_carries_it(store: Store, settings: Settings) -> None:
    base = [change(INS, 1, 10, ts_s=1, date_s=5)]
    first, second = await both_orders(
        store, settings, base, change(UPD, 1, 10, ts_s=2, date_s=None), change(UPD, 1, 10, ts_s=3, date_s=7)
    )
    assert first == second


@pytest.mark.xfail(strict=True, reason="SPEC §6 gap: a change omitting a field merges with whatever is stored")
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
async def test_omitted_field_depends_on_delivery_order(
    store: Store, settings: Settings, base: list[Change], a: Change, b: Change
) -> None:
    first, second = await both_orders(store, settings, base, a, b)
    assert first == second
