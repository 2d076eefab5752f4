-- migrate:up
-- Unauthenticated denials are aggregated per (client address, reason, status, minute): "bucket"
-- names that tuple, and every batch (every flush of every sidecar) adds its count to the one row
-- of its bucket, so a flood from one address is one row per minute whatever its size.
-- Individual rows (a request id, a tenant) have no bucket. Rows older than the audit retention
-- are deleted by the accountant, by "at" (indexed since the first audit migration).
ALTER TABLE audit_log ADD COLUMN bucket text;
CREATE UNIQUE INDEX audit_log_bucket_idx ON audit_log (bucket) WHERE bucket IS NOT NULL;

-- migrate:down
DROP INDEX audit_log_bucket_idx;
ALTER TABLE audit_log DROP COLUMN bucket;
