-- Keel transactional outbox and inbox (PostgreSQL 13+).
--
-- A template: {schema}, {outbox}, {inbox}, {leases} and {relays} are
-- replaced by identifiers that passed Keel's allowlist and are quoted
-- (see producers/src/outbox/tables.rs); nothing else is substituted.

CREATE TABLE IF NOT EXISTS {schema}.{outbox} (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic           TEXT        NOT NULL,
    event_id        UUID        NOT NULL UNIQUE,
    event_type      TEXT        NOT NULL,
    event_key       BYTEA       NOT NULL,
    -- murmur2(key) & 0x7fffffff, as Kafka partitions: the relay slot is
    -- key_hash % slots, so one key is always published by one relay.
    key_hash        INTEGER     NOT NULL CHECK (key_hash >= 0),
    occurred_at     TIMESTAMPTZ NOT NULL,
    source          TEXT,
    correlation_id  TEXT,
    causation_id    TEXT,
    traceparent     TEXT,
    tracestate      TEXT,
    -- Application headers, a JSON object of strings.
    headers         JSONB       NOT NULL DEFAULT '{}',
    -- Confluent-framed Avro.
    payload         BYTEA       NOT NULL,
    enqueued_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at    TIMESTAMPTZ,
    -- Failed publish attempts that the broker refused for this row.
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    -- Set when the row failed `max_attempts` times: the relay skips it
    -- until an operator re-queues it.
    parked_at       TIMESTAMPTZ
);

-- The relay's scan: unpublished rows in id order.
CREATE INDEX IF NOT EXISTS {outbox_pending_index}
    ON {schema}.{outbox} (id) WHERE published_at IS NULL AND parked_at IS NULL;
-- Parked rows, for the backlog figures (few, and rarely changed).
CREATE INDEX IF NOT EXISTS {outbox_parked_index}
    ON {schema}.{outbox} (id) WHERE published_at IS NULL AND parked_at IS NOT NULL;
-- Purging published rows after the retention. BRIN: a mark (an update of
-- every published row) costs next to nothing for it, unlike a b-tree.
CREATE INDEX IF NOT EXISTS {outbox_published_index}
    ON {schema}.{outbox} USING brin (published_at);

-- Relays alive (heartbeats); the live ones split the slots.
CREATE TABLE IF NOT EXISTS {schema}.{relays} (
    relay_id        TEXT        PRIMARY KEY,
    heartbeat_at    TIMESTAMPTZ NOT NULL,
    -- A random token per relay process: a second live process with the
    -- same relay_id cannot take the row over (it waits instead).
    token           TEXT        NOT NULL DEFAULT ''
);

-- One lease per slot: a relay publishes a slot's rows only while it holds
-- the slot's lease (expiry by the database's clock).
CREATE TABLE IF NOT EXISTS {schema}.{leases} (
    slot            INTEGER     PRIMARY KEY,
    owner           TEXT,
    expires_at      TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    -- Bumped on every change of owner (fencing token for logs and tests).
    epoch           BIGINT      NOT NULL DEFAULT 0
);

-- Events whose effect a consumer group applied, recorded in the handler's
-- own transaction.
CREATE TABLE IF NOT EXISTS {schema}.{inbox} (
    consumer_group  TEXT        NOT NULL,
    event_id        UUID        NOT NULL,
    topic           TEXT,
    processed_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX IF NOT EXISTS {inbox_processed_index}
    ON {schema}.{inbox} (processed_at);
