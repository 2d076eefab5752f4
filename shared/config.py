"""Configuration: frozen attrs classes built by cattrs from `GATEWAY_*` environment variables.

Every field names its variable in its metadata; `load_config` reads a flat mapping (tests pass a
dict), converts every value, and reports every missing or bad variable at once. Secret fields are
`repr=False` and their values never appear in an error message.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import cattrs

from shared.backend_spec import BackendSpec, BackendSpecError, parse_backends
from shared.exceptions import ConfigError

T = TypeVar("T")
_MISSING = object()


def env(
    name: str,
    default: Any = _MISSING,
    *,
    secret: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    help: str = "",
) -> Any:
    """Declare a field read from `GATEWAY_<name>`; required when no default is given."""
    meta = {"env": f"GATEWAY_{name}", "secret": secret, "help": help, "min": minimum, "max": maximum}
    if default is _MISSING:
        return attrs.field(metadata=meta, repr=not secret)
    return attrs.field(default=default, metadata=meta, repr=not secret)


# Characters of GATEWAY_GRANT_SECRET and GATEWAY_KEY_PEPPER at least (`secrets.token_urlsafe(32)`
# makes 43).
MIN_SECRET = 32

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _structure_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false")


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"-?[0-9]{1,18}", text):
        raise ValueError("expected an integer")
    return int(text)


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _structure_str_tuple(value: object, _: type) -> tuple[str, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(str(v) for v in value)
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


converter = cattrs.Converter()
converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)


def _check_range(problems: list[str], name: str, value: Any, spec: attrs.Attribute[Any]) -> None:
    low, high = spec.metadata.get("min"), spec.metadata.get("max")
    if low is not None and isinstance(value, (int, float)) and value < low:
        problems.append(f"{name}: must be at least {low}")
    elif high is not None and isinstance(value, (int, float)) and value > high:
        problems.append(f"{name}: must be at most {high}")


def _build(cls: type[T], environ: Mapping[str, str], problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for spec in attrs.fields(cls):  # type: ignore[arg-type] # callers pass attrs classes only
        field_type = hints[spec.name]
        if attrs.has(field_type):
            values[spec.name] = _build(field_type, environ, problems)
            continue
        name = spec.metadata["env"]
        raw = environ.get(name)
        if raw is None or (raw == "" and spec.default is attrs.NOTHING):
            if spec.default is attrs.NOTHING:
                problems.append(f"{name}: required but not set")
            continue
        allowed = typing.get_args(field_type) if typing.get_origin(field_type) is Literal else ()
        if allowed:
            if raw not in allowed:
                shown = "" if spec.metadata["secret"] else f" (got {raw!r})"
                problems.append(f"{name}: expected one of {', '.join(map(str, allowed))}{shown}")
            else:
                values[spec.name] = raw
            continue
        try:
            value = converter.structure(raw, field_type)
        except Exception as exc:  # noqa: BLE001 - every conversion failure becomes one problem line
            shown = "" if spec.metadata["secret"] else f" (got {raw!r})"
            reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "bad value"
            problems.append(f"{name}: {reason}{shown}")
            continue
        _check_range(problems, name, value, spec)
        values[spec.name] = value
    if any(v is None for v in values.values()) or len(problems) > 0:
        return None
    built = cls(**values)
    check = getattr(built, "check", None)
    if check is not None:
        problems.extend(check())
    return built


def load_config(cls: type[T], environ: Mapping[str, str]) -> T:
    """Build `cls` from the environment; raise ConfigError listing every problem."""
    problems: list[str] = []
    built = _build(cls, environ, problems)
    if problems or built is None:
        raise ConfigError(problems or ["configuration incomplete"])
    return built


def variables(cls: type[Any]) -> list[tuple[str, Any, bool, str]]:
    """(variable, default or None when required, secret, help) for every variable `cls` reads."""
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, Any, bool, str]] = []
    for spec in attrs.fields(cls):
        if attrs.has(hints[spec.name]):
            rows.extend(variables(hints[spec.name]))
            continue
        default = None if spec.default is attrs.NOTHING else spec.default
        rows.append((spec.metadata["env"], default, spec.metadata["secret"], spec.metadata["help"]))
    return rows


@attrs.frozen
class PostgresConfig:
    """Where the tenants, keys, ledger and audit log live."""

    url: str = env("DATABASE_URL", secret=True, help="Postgres URL (asyncpg / dbmate form)")
    pool_min: int = env("DATABASE_POOL_MIN", 1, minimum=1, help="asyncpg pool minimum size")
    pool_max: int = env("DATABASE_POOL_MAX", 10, minimum=1, help="asyncpg pool maximum size")
    connect_timeout: float = env(
        "DATABASE_CONNECT_TIMEOUT", 5.0, minimum=0.1, help="seconds to open a Postgres connection"
    )
    command_timeout: float = env(
        "DATABASE_COMMAND_TIMEOUT", 10.0, minimum=0.1, help="seconds one Postgres statement may take"
    )
    acquire_timeout: float = env(
        "DATABASE_ACQUIRE_TIMEOUT",
        5.0,
        minimum=0.1,
        help="seconds to wait for a free pooled Postgres connection",
    )

    def check(self) -> list[str]:
        """Rules that involve more than one variable."""
        if self.pool_min > self.pool_max:
            return ["GATEWAY_DATABASE_POOL_MIN: must not exceed GATEWAY_DATABASE_POOL_MAX"]
        return []


@attrs.frozen
class RedisConfig:
    """Limits, leases, caches, invalidations and the usage stream."""

    url: str = env(
        "REDIS_URL",
        secret=True,
        help="redis://, rediss:// or unix:// URL of Redis / Valkey, or redis+cluster://h1:p1,h2:p2",
    )
    prefix: str = env("REDIS_PREFIX", "nz:", help="prefix of every Redis key name")
    connect_timeout: float = env(
        "REDIS_CONNECT_TIMEOUT", 2.0, minimum=0.01, help="seconds to open a Redis connection before giving up"
    )
    timeout: float = env(
        "REDIS_TIMEOUT",
        5.0,
        minimum=1.5,
        help="seconds a Redis reply may take (a hung Redis answers 503 after at most 3 tries of it)",
    )


@attrs.frozen
class GrantSecrets:
    """The HMAC secrets that sign grants; the previous one is accepted during a rotation."""

    current: str = env(
        "GRANT_SECRET",
        secret=True,
        help=f"HMAC-SHA256 secret signing grants (at least {MIN_SECRET} characters)",
    )
    previous: str = env(
        "GRANT_SECRET_PREVIOUS", "", secret=True, help="previous grant secret, accepted while rotating"
    )

    def check(self) -> list[str]:
        """Secrets long enough that guessing them is out of reach (their values never shown)."""
        problems = []
        if len(self.current) < MIN_SECRET:
            problems.append(f"GATEWAY_GRANT_SECRET: at least {MIN_SECRET} characters")
        if self.previous and len(self.previous) < MIN_SECRET:
            problems.append(f"GATEWAY_GRANT_SECRET_PREVIOUS: at least {MIN_SECRET} characters")
        return problems


@attrs.frozen
class KeyHashing:
    """The pepper mixed into every key hash (Argon2id's secret input)."""

    pepper: str = env(
        "KEY_PEPPER",
        secret=True,
        help=f"server-side pepper for key hashes (at least {MIN_SECRET} characters)",
    )

    def check(self) -> list[str]:
        """A pepper long enough to be a secret of its own."""
        if len(self.pepper) < MIN_SECRET:
            return [f"GATEWAY_KEY_PEPPER: at least {MIN_SECRET} characters"]
        return []


@attrs.frozen
class BudgetOptions:
    """Where budget days and months roll over."""

    timezone: str = env(
        "BUDGET_TIMEZONE", "UTC", help="IANA time zone where budget days and months roll over"
    )

    def check(self) -> list[str]:
        """The budget time zone must be a known IANA zone."""
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return [f"GATEWAY_BUDGET_TIMEZONE: unknown time zone (got {self.timezone!r})"]
        return []


@attrs.frozen
class SidecarOptions:
    """Tuning of the authz_sidecar."""

    host: str = env("SIDECAR_HOST", "127.0.0.1", help="authz_sidecar listen address")
    port: int = env(
        "SIDECAR_PORT", 8081, minimum=0, maximum=65535, help="authz_sidecar listen port (0 = any free port)"
    )
    key_cache_ttl: float = env("KEY_CACHE_TTL", 30.0, minimum=0, help="seconds a verified key stays cached")
    argon2_concurrency: int = env("ARGON2_CONCURRENCY", 2, minimum=1, help="parallel Argon2id verifications")
    auth_failures_per_minute: int = env(
        "AUTH_FAILURES_PER_MINUTE", 60, minimum=0, help="failed authentications per client address (0 = off)"
    )
    key_mismatches_per_window: int = env(
        "KEY_MISMATCHES_PER_WINDOW",
        10,
        minimum=0,
        help="wrong secrets per key prefix and window before guesses skip Argon2 and get 429 (0 = off)",
    )
    key_mismatch_window: float = env(
        "KEY_MISMATCH_WINDOW", 60.0, minimum=1, help="seconds of the per-prefix mismatch window"
    )
    verified_key_ttl: float = env(
        "VERIFIED_KEY_TTL",
        86400.0,
        minimum=1,
        help="seconds a verified key still passes without Argon2 while its prefix is locked",
    )
    drain_seconds: float = env(
        "SIDECAR_DRAIN_SECONDS", 5.0, minimum=0, help="seconds the sidecar's /readyz is 503 before exit"
    )
    workers: int = env(
        "SIDECAR_WORKERS",
        1,
        minimum=1,
        maximum=64,
        help="authz_sidecar worker processes (SO_REUSEPORT)",
    )
    lease_ttl: float = env("LEASE_TTL", 30.0, minimum=1, help="seconds a stream lease lives unless renewed")
    grant_ttl: float = env(
        "GRANT_TTL", 60.0, minimum=1, maximum=60, help="seconds a grant stays valid (at most 60)"
    )


@attrs.frozen
class ProxyOptions:
    """Tuning of the stream_proxy."""

    host: str = env("PROXY_HOST", "127.0.0.1", help="stream_proxy listen address")
    port: int = env(
        "PROXY_PORT", 8082, minimum=0, maximum=65535, help="stream_proxy listen port (0 = any free port)"
    )
    ollama_url: str = env("OLLAMA_URL", "http://127.0.0.1:11434", help="Ollama base URL (one backend)")
    ollama_urls: str = env(
        "OLLAMA_URLS",
        "",
        help="several Ollama backends, comma-separated `[name=]url[;weight=W][;max_parallel=N]` "
        "(replaces GATEWAY_OLLAMA_URL when set)",
    )
    backend_poll_interval: float = env(
        "BACKEND_POLL_INTERVAL",
        5.0,
        minimum=0.1,
        help="seconds between polls of each backend's /api/version, /api/tags and /api/ps (±20 %)",
    )
    backend_poll_timeout: float = env(
        "BACKEND_POLL_TIMEOUT", 2.0, minimum=0.01, help="seconds a backend has to answer one poll request"
    )
    max_body_bytes: int = env("MAX_BODY_BYTES", 10 * 1024 * 1024, minimum=1, help="request body cap")
    connect_timeout: float = env("UPSTREAM_CONNECT_TIMEOUT", 5.0, minimum=0.001, help="seconds to connect")
    first_byte_timeout: float = env(
        "UPSTREAM_FIRST_BYTE_TIMEOUT",
        300.0,
        minimum=0.001,
        help="seconds to Ollama's first byte (model load)",
    )
    lease_ttl: float = env("LEASE_TTL", 30.0, minimum=1, help="seconds a stream lease lives unless renewed")
    max_upstream_body_bytes: int = env(
        "MAX_UPSTREAM_BODY_BYTES",
        128 * 1024 * 1024,
        minimum=1024,
        help="bytes of a non-streamed Ollama answer held at once (listings, chats, embeddings); 502 above",
    )
    prompt_log_max_bytes: int = env(
        "PROMPT_LOG_MAX_BYTES",
        1 << 20,
        minimum=1024,
        maximum=64 << 20,
        help="UTF-8 bytes of a logged request and of a logged response each (cut at a character beyond)",
    )
    body_timeout: float = env(
        "BODY_TIMEOUT",
        10.0,
        minimum=0.001,
        help="seconds a request body may take to arrive in full (408 after; at most half the lease TTL)",
    )
    default_completion_tokens: int = env(
        "DEFAULT_COMPLETION_TOKENS",
        2048,
        minimum=1,
        help="completion limit reserved (and forwarded) when a metered request sets none and limits apply",
    )
    template_tokens_per_message: int = env(
        "TEMPLATE_TOKENS_PER_MESSAGE",
        8,
        minimum=0,
        help="prompt allowance per embedding input (special tokens)",
    )
    image_tokens: int = env("IMAGE_TOKENS", 2048, minimum=0, help="prompt allowance per attached image")
    show_timeout: float = env("SHOW_TIMEOUT", 5.0, minimum=0.001, help="seconds for Ollama's /api/show")
    fallback_context_tokens: int = env(
        "FALLBACK_CONTEXT_TOKENS",
        262_144,
        minimum=1,
        help="prompt bound when Ollama does not describe the model: the largest num_ctx it may run",
    )
    keep_alive_floor: int = env(
        "KEEP_ALIVE_FLOOR",
        300,
        minimum=0,
        maximum=2_147_483_647,
        help="seconds: a shorter keep_alive (0 unloads a model all tenants share) is raised to it; 0 = off",
    )
    drain_seconds: float = env(
        "PROXY_DRAIN_SECONDS",
        10.0,
        minimum=0,
        help="seconds stream_proxy serves with /readyz 503 before it stops (> Caddy's health checks)",
    )
    workers: int = env(
        "PROXY_WORKERS",
        1,
        minimum=1,
        maximum=64,
        help="stream_proxy worker processes (SO_REUSEPORT)",
    )
    idle_timeout: float = env("UPSTREAM_IDLE_TIMEOUT", 120.0, minimum=0.001, help="seconds between chunks")

    def backends(self) -> list[BackendSpec]:
        """The Ollama backends: GATEWAY_OLLAMA_URLS, else the one GATEWAY_OLLAMA_URL (no
        `max_parallel`: Ollama queues beyond its own)."""
        if self.ollama_urls.strip():
            return parse_backends(self.ollama_urls)
        return parse_backends(f"ollama={self.ollama_url}")

    def check(self) -> list[str]:
        """Rules that involve more than one variable."""
        try:
            self.backends()
        except BackendSpecError as error:
            variable = "GATEWAY_OLLAMA_URLS" if self.ollama_urls.strip() else "GATEWAY_OLLAMA_URL"
            return [f"{variable}: {error}"]
        return []


@attrs.frozen
class AccountantOptions:
    """Tuning of the usage accountant."""

    mode: Literal["embedded", "off"] = env(
        "ACCOUNTANT", "embedded", help="run the accountant inside each sidecar (embedded) or not (off)"
    )
    consumer: str = env("ACCOUNTANT_CONSUMER", "", help="consumer name in the group (default: host and pid)")
    batch_size: int = env("ACCOUNTANT_BATCH", 500, minimum=1, maximum=10_000, help="events per transaction")
    linger: float = env(
        "ACCOUNTANT_LINGER",
        0.05,
        minimum=0,
        maximum=1,
        help="seconds to let events gather after a batch smaller than GATEWAY_ACCOUNTANT_BATCH (0: none)",
    )
    claim_idle: float = env(
        "ACCOUNTANT_CLAIM_IDLE",
        30.0,
        minimum=1,
        help="seconds before another consumer's pending events are claimed",
    )
    sweep_grace: float = env(
        "ACCOUNTANT_SWEEP_GRACE",
        10.0,
        minimum=0,
        help="seconds past lease expiry before a reservation is charged",
    )
    metrics_host: str = env(
        "ACCOUNTANT_METRICS_HOST", "127.0.0.1", help="standalone accountant: metrics address"
    )
    metrics_port: int = env(
        "ACCOUNTANT_METRICS_PORT",
        8083,
        minimum=0,
        maximum=65535,
        help="standalone accountant: metrics port (0 = off)",
    )
    prompt_purge_interval: float = env(
        "PROMPT_PURGE_INTERVAL", 60.0, minimum=1, help="seconds between purges of expired prompt logs"
    )
    audit_retention_days: int = env(
        "AUDIT_RETENTION_DAYS", 90, minimum=1, help="days audit_log rows are kept before they are deleted"
    )
    dead_letter_retention_days: int = env(
        "DEAD_LETTER_RETENTION_DAYS",
        14,
        minimum=1,
        help="days entries are kept on the usage dead-letter stream",
    )
    consumer_idle_max: float = env(
        "ACCOUNTANT_CONSUMER_IDLE_MAX",
        86_400.0,
        minimum=1,
        help="seconds idle before a consumer with nothing pending is removed from the groups",
    )
    retention_interval: float = env(
        "RETENTION_INTERVAL",
        3600.0,
        minimum=1,
        help="seconds between retention runs (audit rows, dead letters, idle consumers)",
    )


@attrs.frozen
class LoggingOptions:
    """Log verbosity."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = env(
        "LOG_LEVEL", "INFO", help="DEBUG, INFO, WARNING or ERROR"
    )


@attrs.frozen
class SidecarConfig:
    """Everything authz_sidecar reads."""

    postgres: PostgresConfig
    redis: RedisConfig
    grant: GrantSecrets
    hashing: KeyHashing
    options: SidecarOptions
    budget: BudgetOptions
    accountant: AccountantOptions
    logging: LoggingOptions


@attrs.frozen
class AccountantConfig:
    """Everything the standalone accountant reads."""

    postgres: PostgresConfig
    redis: RedisConfig
    accountant: AccountantOptions
    logging: LoggingOptions


@attrs.frozen
class ProxyConfig:
    """Everything stream_proxy reads."""

    redis: RedisConfig
    grant: GrantSecrets
    options: ProxyOptions
    logging: LoggingOptions


@attrs.frozen
class AdminConfig:
    """Everything the admin CLI reads."""

    postgres: PostgresConfig
    redis: RedisConfig
    hashing: KeyHashing
    budget: BudgetOptions


ALL_CONFIGS: tuple[type[Any], ...] = (SidecarConfig, ProxyConfig, AdminConfig, AccountantConfig)


def all_variables() -> list[tuple[str, Any, bool, str]]:
    """Every variable any component reads, once each, for docs and `.env.example`."""
    seen: dict[str, tuple[str, Any, bool, str]] = {}
    for cls in ALL_CONFIGS:
        for row in variables(cls):
            seen.setdefault(row[0], row)
    return sorted(seen.values())
