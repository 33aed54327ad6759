"""``mention-indexer backfill``: load the read model from the mentions table (docs/commands.md).

How a run goes
    The source query (default ``public.mentions``) is read in keyset chunks of ``--batch-size``
    rows by mention_id, each chunk in its own REPEATABLE READ, read-only transaction of the
    source, so no transaction stays open for the whole table.  A chunk is streamed with binary
    COPY, unparsed, into a TEMP staging table of the read model's database (with source and read
    model in one database, inserted there in SQL instead: ``source.read_into``) and merged by ONE
    set-based statement, the live path's (``indexer.readmodel.merge``), so it obeys the same ordering rule
    (docs/ordering.md) and can run while the live stream flows.  The chunk commits together with its
    checkpoint (``<schema>.backfill_checkpoints``, named by a hash of the source URL without
    password, the query and the ``--org`` scope); then the caches of the organizations it changed
    are invalidated.  ``--resume`` continues after the last committed chunk; without it a run
    starts over.  The organizations of the last committed chunk are kept in the checkpoint and
    invalidated again at the next start, in case a run died between commit and invalidation.

Versions
    A source row is an Insert (a ``deleted`` row a Delete) whose version is its
    ``transaction_timestamp`` column or, without one (or where it is NULL), the time of the
    snapshot it was read in: ``transaction_timestamp()`` of the chunk's source transaction,
    whose first statement takes the snapshot.  A live change committed after the snapshot has a
    later timestamp and wins; one committed before is in the snapshot already.  Insert, the
    lowest kind, lets a live change stamped with the very same µs win the tie.  Limitation: a
    source transaction that began before the snapshot but committed after it carries an earlier
    timestamp than the snapshot, so its live change loses to the backfilled (older) row until
    the mention changes again.  A source with a ``transaction_timestamp`` column has no such gap.

The unchanged rule
    The backfill writes a row only when doing so changes a visible field (``deleted``,
    ``organization_id``, ``mention_date``).  A row whose content equals the stored one counts as
    unchanged and is not written, not even to move its version forward, so a second run over
    the same data writes nothing, with explicit or with snapshot versions.  (The live path, in
    contrast, records every newer version.)

Counts (the summary line)
    read: source rows merged; inserted: new read-model rows; updated: rows it changed;
    unchanged: rows equal to the source (or exact duplicates of it); stale-skipped: rows a newer
    change (live, usually) had already superseded, including stale rows that only filled a field
    every newer change had left out; tombstoned: rows ``--prune`` deleted.

``--prune``
    Read-model rows of the scope that are not deleted and that the source does not return, within
    each chunk's keyset range (and after the last source row), get a Delete at the chunk's
    snapshot time, under the same guard: a live insert newer than the snapshot is not undone.
    With ``--org`` a candidate is first looked up in the whole source: one that moved to an
    organization outside the scope is updated (moved), not deleted.

``--dry-run`` runs every chunk and rolls it back: the counts are what would change; nothing is
written, no checkpoint recorded, no cache touched.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from indexer.cache import CacheInvalidator
from indexer.config import Settings
from indexer.ops.backfill.run import Options, Report, backfill

__all__ = ["Options", "Report", "backfill", "main"]


def main(settings: Settings, args: argparse.Namespace) -> int:
    """The ``backfill`` command; errors propagate as ``IndexerError`` for the CLI to map."""
    options = Options(
        source_url=settings.source_url,
        target_url=settings.database_url,
        schema=settings.schema_name,
        query=args.source_query,
        organizations=tuple(args.org or ()),
        batch_size=args.batch_size,
        prune=args.prune,
        resume=args.resume,
        dry_run=args.dry_run,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
    )
    report = asyncio.run(_run(settings, options))
    print(report.summary(), flush=True)
    return 0


async def _run(settings: Settings, options: Options) -> Report:
    async with CacheInvalidator.from_settings(settings) as cache:
        return await backfill(options, cache, progress_stream=sys.stderr)
