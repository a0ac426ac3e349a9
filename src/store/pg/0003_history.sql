-- Schema version 3: what the log keeps beside its events (src/store/pg/history.rs).

-- The newest checkpoint of the live projection, written by the replicas;
-- a replica starts from it and reads only the log after it.
CREATE TABLE easel_checkpoint (
    id smallint PRIMARY KEY CHECK (id = 1),
    position bigint NOT NULL,
    state bytea NOT NULL
);

-- Finished requests past the retention window, moved out of the log whole.
CREATE TABLE easel_archive (LIKE easel_events INCLUDING ALL);

-- The request index: each request's `queued`, by creation time.
CREATE INDEX easel_events_queued ON easel_events (at, position)
    WHERE (record->'event'->>'type') = 'queued';
