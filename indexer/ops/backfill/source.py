"""The backfill's source: the query it reads, cut into keyset chunks, and its checks.

The user's query is wrapped, never edited: ``SELECT <the five columns, cast> FROM (<query>) AS
source WHERE <scope and keyset> ORDER BY source.mention_id LIMIT n``.  Filtering and ordering on
the source's own ``mention_id`` lets Postgres push the keyset into a plain table query and walk
its primary key.  Statements that contain the user's query are sent without parameters, so a
``%`` in it is never taken for a placeholder; the values we add are SQL literals.  They are sent
one at a time over the extended protocol, in read-only transactions (``run``'s module doc), so the
query cannot stack statements of its own after the wrapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from indexer.errors import ConfigError
from indexer.redact import mask_url

REQUIRED_COLUMNS = ("mention_id", "organization_id", "mention_date")
OPTIONAL_COLUMNS = ("transaction_timestamp", "deleted")
DEFAULT_QUERY = "SELECT mention_id, organization_id, mention_date FROM public.mentions"

# Rows come out in exactly the column order and types of the staging table (binary COPY).
_ROWS = """
SELECT source.mention_id::bigint, source.organization_id::bigint, source.mention_date::timestamptz,
       {transaction_timestamp}, {deleted}
FROM (
{query}
) AS source
WHERE {conditions}
"""


def normalized(query: str | None) -> str:
    """The query without surrounding blanks and trailing semicolons (it becomes a subquery)."""
    text = (DEFAULT_QUERY if query is None else query).strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise ConfigError("--source-query is empty; give a query returning " + ", ".join(REQUIRED_COLUMNS))
    return text


def describe_query(query: str) -> sql.Composed:
    """A statement returning no row whose cursor description names the query's columns."""
    return sql.SQL("SELECT * FROM (\n{}\n) AS source LIMIT 0").format(sql.SQL(query))


@dataclass(frozen=True, slots=True)
class Source:
    query: str
    organizations: tuple[int, ...]
    """The scope: no organization means every one."""
    has_timestamp: bool
    has_deleted: bool

    @classmethod
    def checked(cls, query: str, organizations: Sequence[int], columns: Sequence[str]) -> Source:
        """The source, once the query's column names are known; ``ConfigError`` if one is missing."""
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise ConfigError(
                f"the source query returns no column {', '.join(map(repr, missing))}"
                f" (it returns {', '.join(map(repr, columns)) or 'no columns'});"
                " rename columns with AS: mention_id, organization_id, mention_date"
                " [, transaction_timestamp, deleted]"
            )
        return cls(
            query,
            tuple(sorted(set(organizations))),
            has_timestamp="transaction_timestamp" in columns,
            has_deleted="deleted" in columns,
        )

    def chunk(self, after: int | None, limit: int) -> sql.Composed:
        """The next ``limit`` rows of the scope after mention ``after`` (None: from the start)."""
        conditions = self._scope()
        if after is not None:
            conditions.append(sql.SQL("source.mention_id > {}").format(sql.Literal(after)))
        return sql.SQL("{} ORDER BY source.mention_id LIMIT {}").format(self._rows(conditions), sql.Literal(limit))

    def lookup(self, mention_ids: Sequence[int]) -> sql.Composed:
        """These mentions' rows, whatever their organization (a prune candidate may have moved
        out of the scope: then it still exists and must not be tombstoned)."""
        return self._rows([sql.SQL("source.mention_id = ANY({}::bigint[])").format(sql.Literal(list(mention_ids)))])

    def count(self, after: int | None) -> sql.Composed:
        """The number of rows ``chunk`` will read from ``after`` on (for the ETA)."""
        conditions = self._scope()
        if after is not None:
            conditions.append(sql.SQL("source.mention_id > {}").format(sql.Literal(after)))
        return sql.SQL("SELECT count(*) FROM (\n{}\n) AS source WHERE {}").format(
            sql.SQL(self.query), sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
        )

    def checkpoint_name(self, source_url: str) -> tuple[str, str]:
        """A stable name for this source and scope, and the description it is derived from."""
        description = json.dumps(
            {"source": mask_url(source_url), "query": self.query, "organizations": list(self.organizations)},
            sort_keys=True,
        )
        return "backfill-" + hashlib.sha256(description.encode()).hexdigest()[:16], description

    def _scope(self) -> list[sql.Composable]:
        if not self.organizations:
            return []
        return [sql.SQL("source.organization_id = ANY({}::bigint[])").format(sql.Literal(list(self.organizations)))]

    def _rows(self, conditions: list[sql.Composable]) -> sql.Composed:
        # Without a version column a row's version is its snapshot's time: the source
        # reads each chunk in one REPEATABLE READ transaction, whose transaction_timestamp() it is.
        timestamp = (
            "coalesce(source.transaction_timestamp::timestamptz, transaction_timestamp())"
            if self.has_timestamp
            else "transaction_timestamp()"
        )
        deleted = "coalesce(source.deleted::boolean, false)" if self.has_deleted else "false"
        return sql.SQL(_ROWS).format(
            transaction_timestamp=sql.SQL(timestamp),
            deleted=sql.SQL(deleted),
            query=sql.SQL(self.query),
            conditions=sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true"),
        )
