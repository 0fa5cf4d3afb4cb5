-- A random identity for this store (this database and schema), created once. It is part of every shared
-- (Redis) decision-cache key: the version counter starts at 1 in every database, so without it two
-- deployments sharing a Redis and a key prefix could read each other's decisions.
-- An identity, not a secret: md5 of random() (seeded per backend from a strong source), the clock, the
-- backend pid and the transaction id; works on every supported PostgreSQL, no extension needed.
CREATE TABLE IF NOT EXISTS entitlement_store_epoch (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch      text NOT NULL CHECK (epoch <> '')
);
INSERT INTO entitlement_store_epoch (singleton, epoch)
VALUES (true, md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text || txid_current()::text))
ON CONFLICT DO NOTHING;
