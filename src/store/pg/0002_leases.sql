-- Schema version 2: one lease per model (§9: one generation at a time per
-- model across replicas). Claimed under the head lock together with the
-- request's `started`; `epoch` is the fencing number every later event of
-- that generation presents; times are the database's clock.
CREATE TABLE easel_leases (
    model text PRIMARY KEY,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    lease_until timestamptz NOT NULL
);
