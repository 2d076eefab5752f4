"""Rebuilding the Redis budget and TPM counters of tenants from Postgres (and open reservations).

Redis counters are a cache of Postgres. `rebuild` sets each budget counter of the current periods
to the settled total in `budget_periods` plus the reservations still open against it, and each TPM
window to the ledger's tokens of the last 61 seconds plus open reservations. Used by
`neuronetz-gateway rebuild-counters` after a Redis loss or a manual ledger correction.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import attrs
import coredis

from shared.periods import PERIODS, periods_at
from shared.redis_keys import RedisKeys

if TYPE_CHECKING:
    from shared.db import Conn

log = logging.getLogger("shared.counters")
WINDOW_SECONDS = 61
# The KEYS index each budget counter has in shared/lua/reserve.lua (its record lists them as charged).
RESERVE_INDEX = {
    ("key", "day"): 4,
    ("key", "month"): 5,
    ("key", "total"): 6,
    ("tenant", "day"): 7,
    ("tenant", "month"): 8,
    ("tenant", "total"): 9,
}
_DAY = 86400


@attrs.frozen
class Rebuilt:
    """What one rebuild wrote."""

    tenants: int
    budget_counters: int
    tpm_windows: int


@attrs.frozen
class Reservation:
    """One open reservation record as shared/lua/reserve.lua writes it."""

    request_id: str
    amount: int
    sec: int
    key_id: int
    expires_ms: int
    charged: frozenset[int]
    day: str
    month: str


def amount(raw: bytes | str | int | None) -> int | None:
    """A token amount read back from Redis or Postgres: a non-negative integer, also when Lua
    wrote it as a float (`1e+20`); None when it is not one (never an exception)."""
    if raw is None:
        return None
    try:
        value = float(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value) or value > 2**62:
        return None
    return int(value)


def reservation(request_id: str, record: dict[bytes, bytes]) -> Reservation | None:
    """A record read defensively: None (logged) when any field is missing or unreadable, so one bad
    record never stops a sweep or a rebuild."""
    fields = [amount(record.get(name)) for name in (b"amount", b"sec", b"key", b"expires")]
    try:
        charged = frozenset(int(i) for i in record.get(b"charged", b"").split(b",") if i)
        day, month = record[b"day"].decode(), record[b"month"].decode()
    except (KeyError, ValueError, UnicodeDecodeError):
        charged, day, month = frozenset(), "", ""
    if any(field is None for field in fields) or not day or not month:
        log.warning("unreadable reservation record skipped", extra={"request_id": request_id[:80]})
        return None
    value, sec, key_id, expires = (int(f) for f in fields if f is not None)
    return Reservation(request_id, value, sec, key_id, expires, charged, day, month)


async def _open_reservations(
    redis: coredis.Redis[bytes], keys: RedisKeys, tenant_id: int
) -> list[Reservation]:
    ids = await redis.zrange(keys.reservation_index(tenant_id), 0, -1)
    records = []
    for raw in ids:
        request_id = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        record = await redis.hgetall(keys.reservation(tenant_id, request_id))
        parsed = reservation(request_id, record) if record else None
        if parsed is not None:
            records.append(parsed)
    return records


async def rebuild(
    conn: Conn,
    redis: coredis.Redis[bytes],
    keys: RedisKeys,
    *,
    zone: ZoneInfo,
    tenant_ids: list[int] | None = None,
    now: float | None = None,
) -> Rebuilt:
    """Recompute the counters of the given tenants (all when None)."""
    now = time.time() if now is None else now
    periods = periods_at(now, zone)
    if tenant_ids is None:
        tenant_ids = [r["id"] for r in await conn.fetch("SELECT id FROM tenants ORDER BY id")]
    budgets = tpms = 0
    for tenant_id in tenant_ids:
        key_ids = [
            r["id"] for r in await conn.fetch("SELECT id FROM api_keys WHERE tenant_id = $1", tenant_id)
        ]
        open_resv = await _open_reservations(redis, keys, tenant_id)
        totals = await conn.fetch(
            "SELECT scope, scope_id, period, tokens FROM budget_periods WHERE "
            "((scope = 'tenant' AND scope_id = $1) OR (scope = 'key' AND scope_id = ANY($2::bigint[]))) "
            "AND ((period = 'day' AND period_start = $3) OR (period = 'month' AND period_start = $4) "
            "OR period = 'total')",
            tenant_id,
            key_ids,
            periods.day,
            periods.month,
        )
        settled = {(r["scope"], r["scope_id"], r["period"]): amount(r["tokens"]) or 0 for r in totals}
        scopes = [("tenant", tenant_id, "t")] + [("key", k, f"k{k}") for k in key_ids]
        names = periods.names()
        for who, ident, scope_name in scopes:
            for period in PERIODS:
                value = settled.get((who, ident, period), 0)
                index = RESERVE_INDEX[(who, period)]
                for record in open_resv:
                    same_key = who == "tenant" or record.key_id == ident
                    same_period = period == "total" or getattr(record, period) == names[period]
                    if index in record.charged and same_key and same_period:
                        value += record.amount
                left = periods.seconds_left(period, now, zone)
                await redis.set(
                    keys.budget(tenant_id, scope_name, period, names[period]),
                    str(value).encode(),
                    ex=None if left is None else int(left) + 2 * _DAY,
                )
                budgets += 1
        since = dt.datetime.fromtimestamp(now - WINDOW_SECONDS, dt.UTC)
        rows = await conn.fetch(
            "SELECT key_id, floor(extract(epoch FROM finished_at))::bigint AS sec, "
            "sum(total_tokens) AS tokens FROM usage_ledger "
            "WHERE tenant_id = $1 AND finished_at >= $2 GROUP BY key_id, sec",
            tenant_id,
            since,
        )
        buckets: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for row in rows:
            tokens = amount(row["tokens"]) or 0
            buckets["t"][row["sec"]] += tokens
            buckets[f"k{row['key_id']}"][row["sec"]] += tokens
        for record in open_resv:
            if record.sec >= now - WINDOW_SECONDS:
                buckets["t"][record.sec] += record.amount
                buckets[f"k{record.key_id}"][record.sec] += record.amount
        for _, _, name in scopes:
            key = keys.tpm(tenant_id, name)
            await redis.delete([key])
            if buckets.get(name):
                await redis.hset(key, {str(s): str(v) for s, v in buckets[name].items()})
                await redis.expire(key, WINDOW_SECONDS + 5)
            tpms += 1
    return Rebuilt(tenants=len(tenant_ids), budget_counters=budgets, tpm_windows=tpms)
