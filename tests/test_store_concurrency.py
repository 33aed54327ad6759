"""Two indexers racing on the same mentions converge, because Postgres evaluates the guard on the
locked row; a Conflict may surface and is retried the way the service retries it."""

from __future__ import annotations

import asyncio
import random

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.errors import Conflict
from indexer.readmodel.migrate import migrate
from indexer.readmodel.store import ApplyResult, Store
from tests.support.store import change, oracle, read_table

ROUNDS = 60
MENTIONS = 50
CHANGES_PER_ROUND = 200


async def apply_retrying(store: Store, batch: list[Change]) -> ApplyResult:
    for _ in range(20):
        try:
            return await store.apply(batch)
        except Conflict:
            await asyncio.sleep(0.01)
    raise AssertionError("Conflict on every attempt")


async def test_two_stores_applying_conflicting_batches_converge(settings: Settings) -> None:
    migrate(settings.database_url, settings.schema_name)
    rng = random.Random(20240101)
    everything: list[Change] = []
    async with (
        Store(settings.database_url, settings.schema_name) as left,
        Store(settings.database_url, settings.schema_name) as right,
    ):
        for round_no in range(ROUNDS):
            batch = []
            for _ in range(CHANGES_PER_ROUND):
                kind = rng.choice(list(Kind))
                batch.append(
                    change(
                        kind,
                        rng.randint(1, MENTIONS),
                        # Deletes sometimes, and any change sometimes, leave a field out.
                        None if kind is Kind.DELETED and rng.random() < 0.5 else rng.randint(1, 4),
                        # Overlapping instants across rounds, so late and equal versions race too.
                        ts_s=rng.randint(round_no, round_no + 5),
                        date_s=rng.choice([None, 0, 1, 2]),
                    )
                )
            everything += batch
            # Each store gets a different, overlapping share of the round's changes.
            rng.shuffle(batch)
            first, second = batch[: 2 * len(batch) // 3], batch[len(batch) // 3 :]
            await asyncio.gather(
                apply_retrying(left, first), apply_retrying(right, second)
            )
    assert read_table(settings.database_url, settings.schema_name) == oracle(everything)
