"""The Postgres read model: apply a batch of changes under the version guard (SPEC §5, §6).

A batch is folded into one write per mention (``registers.fold``) and written by the statement
shared with the backfill (``merge``): the row follows the highest-version change, and
``organization_id`` and ``mention_date`` each follow the highest-version change that carried
them, so a change that leaves a field out (a Delete without organization, a change without
date) gives the same table in any delivery order.  The guard is evaluated by Postgres on the
locked current row, never by reading first and deciding in Python, so two indexers racing on the
same mentions converge on the same row.

A Delete that names no organization (0 is protobuf's "not set" and means the same) of a mention
never seen before leaves a tombstone in organization 0, which is never reported for cache
invalidation; the first change that carries an organization moves it.

Callers must pass every change, not a ``changes.coalesce``-d batch: coalescing drops a lower
change that may carry a field the newest one left out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import sql

from .changes import Change, touched_organizations
from .errors import Conflict, Refused, Unavailable
from .merge import merge_statement
from .registers import fold

# Placeholder organization of a tombstone whose Deletes named none (see module docstring).
UNKNOWN_ORGANIZATION = 0
# The live path never idles inside a transaction: one statement, then commit.
IDLE_IN_TRANSACTION_TIMEOUT_S = 10

_INCOMING = """
unnest(%s::bigint[], %s::bytea[], %s::timestamptz[], %s::smallint[],
       %s::bigint[], %s::bytea[], %s::timestamptz[], %s::bytea[])
    AS c(mention_id, version, transaction_timestamp, change_kind,
         organization_id, organization_version, mention_date, mention_date_version)
"""

# For mentions the batch did not write (duplicates, stale): the organizations the stored row is
# in and came from, so a redelivery whose first delivery lost its invalidation still invalidates
# (SPEC §7).
_STORED_ORGANIZATIONS = """
SELECT organization_id, previous_organization_id FROM {mentions} WHERE mention_id = ANY(%s::bigint[])
"""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    """Mentions whose row now holds this batch's newest change for them (created or advanced)."""
    skipped: int
    """The other changes: stale, duplicate, or superseded within the batch.  A stale change may
    still have filled a field that every newer change left out (see ``registers``)."""
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
        self._upsert = merge_statement(mentions, sql.SQL(_INCOMING), only_changed_fields=False)
        self._stored_organizations = sql.SQL(_STORED_ORGANIZATIONS).format(mentions=mentions)
        self._conn: psycopg.AsyncConnection | None = None

    async def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Apply a batch under the version guard and commit.

        Any batch is accepted, with duplicates and several changes per mention.  Raises
        ``Unavailable`` or ``Conflict``; in both cases nothing was committed and the batch can be
        retried as it is.  ``Refused`` when a value of the batch cannot be stored; the caller can
        apply the changes one by one to find the culprit.
        """
        try:
            writes = fold(changes)
        except ValueError as exc:  # an organization beyond int64 has no version
            raise Refused(f"unusable change: {exc}") from exc
        if not writes:
            return ApplyResult(0, 0, frozenset())
        params = (
            [w.mention_id for w in writes],
            [w.version for w in writes],
            [w.transaction_timestamp for w in writes],
            [int(w.kind) for w in writes],
            [w.organization_id for w in writes],
            [w.organization_version for w in writes],
            [w.mention_date for w in writes],
            [w.mention_date_version for w in writes],
        )
        versions = {w.mention_id: w.version for w in writes}
        organizations = touched_organizations(changes)
        try:
            async with self._session() as conn, conn.transaction():
                cursor = await conn.execute(self._upsert, params, binary=True)
                written = await cursor.fetchall()
                applied = 0
                for mention_id, version, organization_id, previous_organization_id in written:
                    # Written but still at a newer version: a stale change that filled a field.
                    applied += version == versions.pop(mention_id)
                    organizations.add(organization_id)
                    if previous_organization_id is not None:
                        organizations.add(previous_organization_id)
                if versions:  # the mentions nothing was written for
                    cursor = await conn.execute(self._stored_organizations, (list(versions),), binary=True)
                    for row in await cursor.fetchall():
                        organizations.update(org for org in row if org is not None)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # A value Postgres cannot take (e.g. an id beyond bigint): retrying cannot help.
            raise Refused(f"postgres refused the batch: {exc.sqlstate} {exc.diag.message_primary}") from exc
        organizations.discard(UNKNOWN_ORGANIZATION)
        return ApplyResult(applied, len(changes) - applied, frozenset(organizations))

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
                        self._url,
                        autocommit=True,
                        **connection_options(self._connect_timeout_s, idle_in_transaction_timeout_s=IDLE_IN_TRANSACTION_TIMEOUT_S),
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


def connection_options(connect_timeout_s: int, *, idle_in_transaction_timeout_s: int | None = None) -> dict[str, object]:
    """libpq options shared by every connection of the indexer."""
    options: dict[str, object] = {
        "connect_timeout": connect_timeout_s,
        "application_name": "mention-indexer",
        # A silently dropped peer surfaces as an error within ~30 s instead of a hang.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    if idle_in_transaction_timeout_s is not None:
        # A session orphaned mid-transaction (our side reconnected, the server never noticed)
        # would keep its row locks and block the new session for hours: let Postgres end it.
        options["options"] = f"-c idle_in_transaction_session_timeout={idle_in_transaction_timeout_s}s"
    return options


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
    parts = urlsplit(url)
    secrets = {parts.password} if parts.password else set()
    secrets |= {value for name, value in parse_qsl(parts.query) if name.lower() in ("password", "sslpassword") and value}
    for secret in secrets:
        for form in {secret, unquote(secret)}:
            text = text.replace(form, "***")
    return text
