"""The one statement that writes changes into the read model, shared by the live path (``store``)
and the backfill, so both obey the same ordering rule (docs/ordering.md) by construction.

The statement upserts a relation of incoming writes, aliased ``c``, with the columns

    mention_id bigint, version bytea, transaction_timestamp timestamptz, change_kind smallint,
    organization_id bigint,      organization_version bytea,    -- NULL and '' when not carried
    mention_date timestamptz,    mention_date_version bytea     -- NULL and '' when not carried

(see ``registers`` for the three last-writer-wins registers of a row).  Postgres evaluates the
guard on the locked current row, never a value read earlier, so concurrent writers converge.
"""

from __future__ import annotations

from psycopg import sql

_MERGE = """
INSERT INTO {mentions} AS m (
    mention_id, version, transaction_timestamp, change_kind, deleted,
    organization_id, organization_version, mention_date, mention_date_version)
SELECT c.mention_id, c.version, c.transaction_timestamp, c.change_kind, c.change_kind = 3,
       -- A tombstone whose Deletes never named an organization sits in organization 0.
       coalesce(c.organization_id, 0), c.organization_version, c.mention_date, c.mention_date_version
FROM {incoming}
-- Rows are locked in mention_id order, so concurrent writers cannot deadlock each other.
ORDER BY c.mention_id
ON CONFLICT (mention_id) DO UPDATE SET
    -- The row register follows the highest-version change.
    version               = greatest(m.version, EXCLUDED.version),
    transaction_timestamp = CASE WHEN EXCLUDED.version > m.version
                                 THEN EXCLUDED.transaction_timestamp ELSE m.transaction_timestamp END,
    change_kind           = CASE WHEN EXCLUDED.version > m.version
                                 THEN EXCLUDED.change_kind ELSE m.change_kind END,
    deleted               = CASE WHEN EXCLUDED.version > m.version
                                 THEN EXCLUDED.deleted ELSE m.deleted END,
    -- Each field register follows the highest-version change that carried the field.
    organization_id       = CASE WHEN EXCLUDED.organization_version > m.organization_version
                                 THEN EXCLUDED.organization_id ELSE m.organization_id END,
    organization_version  = greatest(m.organization_version, EXCLUDED.organization_version),
    mention_date          = CASE WHEN EXCLUDED.mention_date_version > m.mention_date_version
                                 THEN EXCLUDED.mention_date ELSE m.mention_date END,
    mention_date_version  = greatest(m.mention_date_version, EXCLUDED.mention_date_version),
    previous_organization_id = m.organization_id,
    updated_at            = now()
WHERE {condition}
RETURNING m.mention_id, m.version, m.organization_id, m.previous_organization_id
"""

# The version guard: write when some register advances.  Equal versions are duplicates.
_ADVANCES_A_REGISTER = """
       {new}.version > {old}.version
    OR {new}.organization_version > {old}.organization_version
    OR {new}.mention_date_version > {old}.mention_date_version
"""

# The backfill's stronger condition: write only when an advancing register changes a visible
# field (deleted, organization_id, mention_date).  Each term implies the guard above.
_CHANGES_A_FIELD = """
       ({new}.version > {old}.version AND {new}.deleted <> {old}.deleted)
    OR ({new}.organization_version > {old}.organization_version
        AND {new}.organization_id <> {old}.organization_id)
    OR ({new}.mention_date_version > {old}.mention_date_version
        AND {new}.mention_date IS DISTINCT FROM {old}.mention_date)
"""


def changes_a_field(new: str, old: str) -> sql.Composed:
    """The backfill's condition between an incoming row aliased ``new`` (which must have a
    ``deleted`` column too) and a stored row aliased ``old``; our own aliases, not user input."""
    return _condition(_CHANGES_A_FIELD, new, old)


def merge_statement(mentions: sql.Identifier, incoming: sql.Composable, *, only_changed_fields: bool) -> sql.Composed:
    """The upsert of ``incoming`` (a FROM item that must alias itself ``c``) into ``mentions``.

    It returns, for every row it wrote: mention_id, the row's version after the write,
    organization_id and previous_organization_id (NULL exactly for a row it created).  With
    ``only_changed_fields`` a write that would only move versions forward is not made.
    """
    condition = _condition(_CHANGES_A_FIELD if only_changed_fields else _ADVANCES_A_REGISTER, "EXCLUDED", "m")
    return sql.SQL(_MERGE).format(mentions=mentions, incoming=incoming, condition=condition)


def _condition(template: str, new: str, old: str) -> sql.Composed:
    return sql.SQL(template.strip()).format(new=sql.SQL(new), old=sql.SQL(old))
