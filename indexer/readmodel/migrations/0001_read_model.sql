-- The read model (docs/ordering.md) and the backfill's checkpoint table.
-- Rendered with psycopg.sql: {schema} is the quoted INDEXER_SCHEMA; a literal brace must be doubled.
-- Needs PostgreSQL 14 or later (extract(epoch ...) returning an exact numeric).

-- A change's version as bytes that compare (memcmp) in the version order of indexer/changes.py: the SQL twin of
-- indexer.changes.version_bytes, used where Postgres computes versions itself (the backfill).
-- Each part is a big-endian integer with its sign bit flipped: µs since the epoch, kind rank,
-- organization (-1 when absent) and mention date in µs (0001-01-01 UTC when absent).
CREATE FUNCTION {schema}.version_bytes(
    transaction_timestamp timestamptz, change_kind smallint, organization_id bigint, mention_date timestamptz
) RETURNS bytea
-- Only immutable parts (interval arithmetic, not extract(epoch FROM timestamptz), which is
-- merely stable), so that Postgres inlines the function into the backfill's statement.
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT int8send((extract(epoch FROM transaction_timestamp - timestamptz '1970-01-01 00:00:00+00') * 1000000)::bigint
                    # (-9223372036854775808)::bigint)
        || int2send(change_kind # (-32768)::smallint)
        || int8send(coalesce(organization_id, -1) # (-9223372036854775808)::bigint)
        || int8send(coalesce((extract(epoch FROM mention_date - timestamptz '1970-01-01 00:00:00+00') * 1000000)::bigint,
                             -62135596800000000)
                    # (-9223372036854775808)::bigint)
$$;

CREATE TABLE {schema}.mentions (
    mention_id               bigint      PRIMARY KEY,
    -- 0 only for a tombstone whose Deletes never named an organization (protobuf's "not set").
    organization_id          bigint      NOT NULL,
    mention_date             timestamptz,
    -- Of the last applied change (the highest version); version is what the guard compares.
    transaction_timestamp    timestamptz NOT NULL,
    -- Kind rank: 1 inserted, 2 updated, 3 deleted (indexer.changes.Kind).
    change_kind              smallint    NOT NULL CHECK (change_kind BETWEEN 1 AND 3),
    deleted                  boolean     NOT NULL,
    version                  bytea       NOT NULL,
    -- Versions of the changes organization_id and mention_date come from: the highest-version
    -- change that carried the field; empty (sorts below every version) when none did.
    -- See indexer/readmodel/registers.py.
    organization_version     bytea       NOT NULL DEFAULT '',
    mention_date_version     bytea       NOT NULL DEFAULT '',
    -- Organization the row had before its last write (NULL until the first update), so the
    -- store can invalidate the cache a mention moved away from.
    previous_organization_id bigint,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mentions_deleted_follows_kind CHECK (deleted = (change_kind = 3))
)
-- Room on each page lets updates that keep organization_id be HOT (no index write).
WITH (fillfactor = 90);

CREATE INDEX mentions_organization_id_idx ON {schema}.mentions (organization_id);

-- One row per backfill source and scope (indexer/ops/backfill); --resume continues after last_mention_id.
CREATE TABLE {schema}.backfill_checkpoints (
    name                  text        PRIMARY KEY,
    -- What the name was derived from (source URL without password, query, scope), for people.
    description           text        NOT NULL,
    -- Last mention of the last committed chunk; NULL before the first.
    last_mention_id       bigint,
    -- The version given to source rows without a transaction_timestamp in that chunk.
    snapshot_at           timestamptz,
    -- Organizations the last committed chunk changed: invalidated again at the next start, in
    -- case the run died between the commit and the invalidation.
    pending_organizations bigint[]    NOT NULL DEFAULT '{{}}',
    completed_at          timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now()
);
