-- The invalidations a committed batch still owes: written in the batch's own transaction, deleted
-- once its organizations' caches are invalidated.  A row left behind (the indexer died between
-- commit and invalidation) is finished by any indexer: at its start, and by a periodic sweep of
-- rows older than INDEXER_OUTBOX_AGE_S (indexer/readmodel/outbox.py).
CREATE TABLE {schema}.invalidation_outbox (
    id            bigserial   PRIMARY KEY,
    organizations bigint[]    NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX invalidation_outbox_created_at ON {schema}.invalidation_outbox (created_at);
