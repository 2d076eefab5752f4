"""Plain attrs models of tenants, keys, limits and the usage event (no I/O, no wire format)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import attrs

Status = Literal["active", "suspended"]
KeyStatus = Literal["active", "revoked"]
UNLIMITED = -1  # a key-level limit of -1: no key-level limit (the tenant's still applies)
ALL_MODELS = "*"

LIMIT_NAMES = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens", "total_tokens")


@attrs.frozen
class Limits:
    """Per-scope limits. For a tenant None means no limit; for a key None means inherit."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    total_tokens: int | None = None

    def inherit_from(self, tenant: Limits) -> Limits:
        """The key's effective limits: its own value, or the tenant's where it has none."""
        values: dict[str, int | None] = {}
        for name in LIMIT_NAMES:
            own = getattr(self, name)
            values[name] = getattr(tenant, name) if own is None else (None if own == UNLIMITED else own)
        return Limits(**values)


@attrs.frozen
class ModelLimit:
    """Limits a tenant or a key sets on the models a pattern matches (docs/ARCHITECTURE.md#model-limits);
    `pattern` is canonical (shared/model_names.py `normalise_pattern`)."""

    pattern: str
    limits: Limits


@attrs.frozen
class ModelRule:
    """One pattern's effective limits for a key: its own (inherited from the tenant's rule on the same
    pattern) and the tenant's, both enforced on every model the pattern matches."""

    pattern: str
    key_limits: Limits
    tenant_limits: Limits

    def scopes(self) -> list[tuple[Literal["key", "tenant"], Limits]]:
        """The scopes this rule is counted in. The key's is left out when it holds exactly the
        tenant's limits (inherited, the common case): the tenant's counters include the key's
        requests, so they refuse whatever the key's would (docs/DECISIONS.md)."""
        scopes: list[tuple[Literal["key", "tenant"], Limits]] = []
        if self.key_limits != Limits() and self.key_limits != self.tenant_limits:
            scopes.append(("key", self.key_limits))
        if self.tenant_limits != Limits():
            scopes.append(("tenant", self.tenant_limits))
        return scopes


def model_rules(tenant: tuple[ModelLimit, ...], key: tuple[ModelLimit, ...]) -> tuple[ModelRule, ...]:
    """The rules in force for a key, by pattern: a key's unset value takes the tenant's on the same
    pattern, as unscoped limits do; a pattern limited nowhere is left out."""
    tenant_by = {m.pattern: m.limits for m in tenant}
    key_by = {m.pattern: m.limits for m in key}
    rules = []
    for pattern in sorted({*tenant_by, *key_by}):
        tenant_limits = tenant_by.get(pattern, Limits())
        key_limits = key_by.get(pattern, Limits()).inherit_from(tenant_limits)
        if key_limits != Limits() or tenant_limits != Limits():
            rules.append(ModelRule(pattern, key_limits, tenant_limits))
    return tuple(rules)


@attrs.frozen
class Tenant:
    """A customer: owns keys and carries the default policy."""

    id: int
    name: str
    status: Status
    limits: Limits
    allowed_models: tuple[str, ...] | None  # None: every model
    max_body_bytes: int | None
    max_num_ctx: int | None
    max_keep_alive_seconds: int | None
    prompt_logging: bool
    prompt_log_ttl_seconds: int | None
    created_at: dt.datetime
    model_limits: tuple[ModelLimit, ...] = ()


@attrs.frozen
class ApiKey:
    """An API key's stored record (never the token; the hash stays in the database layer)."""

    id: int
    tenant_id: int
    name: str
    prefix: str
    status: KeyStatus
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    limits: Limits
    allowed_models: tuple[str, ...] | None  # None: inherit; ("*",): every model the tenant allows
    prompt_logging: bool | None  # None: inherit
    prompt_log_ttl_seconds: int | None
    allow_templates: bool = False  # /api/generate's template and _debug_render_only
    allow_reload_options: bool = False  # options that reload a shared model (num_gpu, …)
    model_limits: tuple[ModelLimit, ...] = ()  # a value None: inherit the tenant's on that pattern

    def is_usable(self, now: dt.datetime) -> bool:
        """Active and not expired."""
        return self.status == "active" and (self.expires_at is None or self.expires_at > now)


@attrs.frozen
class KeyContext:
    """Everything a decision about a request needs to know about its key, resolved once and cached."""

    key_id: int
    prefix: str
    tenant_id: int
    tenant_name: str
    key_limits: Limits  # effective (inherited) key-level limits
    tenant_limits: Limits
    allowed_models: tuple[str, ...] | None  # effective: None = every model
    max_body_bytes: int | None
    max_num_ctx: int | None
    max_keep_alive_seconds: int | None
    prompt_logging: bool
    prompt_log_ttl_seconds: int | None
    key_expires_at: dt.datetime | None = None
    allow_templates: bool = False
    allow_reload_options: bool = False
    model_rules: tuple[ModelRule, ...] = ()


def effective_models(
    tenant_models: tuple[str, ...] | None, key_models: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """Both scopes apply: the key can narrow the tenant's allowlist, never widen it."""
    if key_models is None or ALL_MODELS in key_models:
        return tenant_models
    if tenant_models is None:
        return key_models
    allowed = set(tenant_models)
    return tuple(m for m in key_models if m in allowed)


def resolve_context(tenant: Tenant, key: ApiKey) -> KeyContext:
    """The effective policy of a key under its tenant."""
    logging_on = tenant.prompt_logging if key.prompt_logging is None else key.prompt_logging
    ttl = key.prompt_log_ttl_seconds or tenant.prompt_log_ttl_seconds
    return KeyContext(
        key_id=key.id,
        prefix=key.prefix,
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        key_limits=key.limits.inherit_from(tenant.limits),
        tenant_limits=tenant.limits,
        allowed_models=effective_models(tenant.allowed_models, key.allowed_models),
        max_body_bytes=tenant.max_body_bytes,
        max_num_ctx=tenant.max_num_ctx,
        max_keep_alive_seconds=tenant.max_keep_alive_seconds,
        prompt_logging=logging_on and ttl is not None,
        prompt_log_ttl_seconds=ttl if logging_on else None,
        key_expires_at=key.expires_at,
        allow_templates=key.allow_templates,
        allow_reload_options=key.allow_reload_options,
        model_rules=model_rules(tenant.model_limits, key.model_limits),
    )


EstimateReason = Literal[
    "client_disconnected",
    "upstream_failed",
    "no_upstream_count",
    "lease_expired",
    "cut_at_limit",
    "upstream_error",
]


@attrs.frozen
class UsageEvent:
    """What stream_proxy reports after every request; the accountant applies it exactly once."""

    request_id: str
    tenant_id: int
    key_id: int
    key_prefix: str
    endpoint: str
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    reserved_tokens: int
    estimated: bool
    estimate_reason: EstimateReason | None
    http_status: int
    upstream_status: int | None
    started_at: float  # unix seconds
    first_byte_at: float | None
    finished_at: float
    bytes_relayed: int
    client_disconnected: bool
    method: str = "POST"
    client_addr: str | None = None
    user_agent: str | None = None
    request_text: str | None = None  # only when prompt logging is on for the key
    response_text: str | None = None
    prompt_log_ttl_seconds: int | None = None
    metered: bool = True
    periods: dict[str, str] | None = None  # the budget periods charged (from the grant)
    model_key: str | None = None  # the canonical model the reservation charged (shared/model_names.py)

    @property
    def total_tokens(self) -> int:
        """The Tokens contract: prompt + completion."""
        return self.prompt_tokens + self.completion_tokens
