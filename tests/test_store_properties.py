"""The ordering rule as properties: any delivery order, any duplicates, any batching give the same
table, and that table is the changes applied in version order (each leaving the fields it omits)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from indexer.changes import Change, Kind, version_key
from indexer.config import Settings
from indexer.readmodel.migrate import migrate
from indexer.readmodel.store import Store
from tests.support.store import change, oracle, read_table, truncate

# Few mentions, organizations and instants, so that equal timestamps, moves and re-inserts are common.
MENTIONS = st.integers(1, 3)
ORGANIZATIONS = st.integers(1, 3)
INSTANTS_S = st.integers(0, 3)


@st.composite
def changes(draw: st.DrawFn) -> Change:
    kind = draw(st.sampled_from(Kind))
    # Only a Delete may leave the organization out; any change may leave the date out.
    organizations = ORGANIZATIONS | st.none() if kind is Kind.DELETED else ORGANIZATIONS
    return change(
        kind,
        draw(MENTIONS),
        draw(organizations),
        ts_s=draw(INSTANTS_S),
        date_s=draw(st.none() | st.integers(0, 2)),
    )


HISTORIES = st.lists(changes(), min_size=1, max_size=16)


@pytest.fixture
def schema(settings: Settings) -> str:
    migrate(settings.database_url, settings.schema_name)
    return settings.schema_name


async def apply_in_batches(store: Store, deliveries: list[Change], cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(deliveries)]
    for start, end in zip(bounds, bounds[1:]):
        await store.apply(deliveries[start:end])


@hypothesis_settings(
    max_examples=100,
    deadline=None,
    # One schema for the whole test, truncated by each example on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(history=HISTORIES, data=st.data())
async def test_any_order_duplicates_and_batching_give_the_same_table(
    settings: Settings, schema: str, history: list[Change], data: st.DataObject
) -> None:
    url = settings.database_url
    async with Store(url, schema) as store:
        truncate(url, schema)
        for one in sorted(history, key=version_key):
            await store.apply([one])
        in_order = read_table(url, schema)

        truncate(url, schema)
        duplicates = data.draw(st.lists(st.sampled_from(history), max_size=len(history)), label="duplicates")
        deliveries = data.draw(st.permutations(history + duplicates), label="deliveries")
        cuts = data.draw(st.lists(st.integers(0, len(deliveries)), max_size=4), label="cuts")
        await apply_in_batches(store, deliveries, cuts)
        shuffled = read_table(url, schema)

    assert shuffled == in_order == oracle(history)


async def test_redelivering_everything_changes_nothing(settings: Settings, schema: str) -> None:
    rng = random.Random(7)
    kinds = [rng.choice(list(Kind)) for _ in range(500)]
    history = [
        change(
            kind,
            rng.randint(1, 50),
            None if kind is Kind.DELETED and rng.random() < 0.3 else rng.randint(1, 5),
            ts_s=rng.randint(0, 20),
            date_s=rng.choice([None, 0, 1, 2, 3]),
        )
        for kind in kinds
    ]
    async with Store(settings.database_url, schema) as store:
        first = await store.apply(history)
        before = read_table(settings.database_url, schema)
        again = await store.apply(list(reversed(history)))
    assert first.applied == len(before)
    assert (again.applied, again.skipped) == (0, len(history))
    assert read_table(settings.database_url, schema) == before == oracle(history)
