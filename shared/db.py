"""Postgres access with asyncpg: the pool, and turning rows into attrs models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from shared.config import PostgresConfig
from shared.models import ApiKey, Limits, ModelLimit, Tenant

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]  # one, or one from a pool


class Row(Protocol):
    """What the converters need of a row: asyncpg.Record and plain dicts both qualify."""

    def __getitem__(self, key: str, /) -> Any: ...


# Everything that means "Postgres is not answering properly right now" (a cut connection can leave
# asyncpg's protocol in a state it reports as an InternalClientError).
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

LIMIT_COLUMNS = "rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens"


def model_limits_sql(tenant: str, key: str | None) -> str:
    """A subquery: the model rules of a tenant (`key` None) or of a key, as one JSON array, for the
    row that names their ids as `tenant` / `key` (SQL expressions of the outer query)."""
    owner = "m.key_id IS NULL" if key is None else f"m.key_id = {key}"
    fields = ", ".join(f"'{c.strip()}', m.{c.strip()}" for c in LIMIT_COLUMNS.split(","))
    return (
        f"(SELECT coalesce(json_agg(json_build_object('pattern', m.pattern, {fields}) ORDER BY m.pattern), "
        f"'[]') FROM model_limits m WHERE m.tenant_id = {tenant} AND {owner})"
    )


def model_limits_from_json(value: str | bytes | None) -> tuple[ModelLimit, ...]:
    """The JSON array `model_limits_sql` gives, as models."""
    if not value:
        return ()
    return tuple(
        ModelLimit(
            pattern=str(item["pattern"]),
            limits=Limits(**{c.strip(): item.get(c.strip()) for c in LIMIT_COLUMNS.split(",")}),
        )
        for item in orjson.loads(value)
    )


TENANT_COLUMNS = (
    f"id, name, status, {LIMIT_COLUMNS}, allowed_models, max_body_bytes, max_num_ctx, "
    "max_keep_alive_seconds, prompt_logging, prompt_log_ttl_seconds, created_at"
)
KEY_COLUMNS = (
    f"id, tenant_id, name, prefix, status, created_at, expires_at, revoked_at, last_used_at, "
    f"{LIMIT_COLUMNS}, allowed_models, prompt_logging, prompt_log_ttl_seconds, allow_templates, "
    "allow_reload_options"
)


def asyncpg_dsn(url: str) -> str:
    """dbmate wants `sslmode=disable` for the embedded server; asyncpg wants it too, but not
    dbmate-only parameters such as `socket`."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"socket"}]
    scheme = "postgresql" if parts.scheme in {"postgres", "postgresql"} else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


if TYPE_CHECKING:
    _PoolBase = asyncpg.Pool[asyncpg.Record]
else:
    _PoolBase = asyncpg.Pool  # not subscriptable at run time


class GatewayPool(_PoolBase):
    """An asyncpg pool whose `acquire` waits at most `acquire_timeout` seconds unless told otherwise:
    with Postgres hung and every connection busy, a caller gets TimeoutError (503 to a client) in a
    stated time instead of queueing behind each stalled statement in turn."""

    __slots__ = ("acquire_timeout",)
    acquire_timeout: float

    def acquire(self, *, timeout: float | None = None) -> Any:
        """A connection from the pool (the pool's own `fetch*`/`execute` come through here too)."""
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


async def create_pool(config: PostgresConfig) -> asyncpg.Pool[asyncpg.Record]:
    """A pool sized by the configuration, with its connect, statement and acquire timeouts."""
    pool = GatewayPool(
        asyncpg_dsn(config.url),
        min_size=config.pool_min,
        max_size=config.pool_max,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        timeout=config.connect_timeout,
        command_timeout=config.command_timeout,
    )
    pool.acquire_timeout = config.acquire_timeout
    await pool
    return pool


def limits_from_row(row: Row) -> Limits:
    """The six limit columns of a tenant or key row."""
    return Limits(
        rpm=row["rpm"],
        tpm=row["tpm"],
        max_concurrent=row["max_concurrent"],
        daily_tokens=row["daily_tokens"],
        monthly_tokens=row["monthly_tokens"],
        total_tokens=row["total_tokens"],
    )


def _get(row: Row, name: str) -> Any:
    """A column the query may not have selected (model rules are read where they are shown)."""
    try:
        return row[name]
    except (KeyError, IndexError):
        return None


def _models(value: list[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def tenant_from_row(row: Row) -> Tenant:
    """A `tenants` row (TENANT_COLUMNS) as a model."""
    return Tenant(
        id=row["id"],
        name=row["name"],
        status=row["status"],
        limits=limits_from_row(row),
        allowed_models=_models(row["allowed_models"]),
        max_body_bytes=row["max_body_bytes"],
        max_num_ctx=row["max_num_ctx"],
        max_keep_alive_seconds=row["max_keep_alive_seconds"],
        prompt_logging=row["prompt_logging"],
        prompt_log_ttl_seconds=row["prompt_log_ttl_seconds"],
        created_at=row["created_at"],
        model_limits=model_limits_from_json(_get(row, "model_limits")),
    )


def key_from_row(row: Row) -> ApiKey:
    """An `api_keys` row (KEY_COLUMNS) as a model; the hash is deliberately not part of it."""
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        prefix=row["prefix"],
        status=row["status"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        limits=limits_from_row(row),
        allowed_models=_models(row["allowed_models"]),
        prompt_logging=row["prompt_logging"],
        prompt_log_ttl_seconds=row["prompt_log_ttl_seconds"],
        allow_templates=row["allow_templates"],
        allow_reload_options=row["allow_reload_options"],
        model_limits=model_limits_from_json(_get(row, "model_limits")),
    )
