"""Admin operations on tenants and keys: keyword-only core functions the CLI and tests call.

Each function validates its arguments before touching the database, runs in one transaction,
and returns the change notices to publish so sidecars drop stale cached keys.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import attrs

from shared import keys
from shared.db import (
    KEY_COLUMNS,
    LIMIT_COLUMNS,
    TENANT_COLUMNS,
    key_from_row,
    model_limits_sql,
    tenant_from_row,
)
from shared.exceptions import AdminError, ConflictError, NotFoundError
from shared.hashing import OWASP, Argon2Params, hash_key
from shared.invalidation import Invalidation
from shared.model_limits import MAX_RULES_PER_SCOPE
from shared.model_names import InvalidModelName, normalise, normalise_pattern
from shared.models import (
    ALL_MODELS,
    LIMIT_NAMES,
    UNLIMITED,
    ApiKey,
    Limits,
    ModelRule,
    Tenant,
    effective_models,
    model_rules,
)
from shared.periods import periods_at

if TYPE_CHECKING:
    from shared.db import Conn

_DURATION_RE = re.compile(r"^([0-9]{1,9})([smhdw])$")
MAX_DURATION = dt.timedelta(days=36500)  # 100 years: beyond it a date would be meaningless
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_LIMIT = 2**62
INT32_LIMITS = {"rpm", "max_concurrent", "max_num_ctx", "max_keep_alive_seconds"}  # 32-bit columns
# The tenant's model caps (columns of `tenants` only): num_ctx above max_num_ctx is refused,
# keep_alive above max_keep_alive_seconds lowered to it (stream_proxy/policy.py).
CAP_NAMES = ("max_num_ctx", "max_keep_alive_seconds")
CAP_FLAGS = {"max_num_ctx": "max-num-ctx", "max_keep_alive_seconds": "max-keep-alive"}
INT32_MAX = 2**31 - 1
# Rows as returned by a change or a lookup, with their model rules (shown, never needed to change a row).
TENANT_RETURNING = f"{TENANT_COLUMNS}, {model_limits_sql('tenants.id', None)} AS model_limits"
KEY_RETURNING = f"{KEY_COLUMNS}, {model_limits_sql('api_keys.tenant_id', 'api_keys.id')} AS model_limits"


def parse_duration(text: str) -> dt.timedelta:
    """`30s`, `15m`, `12h`, `7d`, `2w`; a clear AdminError otherwise."""
    match = _DURATION_RE.match(text.strip())
    if match is None or int(match[1]) == 0:
        raise AdminError(f"bad duration {text!r}: use a positive number with s, m, h, d or w")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > MAX_DURATION.total_seconds():
        raise AdminError(f"bad duration {text!r}: at most 100 years")
    return dt.timedelta(seconds=seconds)


def check_tenant_name(name: str) -> str:
    """Letters, digits, `.`, `_`, `-`; 1 to 63 characters, starting alphanumerically."""
    if not _TENANT_NAME_RE.match(name):
        raise AdminError(
            f"bad tenant name {name!r}: 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@attrs.frozen
class LimitChange:
    """A parsed `set-limits` argument: a number, 'inherit' or 'unlimited'."""

    value: int | Literal["inherit", "unlimited"]


def parse_limit(name: str, text: str) -> LimitChange:
    """Validate one limit argument before any I/O (a keep_alive cap also as a duration: 30m)."""
    lowered = text.strip().lower()
    if lowered in ("inherit", "unlimited"):
        return LimitChange(lowered)  # type: ignore[arg-type]
    flag = "concurrency" if name == "max_concurrent" else CAP_FLAGS.get(name, name.replace("_", "-"))
    if name == "max_keep_alive_seconds" and _DURATION_RE.match(lowered):
        lowered = str(int(parse_duration(lowered).total_seconds()))
    if name == "max_num_ctx" and re.fullmatch(r"0+", lowered):
        raise AdminError(f"--{flag} must be at least 1")
    if not re.fullmatch(r"[0-9]{1,19}", lowered):
        raise AdminError(f"bad number for --{flag}: {text!r}")
    ceiling = INT32_MAX if name in INT32_LIMITS else MAX_LIMIT
    if int(lowered) > ceiling:
        raise AdminError(f"--{flag} is at most {ceiling:,}")
    return LimitChange(int(lowered))


def parse_models(text: str) -> tuple[str, ...] | Literal["all", "inherit"]:
    """`a,b` (normalised), `all` or `inherit`."""
    lowered = text.strip().lower()
    if lowered in ("all", "inherit"):
        return lowered  # type: ignore[return-value]
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise AdminError("--models needs at least one model name, 'all' or 'inherit'")
    try:
        return tuple(dict.fromkeys(normalise(n) for n in names))
    except InvalidModelName as exc:
        raise AdminError(f"bad model name {exc.args[0]!r}") from None


def parse_pattern(text: str) -> str:
    """A `--model` pattern in its canonical form (`big` is `big:latest`, `big:*` every tag of it)."""
    try:
        return normalise_pattern(text)
    except InvalidModelName:
        raise AdminError(
            f"bad model pattern {text!r}: a model name such as qwen3:8b, where * stands for any "
            "characters within one part of it (qwen3:*, big*, myorg/*)"
        ) from None


async def _one(conn: asyncpg.Connection, sql: str, *args: Any) -> asyncpg.Record:
    """A statement that always yields one row (RETURNING of a locked row, an aggregate)."""
    row = await conn.fetchrow(sql, *args)
    if row is None:
        raise AdminError("the change did not apply; nothing was changed")
    return row


async def _tenant_by_name(conn: asyncpg.Connection, name: str, *, lock: bool = False) -> Tenant:
    sql = f"SELECT {TENANT_RETURNING} FROM tenants WHERE name = $1" + (" FOR UPDATE" if lock else "")
    row = await conn.fetchrow(sql, name)
    if row is None:
        raise NotFoundError(f"no tenant named {name!r}")
    return tenant_from_row(row)


async def _key_by_prefix(conn: asyncpg.Connection, prefix: str, *, lock: bool = False) -> ApiKey:
    sql = f"SELECT {KEY_RETURNING} FROM api_keys WHERE prefix = $1" + (" FOR UPDATE" if lock else "")
    row = await conn.fetchrow(sql, keys.normalise_prefix(prefix))
    if row is None:
        raise NotFoundError(f"no key with prefix {keys.normalise_prefix(prefix)!r}")
    return key_from_row(row)


async def tenant_name(conn: asyncpg.Connection, tenant_id: int) -> str:
    """The name of a tenant by id (for showing a key with its tenant)."""
    name = await conn.fetchval("SELECT name FROM tenants WHERE id = $1", tenant_id)
    return str(name) if name is not None else ""


async def create_tenant(conn: asyncpg.Connection, *, name: str) -> Tenant:
    """A new active tenant with no limits."""
    check_tenant_name(name)
    try:
        row = await _one(
            conn,
            f"INSERT INTO tenants (name) VALUES ($1) RETURNING {TENANT_RETURNING}",
            name,
        )
    except asyncpg.UniqueViolationError:
        raise ConflictError(f"a tenant named {name!r} already exists") from None
    return tenant_from_row(row)


async def list_tenants(conn: asyncpg.Connection) -> list[tuple[Tenant, int]]:
    """Every tenant with its number of active keys."""
    rows = await conn.fetch(
        f"SELECT {', '.join('t.' + c.strip() for c in TENANT_COLUMNS.split(','))}, "
        "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.status = 'active') AS keys, "
        f"{model_limits_sql('t.id', None)} AS model_limits FROM tenants t ORDER BY t.name"
    )
    return [(tenant_from_row(r), r["keys"]) for r in rows]


async def set_tenant_status(
    conn: asyncpg.Connection, *, name: str, status: Literal["active", "suspended"]
) -> tuple[Tenant, list[Invalidation]]:
    """Suspend or resume a tenant (all of its keys follow)."""
    async with conn.transaction():
        tenant = await _tenant_by_name(conn, name, lock=True)
        row = await _one(
            conn,
            f"UPDATE tenants SET status = $2, updated_at = now() WHERE id = $1 RETURNING {TENANT_RETURNING}",
            tenant.id,
            status,
        )
    return tenant_from_row(row), [Invalidation("tenant", tenant.id, reason=status)]


@attrs.frozen
class CreatedKey:
    """A new key: the full token is shown once and never stored."""

    key: ApiKey
    tenant: Tenant
    token: str = attrs.field(repr=False)


async def create_key(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    name: str,
    expires_in: dt.timedelta | None = None,
    pepper: str,
    params: Argon2Params = OWASP,
    now: dt.datetime | None = None,
) -> CreatedKey:
    """Generate a key, store only its Argon2id hash, return the token once."""
    if not 1 <= len(name) <= 100:
        raise AdminError("a key name is 1 to 100 characters")
    now = now or dt.datetime.now(dt.UTC)
    owner = await _tenant_by_name(conn, tenant)
    for _ in range(5):
        generated = keys.generate_key()
        digest = hash_key(generated.token, pepper=pepper, params=params)
        try:
            row = await _one(
                conn,
                f"INSERT INTO api_keys (tenant_id, name, prefix, hash, expires_at) "
                f"VALUES ($1, $2, $3, $4, $5) RETURNING {KEY_RETURNING}",
                owner.id,
                name,
                generated.prefix,
                digest,
                now + expires_in if expires_in else None,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "api_keys_prefix_key":
                continue
            raise ConflictError(f"tenant {tenant!r} already has a key named {name!r}") from None
        return CreatedKey(key=key_from_row(row), tenant=owner, token=generated.token)
    raise AdminError("could not find a free key prefix; try again")  # pragma: no cover - 62^8 space


async def list_keys(conn: asyncpg.Connection, *, tenant: str | None = None) -> list[tuple[ApiKey, str]]:
    """Keys with their tenant's name, optionally for one tenant."""
    tenant_id = None if tenant is None else (await _tenant_by_name(conn, tenant)).id
    cols = ", ".join("k." + c.strip() for c in KEY_COLUMNS.split(","))
    rows = await conn.fetch(
        f"SELECT {cols}, t.name AS tenant_name, {model_limits_sql('k.tenant_id', 'k.id')} AS model_limits "
        "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
        "WHERE $1::bigint IS NULL OR k.tenant_id = $1 ORDER BY t.name, k.created_at, k.id",
        tenant_id,
    )
    return [(key_from_row(r), r["tenant_name"]) for r in rows]


async def revoke_key(conn: asyncpg.Connection, *, prefix: str) -> tuple[ApiKey, list[Invalidation]]:
    """Revoke a key for good; revoking twice is an error that changes nothing."""
    async with conn.transaction():
        key = await _key_by_prefix(conn, prefix, lock=True)
        if key.status == "revoked":
            raise AdminError(f"key {key.prefix} is already revoked")
        row = await _one(
            conn,
            "UPDATE api_keys SET status = 'revoked', revoked_at = now(), updated_at = now() "
            f"WHERE id = $1 RETURNING {KEY_RETURNING}",
            key.id,
        )
    return key_from_row(row), [Invalidation("key", key.tenant_id, key.id, reason="revoked")]


def _limit_value(scope: Literal["tenant", "key"], name: str, change: LimitChange) -> int | None:
    if change.value == "inherit":
        if scope == "tenant":
            raise AdminError(f"--{name.replace('_', '-')} inherit only applies to a key")
        return None
    if change.value == "unlimited":
        return None if scope == "tenant" else UNLIMITED
    return change.value


def _models_value(
    scope: Literal["tenant", "key"], models: tuple[str, ...] | Literal["all", "inherit"]
) -> list[str] | None:
    if models == "inherit":
        if scope == "tenant":
            raise AdminError("--models inherit only applies to a key")
        return None
    if models == "all":
        return None if scope == "tenant" else [ALL_MODELS]
    return list(models)


def check_model_change(
    *,
    model: str | None,
    remove: bool,
    limits: Mapping[str, LimitChange],
    models: object | None = None,
) -> str:
    """Validate a `set-limits --model` change before any I/O; returns the canonical pattern."""
    if model is None:
        raise AdminError("--remove needs --model PATTERN: the rule to delete")
    pattern = parse_pattern(model)
    if models is not None:
        raise AdminError(
            "--models does not combine with --model: a model rule holds only rpm, tpm, concurrency "
            "and token budgets (set the allowlist without --model)"
        )
    caps = sorted(set(limits) & set(CAP_NAMES))
    if caps:
        raise AdminError(
            f"--{CAP_FLAGS[caps[0]]} does not combine with --model: it is a cap on every model of a tenant"
        )
    if remove and limits:
        raise AdminError("--remove takes no limits: it deletes the rule for the pattern")
    if not remove and not limits:
        raise AdminError(f"nothing to change: give at least one limit for --model {pattern}, or --remove")
    return pattern


async def set_limits(
    conn: asyncpg.Connection,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    limits: Mapping[str, LimitChange] | None = None,
    models: tuple[str, ...] | Literal["all", "inherit"] | None = None,
    model: str | None = None,
    remove: bool = False,
) -> tuple[Tenant | ApiKey, list[Invalidation]]:
    """Change limits and/or the model allowlist of a tenant or a key; with `model` (a pattern), the
    limits of that pattern's rule instead (`remove`: delete the rule)."""
    if (tenant is None) == (prefix is None):
        raise AdminError("name exactly one of --tenant or --prefix")
    limits = dict(limits or {})
    unknown = set(limits) - set(LIMIT_NAMES) - set(CAP_NAMES)
    if unknown:
        raise AdminError(f"unknown limits: {', '.join(sorted(unknown))}")
    scope: Literal["tenant", "key"] = "tenant" if tenant is not None else "key"
    if model is not None or remove:
        pattern = check_model_change(model=model, remove=remove, limits=limits, models=models)
        values = {n: _limit_value(scope, n, c) for n, c in limits.items()}
        return await _set_model_limits(conn, tenant=tenant, prefix=prefix, pattern=pattern, values=values)
    caps = sorted(set(limits) & set(CAP_NAMES))
    if caps and prefix is not None:
        raise AdminError(f"--{CAP_FLAGS[caps[0]]} only applies to a tenant (--tenant)")
    if not limits and models is None:
        raise AdminError("nothing to change: give at least one limit or --models")
    assignments: dict[str, Any] = {n: _limit_value(scope, n, c) for n, c in limits.items()}
    if models is not None:
        assignments["allowed_models"] = _models_value(scope, models)
    sets = ", ".join(f"{col} = ${i + 2}" for i, col in enumerate(assignments))
    async with conn.transaction():
        if tenant is not None:
            current: Tenant | ApiKey = await _tenant_by_name(conn, tenant, lock=True)
            row = await _one(
                conn,
                f"UPDATE tenants SET {sets}, updated_at = now() WHERE id = $1 RETURNING {TENANT_RETURNING}",
                current.id,
                *assignments.values(),
            )
            return tenant_from_row(row), [Invalidation("tenant", current.id, reason="limits")]
        key = await _key_by_prefix(conn, prefix or "", lock=True)
        row = await _one(
            conn,
            f"UPDATE api_keys SET {sets}, updated_at = now() WHERE id = $1 RETURNING {KEY_RETURNING}",
            key.id,
            *assignments.values(),
        )
    return key_from_row(row), [Invalidation("key", key.tenant_id, key.id, reason="limits")]


_RULE_OWNER = "tenant_id = $1 AND key_id IS NOT DISTINCT FROM $2::bigint"
_RULE_VALUES = ", ".join(f"${i + 4}" for i in range(len(LIMIT_NAMES)))
_RULE_SETS = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(LIMIT_NAMES))


async def _set_model_limits(
    conn: asyncpg.Connection,
    *,
    tenant: str | None,
    prefix: str | None,
    pattern: str,
    values: Mapping[str, int | None],
) -> tuple[Tenant | ApiKey, list[Invalidation]]:
    """Upsert (or, `values` empty, delete) one pattern's rule of a tenant or a key. The owner's row is
    locked, so concurrent changes to its rules queue and cannot pass MAX_RULES_PER_SCOPE together, and
    its updated_at moves, so sidecars re-reading Postgres without pub/sub see the change."""
    async with conn.transaction():
        if tenant is not None:
            owner = await _tenant_by_name(conn, tenant, lock=True)
            tenant_id, key_id, what = owner.id, None, f"tenant {owner.name!r}"
        else:
            key = await _key_by_prefix(conn, prefix or "", lock=True)
            tenant_id, key_id, what = key.tenant_id, key.id, f"key {key.prefix}"
        existing = await conn.fetchrow(
            f"SELECT id, {LIMIT_COLUMNS} FROM model_limits WHERE {_RULE_OWNER} AND pattern = $3",
            tenant_id,
            key_id,
            pattern,
        )
        if not values:  # --remove
            if existing is None:
                raise NotFoundError(f"{what} has no model rule for {pattern!r}")
            await conn.execute("DELETE FROM model_limits WHERE id = $1", existing["id"])
        else:
            merged = {n: None if existing is None else existing[n] for n in LIMIT_NAMES} | dict(values)
            if all(v is None for v in merged.values()):
                # Nothing left to enforce: the rule goes (and a rule that never was is not made).
                if existing is not None:
                    await conn.execute("DELETE FROM model_limits WHERE id = $1", existing["id"])
            elif existing is not None:
                await conn.execute(
                    f"UPDATE model_limits SET {_RULE_SETS}, updated_at = now() WHERE id = $1",
                    existing["id"],
                    *merged.values(),
                )
            else:
                count = await conn.fetchval(
                    f"SELECT count(*) FROM model_limits WHERE {_RULE_OWNER}", tenant_id, key_id
                )
                if count >= MAX_RULES_PER_SCOPE:
                    raise AdminError(
                        f"{what} already has {count} model rules, the most allowed; "
                        "remove one first (--model PATTERN --remove)"
                    )
                await conn.execute(
                    f"INSERT INTO model_limits (tenant_id, key_id, pattern, {LIMIT_COLUMNS}) "
                    f"VALUES ($1, $2, $3, {_RULE_VALUES})",
                    tenant_id,
                    key_id,
                    pattern,
                    *merged.values(),
                )
        if key_id is None:
            row = await _one(
                conn,
                f"UPDATE tenants SET updated_at = now() WHERE id = $1 RETURNING {TENANT_RETURNING}",
                tenant_id,
            )
            return tenant_from_row(row), [Invalidation("tenant", tenant_id, reason="limits")]
        row = await _one(
            conn,
            f"UPDATE api_keys SET updated_at = now() WHERE id = $1 RETURNING {KEY_RETURNING}",
            key_id,
        )
    return key_from_row(row), [Invalidation("key", tenant_id, key_id, reason="limits")]


@attrs.frozen
class KeyView:
    """A key as `show-key` shows it: its own settings and what is in force for it under its tenant."""

    key: ApiKey
    tenant: Tenant  # with its model rules
    limits: Limits  # effective key-level limits: the key's own value, else the tenant's
    allowed_models: tuple[str, ...] | None  # effective: None = every model
    model_rules: tuple[ModelRule, ...]  # effective, by pattern

    @property
    def tenant_name(self) -> str:
        """The name of the key's tenant."""
        return self.tenant.name


async def show_key(conn: asyncpg.Connection, *, prefix: str) -> KeyView:
    """One key with its tenant, its effective limits and its effective model rules."""
    key = await _key_by_prefix(conn, prefix)
    tenant = tenant_from_row(
        await _one(conn, f"SELECT {TENANT_RETURNING} FROM tenants WHERE id = $1", key.tenant_id)
    )
    return KeyView(
        key=key,
        tenant=tenant,
        limits=key.limits.inherit_from(tenant.limits),
        allowed_models=effective_models(tenant.allowed_models, key.allowed_models),
        model_rules=model_rules(tenant.model_limits, key.model_limits),
    )


async def set_prompt_logging(
    conn: asyncpg.Connection,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    on: bool,
    ttl: dt.timedelta | None = None,
) -> tuple[Tenant | ApiKey, list[Invalidation]]:
    """Opt a tenant or key into prompt logging with a retention TTL, or out of it."""
    if (tenant is None) == (prefix is None):
        raise AdminError("name exactly one of --tenant or --prefix")
    if on and ttl is None:
        raise AdminError("--on needs --ttl (for example --ttl 7d)")
    if not on and ttl is not None:
        raise AdminError("--off takes no --ttl")
    seconds = int(ttl.total_seconds()) if ttl else None
    if seconds is not None and seconds > INT32_MAX:
        raise AdminError("--ttl is at most 68 years")
    async with conn.transaction():
        if tenant is not None:
            current = await _tenant_by_name(conn, tenant, lock=True)
            row = await _one(
                conn,
                "UPDATE tenants SET prompt_logging = $2, prompt_log_ttl_seconds = $3, "
                f"updated_at = now() WHERE id = $1 RETURNING {TENANT_RETURNING}",
                current.id,
                on,
                seconds,
            )
            return tenant_from_row(row), [Invalidation("tenant", current.id, reason="prompt-logging")]
        key = await _key_by_prefix(conn, prefix or "", lock=True)
        row = await _one(
            conn,
            "UPDATE api_keys SET prompt_logging = $2, prompt_log_ttl_seconds = $3, updated_at = now() "
            f"WHERE id = $1 RETURNING {KEY_RETURNING}",
            key.id,
            on,
            seconds,
        )
    return key_from_row(row), [Invalidation("key", key.tenant_id, key.id, reason="prompt-logging")]


async def set_templates(
    conn: asyncpg.Connection, *, prefix: str, on: bool
) -> tuple[ApiKey, list[Invalidation]]:
    """Allow a key /api/generate's `template` and `_debug_render_only` (or take them away): its
    prompts are then bounded by num_ctx alone, and it can read the model's Modelfile SYSTEM."""
    async with conn.transaction():
        key = await _key_by_prefix(conn, prefix, lock=True)
        row = await _one(
            conn,
            "UPDATE api_keys SET allow_templates = $2, updated_at = now() "
            f"WHERE id = $1 RETURNING {KEY_RETURNING}",
            key.id,
            on,
        )
    return key_from_row(row), [Invalidation("key", key.tenant_id, key.id, reason="templates")]


async def set_reload_options(
    conn: asyncpg.Connection, *, prefix: str, on: bool
) -> tuple[ApiKey, list[Invalidation]]:
    """Allow a key the options that make Ollama reload a model (num_gpu, num_batch, main_gpu,
    use_mmap, num_thread; native `shift`), or take them away: a reload evicts the model for every
    tenant using it, so only a trusted key should have them."""
    async with conn.transaction():
        key = await _key_by_prefix(conn, prefix, lock=True)
        row = await _one(
            conn,
            "UPDATE api_keys SET allow_reload_options = $2, updated_at = now() "
            f"WHERE id = $1 RETURNING {KEY_RETURNING}",
            key.id,
            on,
        )
    return key_from_row(row), [Invalidation("key", key.tenant_id, key.id, reason="reload-options")]


@attrs.frozen
class ModelUsage:
    """Settled tokens of one canonical model in the current day, month and all time, and its requests."""

    model: str
    day: int
    month: int
    total: int
    requests: int


@attrs.frozen
class Usage:
    """Tokens from the ledger for the current day, the current month and all time (and, when asked
    for, per model from the settled per-model budget periods)."""

    scope: str
    name: str
    day: int
    month: int
    total: int
    requests: int
    models: tuple[ModelUsage, ...] | None = None  # None: not asked for (`by_model`)


async def usage(
    conn: asyncpg.Connection,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    now: dt.datetime | None = None,
    zone: ZoneInfo | None = None,
    by_model: bool = False,
) -> Usage:
    """Sum the ledger for a tenant or key (day and month in the budget time zone, UTC by default);
    `by_model` adds each model's tokens of the current periods from `model_budget_periods`."""
    if (tenant is None) == (prefix is None):
        raise AdminError("name exactly one of --tenant or --prefix")
    now = (now or dt.datetime.now(dt.UTC)).astimezone(zone or dt.UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    if tenant is not None:
        scope, name, column, ident = "tenant", tenant, "tenant_id", (await _tenant_by_name(conn, tenant)).id
    else:
        key = await _key_by_prefix(conn, prefix or "")
        scope, name, column, ident = "key", key.prefix, "key_id", key.id
    row = await _one(
        conn,
        "SELECT coalesce(sum(total_tokens) FILTER (WHERE finished_at >= $2), 0) AS day, "
        "coalesce(sum(total_tokens) FILTER (WHERE finished_at >= $3), 0) AS month, "
        "coalesce(sum(total_tokens), 0) AS total, count(*) AS requests "
        f"FROM usage_ledger WHERE {column} = $1",
        ident,
        day_start,
        month_start,
    )
    per_model = None
    if by_model:
        periods = periods_at(now.timestamp(), zone or ZoneInfo("UTC"))
        rows = await conn.fetch(
            "SELECT model, "
            "coalesce(sum(tokens) FILTER (WHERE period = 'day'), 0) AS day, "
            "coalesce(sum(tokens) FILTER (WHERE period = 'month'), 0) AS month, "
            "coalesce(sum(tokens) FILTER (WHERE period = 'total'), 0) AS total, "
            "coalesce(sum(requests) FILTER (WHERE period = 'total'), 0) AS requests "
            "FROM model_budget_periods WHERE scope = $1 AND scope_id = $2 AND ("
            "(period = 'day' AND period_start = $3) OR (period = 'month' AND period_start = $4) "
            "OR period = 'total') GROUP BY model ORDER BY model",
            scope,
            ident,
            periods.day,
            periods.month,
        )
        per_model = tuple(
            ModelUsage(r["model"], int(r["day"]), int(r["month"]), int(r["total"]), int(r["requests"]))
            for r in rows
        )
    return Usage(
        scope,
        name,
        int(row["day"]),
        int(row["month"]),
        int(row["total"]),
        int(row["requests"]),
        per_model,
    )


def limits_to_args(values: Sequence[tuple[str, str | None]]) -> dict[str, LimitChange]:
    """Parse the CLI's limit options that were given (None = not given)."""
    return {name: parse_limit(name, text) for name, text in values if text is not None}


@attrs.frozen
class AuditRow:
    """One audit log row as shown to operators (never a key, only its prefix)."""

    at: dt.datetime
    request_id: str | None
    tenant: str | None
    key_prefix: str | None
    client_addr: str | None
    method: str | None
    path: str | None
    model: str | None
    status: int
    reason: str | None
    tokens: int
    latency_ms: float | None
    count: int


@attrs.frozen
class UsageBucket:
    """Tokens and requests of one day or hour (its start, in the budget time zone) from the ledger."""

    start: dt.datetime
    tokens: int
    requests: int


MAX_BUCKETS = 10_000  # `usage --by hour --since 2y` is refused, not a 17,520-row query


async def usage_series(
    conn: asyncpg.Connection,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    by: str,
    since: dt.datetime,
    now: dt.datetime | None = None,
    zone: ZoneInfo | None = None,
) -> list[UsageBucket]:
    """Ledger tokens per day or hour (`by`) from the bucket `since` falls in to now, every bucket
    listed (0 when nothing ran), oldest first, each whole. Days are the budget time zone's calendar
    days (23 or 25 hours across a daylight-saving change); hours are real hours, labelled in the
    zone (a repeated 01:00 at fall-back is two rows with their offsets; no row for a skipped hour)."""
    if (tenant is None) == (prefix is None):
        raise AdminError("name exactly one of --tenant or --prefix")
    if by not in ("day", "hour"):
        raise AdminError("--by is day, hour or model")
    zone = zone or ZoneInfo("UTC")
    now = now or dt.datetime.now(dt.UTC)
    step = dt.timedelta(days=1) if by == "day" else dt.timedelta(hours=1)
    if since > now:
        raise AdminError("--since is in the future")
    if (now - since) / step > MAX_BUCKETS:
        raise AdminError(f"--since reaches back more than {MAX_BUCKETS:,} {by}s: name a later start")
    if tenant is not None:
        column, ident = "tenant_id", (await _tenant_by_name(conn, tenant)).id
    else:
        column, ident = "key_id", (await _key_by_prefix(conn, prefix or "")).id
    if by == "day":
        buckets = (
            "SELECT d AT TIME ZONE $4 AS start, (d + interval '1 day') AT TIME ZONE $4 AS stop "
            "FROM generate_series(date_trunc('day', $2::timestamptz AT TIME ZONE $4), "
            "date_trunc('day', $3::timestamptz AT TIME ZONE $4), interval '1 day') AS d"
        )
    else:
        buckets = (
            "SELECT h AS start, h + interval '1 hour' AS stop FROM generate_series("
            "date_trunc('hour', $2::timestamptz AT TIME ZONE $4) AT TIME ZONE $4, $3::timestamptz, "
            "interval '1 hour') AS h"
        )
    rows = await conn.fetch(
        f"WITH b AS ({buckets}) "
        "SELECT b.start, coalesce(sum(u.total_tokens), 0) AS tokens, count(u.request_id) AS requests "
        f"FROM b LEFT JOIN usage_ledger u ON u.{column} = $1 "
        "AND u.finished_at >= b.start AND u.finished_at < b.stop "
        "GROUP BY b.start ORDER BY b.start",
        ident,
        since,
        now,
        zone.key,
    )
    return [UsageBucket(r["start"].astimezone(zone), int(r["tokens"]), int(r["requests"])) for r in rows]


def parse_since(text: str, now: dt.datetime, zone: ZoneInfo | None = None) -> dt.datetime:
    """`--since`: a duration back from now (`15m`, `2d`) or an ISO date / timestamp (one without
    an offset is read in `zone`, UTC by default)."""
    try:
        return now - parse_duration(text)
    except AdminError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdminError(f"bad --since {text!r}: use a duration such as 1h or 7d, or an ISO date") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=zone or dt.UTC)


async def audit(
    conn: asyncpg.Connection,
    *,
    tenant: str | None = None,
    prefix: str | None = None,
    since: dt.datetime | None = None,
    status: int | None = None,
    limit: int = 100,
) -> list[AuditRow]:
    """Newest audit rows first, filtered."""
    tenant_id = None if tenant is None else (await _tenant_by_name(conn, tenant)).id
    key_prefix = None if prefix is None else keys.normalise_prefix(prefix)
    rows = await conn.fetch(
        "SELECT a.at, a.request_id, t.name AS tenant, a.key_prefix, a.client_addr, a.method, a.path, "
        "a.model, a.status, a.reason, a.tokens, a.latency_ms, a.count FROM audit_log a "
        "LEFT JOIN tenants t ON t.id = a.tenant_id "
        "WHERE ($1::bigint IS NULL OR a.tenant_id = $1) AND ($2::text IS NULL OR a.key_prefix = $2) "
        "AND ($3::timestamptz IS NULL OR a.at >= $3) AND ($4::int IS NULL OR a.status = $4) "
        "ORDER BY a.at DESC, a.id DESC LIMIT $5",
        tenant_id,
        key_prefix,
        since,
        status,
        limit,
    )
    return [AuditRow(**dict(r)) for r in rows]


async def purge_prompts(
    conn: Conn,
    *,
    now: dt.datetime | None = None,
    batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Delete prompt logs past their expiry; returns how many (the CLI and the accountant's purge).
    With `batch`, in statements of at most that many rows (a large backlog never holds one long
    delete), calling `progress(done, total)` after each."""
    now = now or dt.datetime.now(dt.UTC)
    if batch is None:
        deleted = await conn.fetchval(
            "WITH gone AS (DELETE FROM prompt_logs WHERE expires_at <= $1 RETURNING 1) "
            "SELECT count(*) FROM gone",
            now,
        )
        return int(deleted or 0)
    total = int(await conn.fetchval("SELECT count(*) FROM prompt_logs WHERE expires_at <= $1", now) or 0)
    done = 0
    while True:
        gone = int(
            await conn.fetchval(
                "WITH gone AS (DELETE FROM prompt_logs WHERE request_id IN (SELECT request_id FROM "
                "prompt_logs WHERE expires_at <= $1 LIMIT $2) RETURNING 1) SELECT count(*) FROM gone",
                now,
                batch,
            )
            or 0
        )
        done += gone
        if progress is not None:
            progress(done, max(total, done))
        if gone < batch:
            return done
