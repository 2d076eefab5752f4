-- migrate:up
-- Sidecars re-read changed keys and tenants from here when the Redis invalidation channel is down.
ALTER TABLE api_keys ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX api_keys_updated_idx ON api_keys (updated_at);
CREATE INDEX tenants_updated_idx ON tenants (updated_at);

-- migrate:down
DROP INDEX tenants_updated_idx;
DROP INDEX api_keys_updated_idx;
ALTER TABLE api_keys DROP COLUMN updated_at;
