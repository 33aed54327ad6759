"""The invalidation outbox: what a committed batch still owes the caches.

Without it, a batch that committed and then lost its invalidation (the indexer died) counts on
its redelivery to invalidate again, and the redelivery only knows the organizations the rows are
in *now*.  Two indexers can then lose an invalidation for good: indexer 1 commits a move A→B and
dies; indexer 2 moves the mention B→C; the first message, redelivered, invalidates B and C, never
A.  The outbox row written with the first commit names A and B whatever happens later.

* owing: in the batch's own statement (``store``), one row with the organizations it touched;
* settling: after the invalidation, the row is deleted by the next batch's statement, or by
  ``settle`` when no batch follows soon (a failure or a crash here costs an extra invalidation
  later, never a missed one);
* ``settle_owed``: any indexer, at its start and periodically, finishes rows older than a bound:
  claimed with ``FOR UPDATE SKIP LOCKED`` so two indexers never wait on each other, invalidated,
  deleted in the same transaction (a failure leaves them for the next sweep).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import psycopg
from psycopg import sql

from indexer.readmodel import arrays

_CLAIM_ROWS = 500  # outbox rows finished per sweep transaction


class Outbox:
    def __init__(self, schema: str) -> None:
        self.table = table = sql.Identifier(schema, "invalidation_outbox")
        self._settle = sql.SQL("DELETE FROM {} WHERE id = ANY(%s::bigint[])").format(table)
        self._claim = sql.SQL(
            "SELECT id, organizations FROM {} WHERE created_at <= now() - make_interval(secs => %s)"
            " ORDER BY id LIMIT {} FOR UPDATE SKIP LOCKED"
        ).format(table, sql.Literal(_CLAIM_ROWS))

    async def settle(self, conn: psycopg.AsyncConnection, ids: Sequence[int]) -> None:
        await conn.execute(self._settle, (arrays.bigints(ids),))

    async def settle_owed(
        self, conn: psycopg.AsyncConnection, older_than_s: float, invalidate: Callable[[list[int]], Awaitable[object]]
    ) -> int:
        finished = 0
        while True:
            async with conn.transaction():
                cursor = await conn.execute(self._claim, (older_than_s,))
                rows = await cursor.fetchall()
                if not rows:
                    return finished
                await invalidate(sorted({org for _, orgs in rows for org in orgs}))
                await conn.execute(self._settle, ([row_id for row_id, _ in rows],))
            finished += len(rows)
            if len(rows) < _CLAIM_ROWS:
                return finished
