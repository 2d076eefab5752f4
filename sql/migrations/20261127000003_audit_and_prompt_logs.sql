-- migrate:up
-- Always-on request metadata. Never the key: only its id and prefix. Aggregated rows (a flood of
-- unknown keys from one address in one minute) carry the number of requests in "count".
CREATE TABLE audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    request_id   text,
    tenant_id    bigint,
    key_id       bigint,
    key_prefix   text,
    client_addr  text,
    method       text,
    path         text,
    model        text,
    status       integer NOT NULL,
    reason       text,
    tokens       bigint NOT NULL DEFAULT 0,
    latency_ms   double precision,
    user_agent   text,
    count        integer NOT NULL DEFAULT 1 CHECK (count >= 1)
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_tenant_at_idx ON audit_log (tenant_id, at);
CREATE INDEX audit_log_prefix_at_idx ON audit_log (key_prefix, at);
CREATE UNIQUE INDEX audit_log_request_idx ON audit_log (request_id) WHERE request_id IS NOT NULL;

-- Opt-in prompt logs; each row expires and is purged.
CREATE TABLE prompt_logs (
    request_id    text PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants (id),
    key_id        bigint NOT NULL REFERENCES api_keys (id),
    request_text  text NOT NULL,
    response_text text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX prompt_logs_expires_idx ON prompt_logs (expires_at);

-- migrate:down
DROP TABLE prompt_logs;
DROP TABLE audit_log;
