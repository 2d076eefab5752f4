"""Rebuilding a tenant's Redis budget and TPM counters from Postgres, safely under live traffic.

Redis counters are a cache of Postgres. A rebuild (docs/ARCHITECTURE.md#rebuilding-counters):
1. takes the tenant's counter lock, which holds off the accountant's settles (the only step that
   removes what Redis counts beyond the ledger); reservations and stream_proxy's settles go on;
2. reads, in one REPEATABLE READ snapshot, the settled totals of `budget_periods`, the ledger's
   tokens of the requests Redis still counts as open reservations or unledgered settles (read
   from Redis after the snapshot was taken), and the TPM window's ledger tokens without those;
3. hands that to shared/lua/rebuild.lua, which adds, atomically, what Redis counts beyond the
   snapshot and releases the lock. Nothing reserved or settled meanwhile is lost or counted twice.

Used by `neuronetz-gateway rebuild-counters` (every counter of every key, and the TPM windows) and
by the sidecar's hydration (only the counters that are missing, under the same lock).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import attrs
import coredis
import orjson

from shared import model_limits
from shared.db import LIMIT_COLUMNS
from shared.limits import LOCK_MS, LOCK_POLL_S, CountersBusy, LimitScripts
from shared.model_names import unqualified
from shared.models import Limits, ModelLimit, model_rules
from shared.periods import PERIODS, Periods, periods_at
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
# Budget counters outlive their period by two days (a late settle still finds its counter).
EXTRA_TTL_SECONDS = 2 * 86400


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


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
    model: str | None = None  # canonical, when the request named one


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
    model = record.get(b"model", b"").decode("utf-8", "replace")
    return Reservation(
        request_id, value, sec, key_id, expires, charged, day, month, unqualified(model) if model else None
    )


@attrs.frozen
class _Snapshot:
    """What one REPEATABLE READ snapshot of Postgres says about a tenant."""

    totals: dict[tuple[str, int, str], int]  # (scope, scope id, period) -> settled tokens
    ledgered: dict[str, int]  # request id -> tokens, of the requests Redis still counts beyond
    buckets: dict[str, dict[str, int]]  # scope name -> {second: tokens} of the TPM window
    # (scope, scope id, period) -> {canonical model: settled tokens}
    model_totals: dict[tuple[str, int, str], dict[str, int]] = attrs.Factory(dict)
    # scope name -> {canonical model: {second: tokens}} of the TPM window
    model_buckets: dict[str, dict[str, dict[str, int]]] = attrs.Factory(dict)

    def model_total(self, who: str, scope_id: int, period: str, pattern: str) -> int:
        """A model rule's settled total: the sum over the models its pattern matches."""
        models = self.model_totals.get((who, scope_id, period), {})
        return sum(tokens for model, tokens in models.items() if model_limits.matches(pattern, model))

    def model_window(self, name: str, pattern: str) -> dict[str, int]:
        """A model rule's TPM buckets from the ledger."""
        window: dict[str, int] = defaultdict(int)
        for model, buckets in self.model_buckets.get(name, {}).items():
            if model_limits.matches(pattern, model):
                for second, tokens in buckets.items():
                    window[second] += tokens
        return dict(window)


ModelScope = tuple[Literal["key", "tenant"], int | None, str]  # (scope, key id or None, pattern)


async def model_scopes(conn: Conn, tenant_id: int, key_ids: list[int]) -> list[ModelScope]:
    """Every model rule's scope of a tenant and its keys: the counters a full rebuild writes."""
    rows = await conn.fetch(
        f"SELECT key_id, pattern, {LIMIT_COLUMNS} FROM model_limits WHERE tenant_id = $1", tenant_id
    )

    def limits(row: Any) -> Limits:
        return Limits(**{c.strip(): row[c.strip()] for c in LIMIT_COLUMNS.split(",")})

    tenant_rules = tuple(ModelLimit(r["pattern"], limits(r)) for r in rows if r["key_id"] is None)
    scopes: list[ModelScope] = [("tenant", None, m.pattern) for m in tenant_rules if m.limits != Limits()]
    for key_id in key_ids:
        own = tuple(ModelLimit(r["pattern"], limits(r)) for r in rows if r["key_id"] == key_id)
        # The key's scope only where a request counts in it (ModelRule.scopes).
        scopes += [
            ("key", key_id, rule.pattern)
            for rule in model_rules(tenant_rules, own)
            if any(who == "key" for who, _ in rule.scopes())
        ]
    return scopes


@attrs.frozen
class _Rebuild:
    """One tenant's rebuild: the tenant and `key_ids`; `missing` limits it to those counters."""

    conn: Conn
    scripts: LimitScripts
    zone: ZoneInfo
    tenant_id: int
    key_ids: list[int]
    periods: Periods | None
    missing: set[tuple[str, str, str | None]] | None
    models: list[ModelScope] = attrs.Factory(list)

    async def snapshot(self, periods: Periods, tpm_since: dt.datetime | None) -> _Snapshot:
        """Settled totals, the ledger's tokens of what Redis still counts, TPM buckets."""
        redis, keys, tenant_id = self.scripts.redis, self.scripts.keys, self.tenant_id
        async with self.conn.transaction(isolation="repeatable_read", readonly=True):
            totals = await self.conn.fetch(
                "SELECT scope, scope_id, period, tokens FROM budget_periods WHERE "
                "((scope = 'tenant' AND scope_id = $1) OR (scope = 'key' AND scope_id = ANY($2::bigint[]))) "
                "AND ((period = 'day' AND period_start = $3) OR (period = 'month' AND period_start = $4) "
                "OR period = 'total')",
                tenant_id,
                self.key_ids,
                periods.day,
                periods.month,
            )
            # Read only now, after the snapshot was taken: a request the snapshot's ledger has is
            # already in Redis as an open reservation or an unledgered settle, and stays so (the lock).
            async with redis.pipeline(transaction=False) as pipe:
                opened = pipe.zrange(keys.reservation_index(tenant_id), 0, -1)
                settled = pipe.hkeys(keys.unledgered(tenant_id))
            ids = sorted({_text(i) for i in [*await opened, *await settled]})
            rows = await self.conn.fetch(
                "SELECT request_id, total_tokens FROM usage_ledger "
                "WHERE tenant_id = $1 AND request_id = ANY($2::text[])",
                tenant_id,
                ids,
            )
            ledgered = {r["request_id"]: amount(r["total_tokens"]) or 0 for r in rows}
            model_totals: dict[tuple[str, int, str], dict[str, int]] = defaultdict(dict)
            if self.models:
                for row in await self.conn.fetch(
                    "SELECT scope, scope_id, model, period, tokens FROM model_budget_periods WHERE "
                    "((scope = 'tenant' AND scope_id = $1) "
                    "OR (scope = 'key' AND scope_id = ANY($2::bigint[]))) "
                    "AND ((period = 'day' AND period_start = $3) OR (period = 'month' AND period_start = $4) "
                    "OR period = 'total')",
                    tenant_id,
                    self.key_ids,
                    periods.day,
                    periods.month,
                ):
                    model_totals[(row["scope"], row["scope_id"], row["period"])][row["model"]] = (
                        amount(row["tokens"]) or 0
                    )
            model_buckets: dict[str, dict[str, dict[str, int]]] = defaultdict(
                lambda: defaultdict(lambda: defaultdict(int))
            )
            buckets: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            if tpm_since is not None:
                # The live windows count a request at the second it was reserved: its start.
                for row in await self.conn.fetch(
                    "SELECT key_id, model_key, floor(extract(epoch FROM started_at))::bigint AS sec, "
                    "sum(total_tokens) AS tokens FROM usage_ledger WHERE tenant_id = $1 "
                    "AND finished_at >= $2 AND started_at >= $2 AND NOT (request_id = ANY($3::text[])) "
                    "GROUP BY key_id, model_key, sec",
                    tenant_id,
                    tpm_since,
                    ids,
                ):
                    tokens, second = amount(row["tokens"]) or 0, str(row["sec"])
                    for name in ("t", f"k{row['key_id']}"):
                        buckets[name][second] += tokens
                        if row["model_key"] is not None:
                            model_buckets[name][row["model_key"]][second] += tokens
        return _Snapshot(
            {(r["scope"], r["scope_id"], r["period"]): amount(r["tokens"]) or 0 for r in totals},
            ledgered,
            buckets,
            model_totals,
            model_buckets,
        )

    async def run(self, token: str) -> int | None:
        """With the lock held as `token`: counters written, None when the lock was lost."""
        keys, tenant_id = self.scripts.keys, self.tenant_id
        now = await self.scripts.now_ms() / 1000
        periods = periods_at(now, self.zone) if self.periods is None else self.periods
        names = periods.names()
        full = self.missing is None
        seen = await self.snapshot(
            periods, dt.datetime.fromtimestamp(now - WINDOW_SECONDS, dt.UTC) if full else None
        )
        counter_keys: list[str] = []
        plan: list[dict[str, Any]] = []
        scopes: list[tuple[Literal["key", "tenant"], int | None]] = [
            ("tenant", None),
            *(("key", k) for k in self.key_ids),
        ]
        for who, key_id in scopes:
            name = "t" if key_id is None else f"k{key_id}"
            for period in PERIODS:
                if self.missing is not None and (who, period, None) not in self.missing:
                    continue
                left = periods.seconds_left(period, now, self.zone)
                counter_keys.append(keys.budget(tenant_id, name, period, names[period]))
                plan.append(
                    {
                        "k": len(counter_keys) + 3,
                        "scope": "t" if key_id is None else key_id,
                        "period": period,
                        "value": seen.totals.get((who, key_id or tenant_id, period), 0),
                        "ttl": -1 if left is None else int(left) + EXTRA_TTL_SECONDS,
                        "index": RESERVE_INDEX[(who, period)],
                        "missing_only": not full,
                    }
                )
            if full:
                counter_keys.append(keys.tpm(tenant_id, name))
                plan.append(
                    {
                        "k": len(counter_keys) + 3,
                        "scope": "t" if key_id is None else key_id,
                        "period": "tpm",
                        "value": dict(seen.buckets.get(name, {})),
                        "ttl": WINDOW_SECONDS + 5,
                        "index": 3 if key_id is None else 2,
                        "missing_only": False,
                    }
                )
        for who, key_id, pattern in self.models:
            name, scope_id = ("t", tenant_id) if key_id is None else (f"k{key_id}", key_id)
            short = model_limits.digest(pattern)
            for period in PERIODS:
                if self.missing is not None and (who, period, pattern) not in self.missing:
                    continue
                left = periods.seconds_left(period, now, self.zone)
                counter_keys.append(keys.model_budget(tenant_id, short, name, period, names[period]))
                plan.append(
                    {
                        "k": len(counter_keys) + 3,
                        "scope": "t" if key_id is None else key_id,
                        "period": period,
                        "value": seen.model_total(who, scope_id, period, pattern),
                        "ttl": -1 if left is None else int(left) + EXTRA_TTL_SECONDS,
                        "pattern": model_limits.lua_pattern(pattern),
                        "missing_only": not full,
                    }
                )
            if full:
                counter_keys.append(keys.model(tenant_id, short, "tpm", name))
                plan.append(
                    {
                        "k": len(counter_keys) + 3,
                        "scope": "t" if key_id is None else key_id,
                        "period": "tpm",
                        "value": seen.model_window(name, pattern),
                        "ttl": WINDOW_SECONDS + 5,
                        "pattern": model_limits.lua_pattern(pattern),
                        "missing_only": False,
                    }
                )
        document = {
            "resv_prefix": keys.reservation(tenant_id, ""),
            "day": names["day"],
            "month": names["month"],
            "counters": plan,
            "ledgered": seen.ledgered,
        }
        lists = [keys.reservation_index(tenant_id), keys.unledgered(tenant_id), keys.hydrate_lock(tenant_id)]
        return await self.scripts.rebuild_counters([*lists, *counter_keys], token, orjson.dumps(document))


async def rebuild_tenant(
    conn: Conn,
    scripts: LimitScripts,
    *,
    zone: ZoneInfo,
    tenant_id: int,
    key_ids: list[int],
    periods: Periods | None = None,
    missing: set[tuple[str, str, str | None]] | None = None,
    wait: float = 10.0,
) -> int:
    """Rebuild one tenant's counters for the tenant and `key_ids`: all of them and the TPM windows,
    model rules' included, or (`missing`: (who, period, pattern or None) as hydration asks, for the
    one key in `key_ids`) only those missing. Returns the counters written; CountersBusy when the
    lock stays taken for `wait` seconds (0: one try)."""
    if missing is None:
        models = await model_scopes(conn, tenant_id, key_ids)
    else:
        key_id = key_ids[0] if key_ids else None
        wanted: set[ModelScope] = {
            (who, None if who == "tenant" else key_id, pattern)  # type: ignore[misc]
            for who, _, pattern in missing
            if pattern is not None
        }
        models = sorted(wanted, key=str)
    job = _Rebuild(conn, scripts, zone, tenant_id, key_ids, periods, missing, models)
    redis, lock = scripts.redis, scripts.keys.hydrate_lock(tenant_id)
    deadline = time.monotonic() + wait
    while True:
        token = secrets.token_hex(8)
        if await redis.set(lock, token.encode(), condition=coredis.PureToken.NX, px=LOCK_MS):
            try:
                written = await job.run(token)
            finally:
                if await redis.get(lock) == token.encode():
                    await redis.delete([lock])
            if written is not None:
                return written
        if time.monotonic() >= deadline:
            raise CountersBusy
        await asyncio.sleep(LOCK_POLL_S)


async def rebuild(
    conn: Conn,
    redis: coredis.Redis[bytes],
    keys: RedisKeys,
    *,
    zone: ZoneInfo,
    tenant_ids: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Rebuilt:
    """Recompute every counter of the given tenants (all when None) and their keys, calling
    `progress(tenants done, tenants)` after each tenant."""
    scripts = LimitScripts(redis, keys)
    if tenant_ids is None:
        tenant_ids = [r["id"] for r in await conn.fetch("SELECT id FROM tenants ORDER BY id")]
    budgets = tpms = 0
    for done, tenant_id in enumerate(tenant_ids, 1):
        key_ids = [
            r["id"]
            for r in await conn.fetch("SELECT id FROM api_keys WHERE tenant_id = $1 ORDER BY id", tenant_id)
        ]
        await rebuild_tenant(conn, scripts, zone=zone, tenant_id=tenant_id, key_ids=key_ids)
        models = len(await model_scopes(conn, tenant_id, key_ids))
        budgets += len(PERIODS) * (1 + len(key_ids) + models)
        tpms += 1 + len(key_ids) + models
        if progress is not None:
            progress(done, len(tenant_ids))
    return Rebuilt(tenants=len(tenant_ids), budget_counters=budgets, tpm_windows=tpms)
