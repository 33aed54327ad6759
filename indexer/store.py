"""The Postgres read model: apply a batch of changes under the version guard (SPEC §5, §6).

The guard is evaluated by Postgres on the locked current row (``ON CONFLICT ... DO UPDATE ...
WHERE incoming_version > stored_version``), never by reading first and deciding in Python, so two
indexers racing on the same mentions converge on the same row.

Fields a change leaves out are merged from the stored row:

* ``organization_id`` None (a Delete that named none; 0 is protobuf's "not set" and means the
  same): the stored organization is kept.  With no stored row the tombstone gets organization 0,
  which is never reported for cache invalidation.
* ``mention_date`` None: the stored date is kept.

The guard compares the *effective* (merged) values, so it matches ``changes.version_key`` exactly
for changes that carry every field.  For a change that omits one, the merged value is whatever had
arrived before it, so the table can depend on delivery order (tests/test_store_merge.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql

from .changes import Change, coalesce, touched_organizations
from .errors import Conflict, Refused, Unavailable

# Placeholder organization of a tombstone whose Delete named none (see module docstring).
UNKNOWN_ORGANIZATION = 0

_UPSERT = """
INSERT INTO {mentions} AS m
    (mention_id, organization_id, mention_date, transaction_timestamp, change_kind, deleted)
SELECT c.mention_id, coalesce(c.organization_id, 0), c.mention_date, c.transaction_timestamp,
       c.change_kind, c.change_kind = 3
FROM unnest(%s::bigint[], %s::bigint[], %s::timestamptz[], %s::timestamptz[], %s::smallint[])
    AS c(mention_id, organization_id, mention_date, transaction_timestamp, change_kind)
-- Rows are locked in mention_id order, so concurrent batches cannot deadlock each other.
ORDER BY c.mention_id
ON CONFLICT (mention_id) DO UPDATE SET
    organization_id = coalesce(nullif(EXCLUDED.organization_id, 0), m.organization_id),
    mention_date = coalesce(EXCLUDED.mention_date, m.mention_date),
    transaction_timestamp = EXCLUDED.transaction_timestamp,
    change_kind = EXCLUDED.change_kind,
    deleted = EXCLUDED.deleted,
    previous_organization_id = m.organization_id,
    updated_at = now()
WHERE (EXCLUDED.transaction_timestamp, EXCLUDED.change_kind,
       coalesce(nullif(EXCLUDED.organization_id, 0), m.organization_id),
       coalesce(EXCLUDED.mention_date, m.mention_date, '-infinity'))
    > (m.transaction_timestamp, m.change_kind, m.organization_id,
       coalesce(m.mention_date, '-infinity'))
RETURNING mention_id, organization_id, previous_organization_id
"""

# For skipped changes (duplicates, stale): the organizations the stored row is in and came from,
# so a redelivery whose first delivery lost its invalidation still invalidates (SPEC §7).
_STORED_ORGANIZATIONS = """
SELECT organization_id, previous_organization_id FROM {mentions} WHERE mention_id = ANY(%s::bigint[])
"""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    """Changes that replaced (or created) their mention's row."""
    skipped: int
    """Changes that changed nothing: stale, duplicate, or superseded within the batch."""
    organizations: frozenset[int]
    """Organizations whose caches must be invalidated, applied or not."""


class Store:
    """The read model over ONE connection, opened lazily and reopened after a failure.

    Not safe for concurrent use: the service applies one batch at a time.
    """

    def __init__(self, url: str, schema: str, *, connect_timeout_s: int = 5) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        mentions = sql.Identifier(schema, "mentions")
        self._upsert = sql.SQL(_UPSERT).format(mentions=mentions)
        self._stored_organizations = sql.SQL(_STORED_ORGANIZATIONS).format(mentions=mentions)
        self._conn: psycopg.AsyncConnection | None = None

    async def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Apply a batch under the version guard and commit.

        Any batch is accepted; it is coalesced here too (a no-op on a coalesced one).  Raises
        ``Unavailable`` or ``Conflict``; in both cases nothing was committed and the batch can be
        retried as it is.  ``Refused`` when Postgres rejects a value of the batch; the caller
        can apply the changes one by one to find the culprit.
        """
        batch = coalesce(changes)
        if not batch:
            return ApplyResult(0, 0, frozenset())
        params = (
            [c.mention_id for c in batch],
            [c.organization_id for c in batch],
            [c.mention_date for c in batch],
            [c.transaction_timestamp for c in batch],
            [int(c.kind) for c in batch],
        )
        organizations = touched_organizations(changes)
        try:
            async with self._session() as conn, conn.transaction():
                cursor = await conn.execute(self._upsert, params, binary=True)
                returned = await cursor.fetchall()
                applied_ids = set()
                for mention_id, organization_id, previous_organization_id in returned:
                    applied_ids.add(mention_id)
                    organizations.add(organization_id)
                    if previous_organization_id is not None:
                        organizations.add(previous_organization_id)
                skipped_ids = [c.mention_id for c in batch if c.mention_id not in applied_ids]
                if skipped_ids:
                    cursor = await conn.execute(self._stored_organizations, (skipped_ids,), binary=True)
                    for row in await cursor.fetchall():
                        organizations.update(org for org in row if org is not None)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # A value Postgres cannot take (e.g. an id beyond bigint): retrying cannot help.
            raise Refused(f"postgres refused the batch: {exc.sqlstate} {exc.diag.message_primary}") from exc
        organizations.discard(UNKNOWN_ORGANIZATION)
        return ApplyResult(len(returned), len(changes) - len(returned), frozenset(organizations))

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless Postgres answers a query."""
        async with self._session() as conn:
            await conn.execute("SELECT 1")

    async def aclose(self) -> None:
        await self._discard()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """The store's connection, opened if needed; errors come out as ``Unavailable``/``Conflict``."""
        try:
            with translate_errors(self._url):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, **connection_options(self._connect_timeout_s)
                    )
                yield self._conn
        except Unavailable:
            await self._discard()
            raise
        except BaseException:
            # Cancelled mid-statement (shutdown) or similar: the connection's state is unknown.
            if self._conn is not None and self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._discard()
            raise

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # closing a broken connection may fail; it is gone either way
                pass


def connection_options(connect_timeout_s: int) -> dict[str, object]:
    """libpq options shared by every connection of the indexer."""
    return {
        "connect_timeout": connect_timeout_s,
        "application_name": "mention-indexer",
        # A silently dropped peer surfaces as an error within ~30 s instead of a hang.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Map psycopg errors to what the caller must do: ``Conflict`` (re-run) or ``Unavailable`` (wait).

    Anything else (a bug, a constraint violation) propagates unchanged.
    """
    try:
        yield
    except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as exc:
        raise Conflict(f"postgres aborted the transaction: {exc.sqlstate} {exc.diag.message_primary}") from exc
    except psycopg.OperationalError as exc:
        # "from None": the chained original would print the unscrubbed text in a traceback.
        raise Unavailable("postgres", url, _without_password(str(exc).strip(), url)) from None


def _without_password(text: str, url: str) -> str:
    password = urlsplit(url).password
    for form in {password, unquote(password)} if password else ():
        text = text.replace(form, "***")
    return text
