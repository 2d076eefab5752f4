-- migrate:up
-- Limits scoped to a model pattern (docs/ARCHITECTURE.md#model-limits), on a tenant (key_id NULL)
-- or on a key. Values read as the unscoped ones: for a tenant NULL is no limit; for a key NULL
-- inherits the tenant's value on the same pattern and -1 is no key-level limit.
CREATE TABLE model_limits (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id          bigint REFERENCES api_keys (id) ON DELETE CASCADE,
    pattern         text NOT NULL CHECK (length(pattern) BETWEEN 1 AND 600),
    rpm             integer CHECK (rpm >= -1),
    tpm             bigint CHECK (tpm >= -1),
    max_concurrent  integer CHECK (max_concurrent >= -1),
    daily_tokens    bigint CHECK (daily_tokens >= -1),
    monthly_tokens  bigint CHECK (monthly_tokens >= -1),
    total_tokens    bigint CHECK (total_tokens >= -1),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- -1 only means something on a key
    CHECK (key_id IS NOT NULL OR least(rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens) >= 0
           OR least(rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens) IS NULL)
);
CREATE UNIQUE INDEX model_limits_tenant_pattern_idx ON model_limits (tenant_id, pattern) WHERE key_id IS NULL;
CREATE UNIQUE INDEX model_limits_key_pattern_idx ON model_limits (key_id, pattern) WHERE key_id IS NOT NULL;

-- The canonical model a request's reservation was decided on (NULL: none, or not a metered route).
ALTER TABLE usage_ledger ADD COLUMN model_key text;
CREATE INDEX usage_ledger_tenant_model_time_idx ON usage_ledger (tenant_id, model_key, finished_at)
    WHERE model_key IS NOT NULL;

-- Settled tokens and requests per budget period, per scope, per canonical model: a model rule's
-- counters are the sum over the models its pattern matches.
CREATE TABLE model_budget_periods (
    scope        text NOT NULL CHECK (scope IN ('tenant', 'key')),
    scope_id     bigint NOT NULL,
    model        text NOT NULL,
    period       text NOT NULL CHECK (period IN ('day', 'month', 'total')),
    period_start date NOT NULL,
    tokens       bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    requests     bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, scope_id, period, period_start, model)
);

-- migrate:down
DROP TABLE model_budget_periods;
DROP INDEX usage_ledger_tenant_model_time_idx;
ALTER TABLE usage_ledger DROP COLUMN model_key;
DROP TABLE model_limits;
