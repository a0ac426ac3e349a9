-- easel's event log on PostgreSQL, schema version 1 (src/store/pg.rs).

-- The one head row: every append transaction locks it first and takes the
-- next positions from it, so positions are contiguous and in commit order.
CREATE TABLE easel_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    position bigint NOT NULL
);
INSERT INTO easel_head (id, position) VALUES (1, 0);

-- The log. `record` is the codec's stored JSON, with its version `v`.
CREATE TABLE easel_events (
    position bigint PRIMARY KEY,
    request_id uuid NOT NULL,
    at timestamptz NOT NULL,
    record json NOT NULL
);
CREATE INDEX easel_events_by_request ON easel_events (request_id, position);
CREATE INDEX easel_events_by_time ON easel_events (at);

-- Intake keys: one request per Telegram update, and per chat message.
CREATE TABLE easel_intake_updates (
    update_id bigint PRIMARY KEY,
    request_id uuid NOT NULL
);
CREATE TABLE easel_intake_messages (
    chat_id bigint NOT NULL,
    message_id integer NOT NULL,
    request_id uuid NOT NULL,
    PRIMARY KEY (chat_id, message_id)
);

-- Small named values outside the log (offsets, status message ids).
CREATE TABLE easel_meta (
    name text PRIMARY KEY,
    value bytea NOT NULL
);
