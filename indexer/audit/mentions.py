"""The source against the read model: by checksums of id ranges, down to rows only where they differ.

A full pass (``MentionAudit.full``) walks the id range of the scope in chunks of about
``CHUNK_ROWS`` rows.  For each chunk, each side returns the count and checksum of its live rows
(one statement: one snapshot of that side, the read model's taken before the source's, so the read
model is never ahead of what the source showed).  Equal chunks are done; a chunk that differs is
cut into ``FANOUT`` buckets, again by checksum, and so on down to buckets of at most
``LEAF_ROWS`` rows, whose rows are read and compared one by one.  A consistent table of a million
rows costs a few statements per side.

A sample (``MentionAudit.sample``, the continuous audit) compares windows of consecutive ids that
start at random: at most ``size`` rows read per side.

Differences found are *candidates* until settled: a source row newer than the read model's
watermark is in flight and counted so at once; the others are read again on both sides after
``settle_s`` (the read model first), by id and whatever their organization (a mention that moved
out of the scope is ``changed``, not ``extra``).  What agrees by then, or is newer than the
watermark, was in flight; the rest is reported, with the time of the source snapshot it was last
seen in (the version a repair gives it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from indexer.audit.model import Difference, MentionResult, Seen, difference_kind, in_flight, live
from indexer.errors import ConfigError
from indexer.ids import MAX_ID
from indexer.readmodel.checksums import PROBE, Method, ModelReader
from indexer.readmodel.source import Source, SourceSession

log = logging.getLogger(__name__)

CHUNK_ROWS = 200_000  # rows per top-level chunk: one statement (one snapshot) per side
FANOUT = 1024  # buckets a differing range is cut into
LEAF_ROWS = 2_000  # a bucket this small is read row by row
_RANGES_PER_STATEMENT = 100  # leaf ranges read by one statement
_IDS_PER_LOOKUP = 1_000
_WINDOW_ROWS = 100  # rows per window of a sample
SETTLE_S = 1.0


class Sides:
    """The two readers of one audit: the read model's connection and the source's session."""

    def __init__(self, model: ModelReader, session: SourceSession, source: Source, method: Method) -> None:
        self.model = model
        self.session = session
        self.source = source
        self.method = method

    @classmethod
    async def open(
        cls,
        *,
        database_url: str,
        schema: str,
        source_url: str,
        query: str,
        organizations: Sequence[int],
        statement_timeout_s: int = 0,
    ) -> Sides:
        model = ModelReader(database_url, schema, organizations, statement_timeout_s=statement_timeout_s)
        try:
            ours = await model.probe()
            await model.bounds()  # the read model exists (or ConfigError: migrate first)
            session = await SourceSession.connect(source_url, statement_timeout_s=statement_timeout_s)
        except BaseException:
            await model.aclose()
            raise
        try:
            source = await session.open(query, organizations)
            theirs = await _probe(session)
        except BaseException:
            await session.close()
            await model.aclose()
            raise
        method = Method.RECORD if ours is not None and ours == theirs else Method.MD5
        if method is Method.MD5:
            log.warning("the two servers hash rows differently (%s, %s): comparing md5 checksums instead", ours, theirs)
        return cls(model, session, source, method)

    async def aclose(self) -> None:
        try:
            await self.session.close()
        finally:
            await self.model.aclose()

    async def bounds(self) -> tuple[int | None, int | None]:
        low, high = await self.model.bounds()
        rows = await self.session.fetch(self.source.bounds())
        lows = [value for value in (low, rows[0][0]) if value is not None]
        highs = [value for value in (high, rows[0][1]) if value is not None]
        return (min(lows) if lows else None), (max(highs) if highs else None)

    async def next_id(self, after: int) -> int | None:
        ours = await self.model.next_id(after)
        theirs = (await self.session.fetch(self.source.next_id(after)))[0][0]
        found = [value for value in (ours, theirs) if value is not None]
        return min(found) if found else None

    async def buckets(self, lo: int, hi: int, width: int) -> tuple[dict[int, Any], dict[int, Any]]:
        """(read model, source) checksums per bucket; the read model's snapshot first."""
        ours = await self.model.buckets(lo, hi, width, self.method)
        theirs = await self.session.fetch(self.source.buckets(lo, hi, width, self.method))
        return ours, {bucket: (count, checksum) for bucket, count, checksum in theirs}

    async def rows(
        self, ranges: Sequence[tuple[int, int]], *, limit: int | None = None
    ) -> tuple[list[Seen], list[Seen]]:
        ours = await self.model.compared(ranges, limit=limit)
        theirs = await self.session.fetch(self.source.compared(ranges, limit=limit))
        return [Seen.of(row) for row in ours], [Seen.of(row) for row in theirs]

    async def lookup(self, mention_ids: Sequence[int]) -> tuple[list[Seen], list[Seen], datetime]:
        """Both sides' rows of these mentions, whatever their organization, and the source snapshot's time."""
        ours = await self.model.compared_ids(mention_ids)
        async with self.session.snapshot() as seen_at:
            theirs = await self.session.fetch(self.source.compared_ids(mention_ids))
        return [Seen.of(row) for row in ours], [Seen.of(row) for row in theirs], seen_at


async def _probe(session: SourceSession) -> int | None:
    try:
        rows = await session.fetch(PROBE)
    except ConfigError:  # no hash_record_extended there (PostgreSQL before 14)
        return None
    return int(rows[0][0])


class MentionAudit:
    """One pass over the scope of ``sides``; ``watermark`` is the read model's newest applied version."""

    def __init__(self, sides: Sides, *, watermark: datetime | None, settle_s: float = SETTLE_S) -> None:
        self._sides = sides
        self._watermark = watermark
        self._settle_s = settle_s
        self.result = MentionResult()
        self._candidates: list[int] = []
        self._leaves: list[tuple[int, int]] = []

    async def full(self) -> MentionResult:
        sides = self._sides
        lo, hi = await sides.bounds()
        if lo is not None and hi is not None:
            width = await self._first_width(lo, hi)
            start = lo
            while start <= hi:
                end = min(hi, start + width - 1)
                ours, theirs = await sides.buckets(start, end, end - start + 1)
                mine, other = ours.get(0, (0, None)), theirs.get(0, (0, None))
                rows = max(mine[0], other[0])
                if mine == other:
                    self.result.counts.checked += mine[0]
                else:
                    await self._descend(start, end, rows)
                    await self._flush()
                if rows == 0:  # a gap in the ids: step to the next one there is
                    following = await sides.next_id(end)
                    if following is None:
                        break
                    start = following
                    continue
                width = max(1, int(width * min(8.0, max(0.125, CHUNK_ROWS / rows))))
                start = end + 1
        await self._settle()
        return self.result

    async def sample(self, size: int, rng: random.Random) -> MentionResult:
        """Windows of consecutive ids from random starts, ``size`` rows per side at most in all."""
        lo, hi = await self._sides.bounds()
        if lo is not None and hi is not None:
            windows = max(1, -(-size // _WINDOW_ROWS))
            per_window = max(1, -(-size // windows))
            seen: set[int] = set()
            for _ in range(windows):
                start = rng.randint(lo, hi)
                ours, theirs = await self._sides.rows([(start, MAX_ID)], limit=per_window)
                end = MAX_ID
                for side in (ours, theirs):
                    if len(side) == per_window:
                        end = min(end, side[-1].mention_id)
                self._compare(
                    [row for row in ours if row.mention_id <= end and row.mention_id not in seen],
                    [row for row in theirs if row.mention_id <= end and row.mention_id not in seen],
                )
                seen.update(row.mention_id for row in (*ours, *theirs) if row.mention_id <= end)
        await self._settle()
        return self.result

    async def _first_width(self, lo: int, hi: int) -> int:
        """Ids per chunk for about ``CHUNK_ROWS`` rows, from Postgres's estimate of the table."""
        estimate = await self._sides.model.estimated_rows()
        if not estimate:
            return CHUNK_ROWS
        return max(1, int(CHUNK_ROWS * (hi - lo + 1) / estimate))

    async def _descend(self, lo: int, hi: int, rows: int) -> None:
        if rows <= LEAF_ROWS or lo == hi:
            self._leaves.append((lo, hi))
            if len(self._leaves) >= _RANGES_PER_STATEMENT:
                await self._flush()
            return
        width = -(-(hi - lo + 1) // FANOUT)
        ours, theirs = await self._sides.buckets(lo, hi, width)
        for bucket in sorted(ours.keys() | theirs.keys()):
            mine, other = ours.get(bucket, (0, None)), theirs.get(bucket, (0, None))
            if mine == other:
                self.result.counts.checked += mine[0]
                continue
            start = lo + bucket * width
            await self._descend(start, min(hi, start + width - 1), max(mine[0], other[0]))

    async def _flush(self) -> None:
        leaves, self._leaves = self._leaves, []
        if leaves:
            ours, theirs = await self._sides.rows(leaves)
            self._compare(ours, theirs)

    def _compare(self, ours: list[Seen], theirs: list[Seen]) -> None:
        model = {row.mention_id: row for row in ours}
        source = {row.mention_id: row for row in theirs}
        counts = self.result.counts
        for mention_id in sorted(model.keys() | source.keys()):
            in_source, in_model = source.get(mention_id), model.get(mention_id)
            if not (live(in_source) or live(in_model)):
                continue
            counts.checked += 1
            if difference_kind(in_source, in_model) is None:
                continue
            if in_flight(in_source, self._watermark):
                counts.in_flight += 1
            else:
                self._candidates.append(mention_id)

    async def _settle(self) -> None:
        candidates, self._candidates = self._candidates, []
        if not candidates:
            return
        await asyncio.sleep(self._settle_s)
        for start in range(0, len(candidates), _IDS_PER_LOOKUP):
            batch = candidates[start : start + _IDS_PER_LOOKUP]
            ours, theirs, seen_at = await self._sides.lookup(batch)
            model = {row.mention_id: row for row in ours}
            source = {row.mention_id: row for row in theirs}
            for mention_id in batch:
                in_source, in_model = source.get(mention_id), model.get(mention_id)
                kind = difference_kind(in_source, in_model)
                if kind is None or in_flight(in_source, self._watermark):
                    self.result.counts.in_flight += 1
                else:
                    self.result.add(Difference(kind, mention_id, in_source, in_model, seen_at))
