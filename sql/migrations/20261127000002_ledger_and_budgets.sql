-- migrate:up
-- One row per request id: the accountant inserts with ON CONFLICT DO NOTHING, so a usage event
-- delivered twice is counted once.
CREATE TABLE usage_ledger (
    request_id        text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 100),
    tenant_id         bigint NOT NULL REFERENCES tenants (id),
    key_id            bigint NOT NULL REFERENCES api_keys (id),
    endpoint          text NOT NULL,
    model             text,
    prompt_tokens     bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    total_tokens      bigint GENERATED ALWAYS AS (prompt_tokens + completion_tokens) STORED,
    reserved_tokens   bigint NOT NULL DEFAULT 0 CHECK (reserved_tokens >= 0),
    estimated         boolean NOT NULL DEFAULT false,
    estimate_reason   text,
    http_status       integer NOT NULL,
    upstream_status   integer,
    started_at        timestamptz NOT NULL,
    first_byte_at     timestamptz,
    finished_at       timestamptz NOT NULL,
    bytes_relayed     bigint NOT NULL DEFAULT 0,
    client_disconnected boolean NOT NULL DEFAULT false,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (estimated = (estimate_reason IS NOT NULL))
);
CREATE INDEX usage_ledger_tenant_time_idx ON usage_ledger (tenant_id, finished_at);
CREATE INDEX usage_ledger_key_time_idx ON usage_ledger (key_id, finished_at);

-- Settled token totals per budget period, per scope. period_start is the first day of the period
-- in the configured budget time zone; the total period uses 'epoch' ('1970-01-01').
CREATE TABLE budget_periods (
    scope        text NOT NULL CHECK (scope IN ('tenant', 'key')),
    scope_id     bigint NOT NULL,
    period       text NOT NULL CHECK (period IN ('day', 'month', 'total')),
    period_start date NOT NULL,
    tokens       bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, scope_id, period, period_start)
);

-- migrate:down
DROP TABLE budget_periods;
DROP TABLE usage_ledger;
