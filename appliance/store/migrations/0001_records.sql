-- One JSON record per key, as in the embedded engine. Keys are bytea, not text: record keys
-- contain NUL separators, which text cannot hold, and bytea compares bytewise, the same order
-- Badger lists in. version counts the writes of a row for optimistic concurrency.
CREATE TABLE records (
    key        bytea       PRIMARY KEY,
    value      bytea       NOT NULL,
    version    bigint      NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
