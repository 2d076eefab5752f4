"""`neuronetz-gateway top`: the busiest tenants and keys now, refreshed every second.

Everything comes from what the gateway already writes, never from the request path: requests,
tokens and 429s of the last minute from the audit log (a row per request, denials counted in
buckets; read by its time index), tokens used today from the settled budget periods, streams in
flight from the leases in Redis (counted for the tenants stream_proxy has registered as reserving and
for the keys of those tenants). The last minute trails the traffic by what the accountant takes to
write it (well under a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sys
import termios
import time
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import attrs
import coredis
from rich.console import Console, Group
from rich.live import Live

from shared import cli_format as fmt
from shared.periods import periods_at
from shared.redis_keys import RedisKeys

WINDOW = dt.timedelta(minutes=1)


@attrs.frozen
class Busy:
    """One tenant's or key's last minute."""

    name: str  # the tenant's name, or nz_<prefix>
    tenant: str
    requests: int  # every request of the last minute, refused ones included
    tokens: int
    refused: int  # 429s
    streams: int | None  # None: Redis did not answer
    today: int
    daily_limit: int | None


@attrs.frozen
class Snapshot:
    """What `top` shows at one moment."""

    at: dt.datetime
    tenants: list[Busy]
    keys: list[Busy]


async def streams(redis: coredis.Redis[bytes], names: list[str], now_ms: int) -> list[int] | None:
    """Live leases (streams in flight) in each of the lease sets `names` (None: Redis did not answer)."""
    if not names:
        return []
    try:
        # One round trip for all of them (a cluster pipeline splits it by node).
        async with redis.pipeline(transaction=False) as pipe:
            counts = [pipe.zcount(name, now_ms, "+inf") for name in names]
        return [int(await count) for count in counts]
    except (coredis.exceptions.RedisError, OSError, TimeoutError, RuntimeError):
        return None


async def snapshot(
    conn: asyncpg.Connection,
    redis: coredis.Redis[bytes],
    keys: RedisKeys,
    *,
    zone: Any,
    limit: int = 10,
    now: dt.datetime | None = None,
) -> Snapshot:
    """The `limit` busiest tenants and keys: most requests in the last minute, then most streams."""
    now = now or dt.datetime.now(dt.UTC)
    since = now - WINDOW
    day = periods_at(now.timestamp(), zone).day
    # The audit log has a row per request (and one per bucket of denials, with its count), indexed
    # by time: the last minute is read from it, never by scanning the ledger.
    served = await conn.fetch(
        "SELECT tenant_id, key_id, coalesce(sum(count), 0) AS requests, coalesce(sum(tokens), 0) AS tokens, "
        "coalesce(sum(count) FILTER (WHERE status = 429), 0) AS refused FROM audit_log "
        "WHERE at >= $1 AND tenant_id IS NOT NULL GROUP BY tenant_id, key_id",
        since,
    )
    try:
        reserving = [int(t) for t in await redis.zrange(keys.reserving_tenants, 0, -1)]
    except (coredis.exceptions.RedisError, OSError, TimeoutError, ValueError):
        reserving = []
    tenant_ids = {r["tenant_id"] for r in served} | set(reserving)
    tenants = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, name, daily_tokens FROM tenants WHERE id = ANY($1::bigint[])", sorted(tenant_ids)
        )
    }
    key_rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, tenant_id, prefix, daily_tokens FROM api_keys WHERE tenant_id = ANY($1::bigint[]) "
            "AND (revoked_at IS NULL)",
            sorted(tenant_ids),
        )
    }
    used = {
        (r["scope"], r["scope_id"]): int(r["tokens"])
        for r in await conn.fetch(
            "SELECT scope, scope_id, tokens FROM budget_periods WHERE period = 'day' AND period_start = $1 "
            "AND ((scope = 'tenant' AND scope_id = ANY($2::bigint[])) OR "
            "(scope = 'key' AND scope_id = ANY($3::bigint[])))",
            day,
            sorted(tenants),
            sorted(key_rows),
        )
    }
    now_ms = int(now.timestamp() * 1000)
    tenant_list = sorted(tenants)
    key_list = sorted(key_rows)
    tenant_streams = await streams(redis, [keys.leases(t, "t") for t in tenant_list], now_ms)
    key_streams = await streams(
        redis, [keys.leases(key_rows[k]["tenant_id"], f"k{k}") for k in key_list], now_ms
    )

    def total(
        rows: list[asyncpg.Record], pick: Callable[[asyncpg.Record], Any], field: str
    ) -> dict[Any, int]:
        sums: dict[Any, int] = {}
        for r in rows:
            sums[pick(r)] = sums.get(pick(r), 0) + int(r[field])
        return sums

    fields = ("requests", "tokens", "refused")
    by_tenant = {f: total(served, lambda r: r["tenant_id"], f) for f in fields}
    by_key = {f: total(served, lambda r: r["key_id"], f) for f in fields}
    busy_tenants = [
        Busy(
            name=tenants[t]["name"],
            tenant=tenants[t]["name"],
            requests=by_tenant["requests"].get(t, 0),
            tokens=by_tenant["tokens"].get(t, 0),
            refused=by_tenant["refused"].get(t, 0),
            streams=None if tenant_streams is None else tenant_streams[i],
            today=used.get(("tenant", t), 0),
            daily_limit=tenants[t]["daily_tokens"],
        )
        for i, t in enumerate(tenant_list)
    ]
    busy_keys = [
        Busy(
            name=f"nz_{key_rows[k]['prefix']}",
            tenant=tenants[key_rows[k]["tenant_id"]]["name"],
            requests=by_key["requests"].get(k, 0),
            tokens=by_key["tokens"].get(k, 0),
            refused=by_key["refused"].get(k, 0),
            streams=None if key_streams is None else key_streams[i],
            today=used.get(("key", k), 0),
            daily_limit=key_rows[k]["daily_tokens"] if (key_rows[k]["daily_tokens"] or 0) >= 0 else None,
        )
        for i, k in enumerate(key_list)
    ]

    def busiest(rows: list[Busy]) -> list[Busy]:
        active = [b for b in rows if b.requests or b.refused or b.streams]
        return sorted(active, key=lambda b: (-b.requests, -(b.streams or 0), -b.tokens, b.name))[:limit]

    return Snapshot(now, busiest(busy_tenants), busiest(busy_keys))


def _today(b: Busy) -> str:
    if not b.daily_limit:
        return fmt.number(b.today)
    return f"{fmt.number(b.today)} ({min(999, b.today * 100 // b.daily_limit)} %)"


def render(shot: Snapshot, width: int) -> Group:
    """The two tables of one snapshot."""
    parts: list[Any] = []
    for title, rows, first in (("tenants", shot.tenants, "tenant"), ("keys", shot.keys, "key")):
        columns = [
            first,
            *(["tenant"] if first == "key" else []),
            "req/min",
            "tok/min",
            "streams",
            "429s",
            "today",
        ]
        lines: list[list[fmt.Cell]] = []
        for b in rows:
            lines.append(
                [
                    fmt.literal(b.name),
                    *([fmt.literal(b.tenant)] if first == "key" else []),
                    fmt.number(b.requests),
                    fmt.number(b.tokens),
                    "?" if b.streams is None else str(b.streams),
                    fmt.number(b.refused),
                    _today(b),
                ]
            )
        heading = f"busiest {title}, last minute · {shot.at.strftime('%H:%M:%S')}Z"
        if not lines:
            lines = [["—", *([""] if first == "key" else []), "", "", "", "", ""]]
        parts.append(fmt.table(heading, columns, lines, width=width, foldable=(first, "tenant")).table)
    parts.append("[dim]q or Ctrl-C quits[/]")
    return Group(*parts)


@contextlib.contextmanager
def _keys_pressed() -> Iterator[asyncio.Event]:
    """An event set when `q` is typed (the terminal in cbreak mode meanwhile, restored after)."""
    quit_now = asyncio.Event()
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        yield quit_now
        return
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def read() -> None:
        data = os.read(fd, 32)
        if not data or b"q" in data.lower():
            quit_now.set()

    tty.setcbreak(fd)
    loop.add_reader(fd, read)
    try:
        yield quit_now
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def live(
    take: Callable[[], Awaitable[Snapshot]],
    console: Console,
    *,
    interval: float = 1.0,
    frames: int | None = None,
) -> None:
    """Redraw every `interval` seconds until `q`, Ctrl-C or `frames` frames."""
    with _keys_pressed() as quit_now, Live(console=console, auto_refresh=False, screen=False) as view:
        shown = 0
        while frames is None or shown < frames:
            started = time.monotonic()
            view.update(render(await take(), console.width), refresh=True)
            shown += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit_now.wait(), max(0.0, interval - (time.monotonic() - started)))
            if quit_now.is_set():
                return
