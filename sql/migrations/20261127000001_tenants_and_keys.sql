-- migrate:up
-- Tenants own keys and carry the default limits every key inherits.
-- For tenants a NULL limit means "no limit". For keys a NULL means "inherit the tenant's value"
-- and -1 means "no key-level limit" (the tenant's limit still applies: both scopes are enforced).
CREATE TABLE tenants (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    rpm             integer CHECK (rpm >= 0),
    tpm             bigint CHECK (tpm >= 0),
    max_concurrent  integer CHECK (max_concurrent >= 0),
    daily_tokens    bigint CHECK (daily_tokens >= 0),
    monthly_tokens  bigint CHECK (monthly_tokens >= 0),
    total_tokens    bigint CHECK (total_tokens >= 0),
    allowed_models  text[],                       -- NULL: every model
    max_body_bytes  bigint CHECK (max_body_bytes > 0),
    max_num_ctx     integer CHECK (max_num_ctx > 0),
    max_keep_alive_seconds integer CHECK (max_keep_alive_seconds >= 0),
    prompt_logging  boolean NOT NULL DEFAULT false,
    prompt_log_ttl_seconds integer CHECK (prompt_log_ttl_seconds > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT prompt_logging OR prompt_log_ttl_seconds IS NOT NULL)
);

CREATE TABLE api_keys (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix          text NOT NULL UNIQUE CHECK (prefix ~ '^[0-9A-Za-z]{8}$'),
    hash            text NOT NULL CHECK (hash LIKE '$argon2id$%'),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz,
    rpm             integer CHECK (rpm >= -1),
    tpm             bigint CHECK (tpm >= -1),
    max_concurrent  integer CHECK (max_concurrent >= -1),
    daily_tokens    bigint CHECK (daily_tokens >= -1),
    monthly_tokens  bigint CHECK (monthly_tokens >= -1),
    total_tokens    bigint CHECK (total_tokens >= -1),
    allowed_models  text[],                       -- NULL: inherit; '{*}': every model the tenant allows
    prompt_logging  boolean,                      -- NULL: inherit the tenant's policy
    prompt_log_ttl_seconds integer CHECK (prompt_log_ttl_seconds > 0),
    UNIQUE (tenant_id, name),
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

-- migrate:down
DROP TABLE api_keys;
DROP TABLE tenants;
