-- The read model (SPEC §5) and the backfill's checkpoint table (SPEC §8).
-- Rendered with psycopg.sql: {schema} is the quoted INDEXER_SCHEMA; a literal brace must be doubled.

CREATE TABLE {schema}.mentions (
    mention_id               bigint      PRIMARY KEY,
    -- 0 only for a tombstone created by a Delete that named no organization (protobuf's "not set").
    organization_id          bigint      NOT NULL,
    mention_date             timestamptz,
    -- With change_kind, the version of the last applied change: the store's guard compares it.
    transaction_timestamp    timestamptz NOT NULL,
    -- Kind rank of the last applied change: 1 inserted, 2 updated, 3 deleted (indexer.changes.Kind).
    change_kind              smallint    NOT NULL CHECK (change_kind BETWEEN 1 AND 3),
    deleted                  boolean     NOT NULL,
    -- Organization the row had before the last applied change (NULL after an insert), so the
    -- store can invalidate the cache a mention moved away from.
    previous_organization_id bigint,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mentions_deleted_follows_kind CHECK (deleted = (change_kind = 3))
)
-- Room on each page lets updates that keep organization_id be HOT (no index write).
WITH (fillfactor = 90);

CREATE INDEX mentions_organization_id_idx ON {schema}.mentions (organization_id);

-- One row per named backfill run; --resume continues after last_mention_id.
CREATE TABLE {schema}.backfill_checkpoints (
    name            text        PRIMARY KEY,
    last_mention_id bigint,
    -- The version given to source rows without a transaction_timestamp (SPEC §8).
    snapshot_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
