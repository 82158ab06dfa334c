-- Keel outbox: published rows move to an archive (PostgreSQL 13+).
--
-- A template, as 0001. The relay moves each row it published out of the
-- outbox into {archive}, kept there for the retention (replay from the
-- outbox) and purged from there. The outbox itself holds only unpublished
-- rows, so its indexes stay small and a VACUUM of it is cheap: the relay's
-- scan in id order no longer walks the index entries of every row
-- published since the last VACUUM of a table holding days of history.

CREATE TABLE IF NOT EXISTS {schema}.{archive} (
    id              BIGINT      PRIMARY KEY,
    topic           TEXT        NOT NULL,
    event_id        UUID        NOT NULL,
    event_type      TEXT        NOT NULL,
    event_key       BYTEA       NOT NULL,
    key_hash        INTEGER     NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    source          TEXT,
    correlation_id  TEXT,
    causation_id    TEXT,
    traceparent     TEXT,
    tracestate      TEXT,
    headers         JSONB       NOT NULL,
    payload         BYTEA       NOT NULL,
    enqueued_at     TIMESTAMPTZ NOT NULL,
    published_at    TIMESTAMPTZ NOT NULL,
    attempts        INTEGER     NOT NULL,
    last_error      TEXT
);
-- Purging after the retention.
CREATE INDEX IF NOT EXISTS {archive_published_index}
    ON {schema}.{archive} USING brin (published_at);

-- Rows published before this migration move too, in one statement (a
-- row marked meanwhile by a relay of the previous version is either moved
-- or stays for the next run; stop such relays before upgrading).
WITH moved AS (
    DELETE FROM {schema}.{outbox} WHERE published_at IS NOT NULL
    RETURNING id, topic, event_id, event_type, event_key, key_hash, occurred_at, source,
              correlation_id, causation_id, traceparent, tracestate, headers, payload,
              enqueued_at, published_at, attempts, last_error
)
INSERT INTO {schema}.{archive}
SELECT * FROM moved
ON CONFLICT (id) DO NOTHING;
DROP INDEX IF EXISTS {schema}.{outbox_published_index};

-- Autovacuum treats the outbox as the small queue it now is: after 10,000
-- published rows rather than a fifth of the table, at full speed (it is
-- small), and not for inserts alone (its rows leave soon; an insert-driven
-- run would only hold the table while the relay's own VACUUM, issued as
-- rows go out where the relay owns the table, skips it). Never truncating:
-- that takes a lock stopping every enqueue while it runs.
ALTER TABLE {schema}.{outbox} SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_vacuum_insert_threshold = -1,
    vacuum_truncate = false
);
