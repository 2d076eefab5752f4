"""The accountant's Postgres side: one transaction per batch of usage events.

Ledger rows are inserted idempotently by request id; only rows that are new in this transaction add
to the budget period totals, so an event delivered twice is counted once. The same transaction
writes the audit rows, `last_used_at` and, for keys that opted in, the expiring prompt logs.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from authz_sidecar.audit import bucket_of
from shared.models import UsageEvent
from shared.untrusted import printable

if TYPE_CHECKING:
    from shared.db import Conn

_LEDGER_SQL = """
INSERT INTO usage_ledger (request_id, tenant_id, key_id, endpoint, model, prompt_tokens, completion_tokens,
    reserved_tokens, estimated, estimate_reason, http_status, upstream_status, started_at, first_byte_at,
    finished_at, bytes_relayed, client_disconnected, model_key)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[],
    $7::bigint[], $8::bigint[], $9::bool[], $10::text[], $11::int[], $12::int[], $13::timestamptz[],
    $14::timestamptz[], $15::timestamptz[], $16::bigint[], $17::bool[], $18::text[])
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id
"""

_BUDGET_SQL = """
INSERT INTO budget_periods (scope, scope_id, period, period_start, tokens)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::date[], $5::bigint[])
ON CONFLICT (scope, scope_id, period, period_start)
DO UPDATE SET tokens = budget_periods.tokens + EXCLUDED.tokens, updated_at = now()
"""

_MODEL_BUDGET_SQL = """
INSERT INTO model_budget_periods (scope, scope_id, model, period, period_start, tokens, requests)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::date[], $6::bigint[], $7::bigint[])
ON CONFLICT (scope, scope_id, period, period_start, model)
DO UPDATE SET tokens = model_budget_periods.tokens + EXCLUDED.tokens,
    requests = model_budget_periods.requests + EXCLUDED.requests, updated_at = now()
"""

_AUDIT_SQL = """
INSERT INTO audit_log (at, request_id, tenant_id, key_id, key_prefix, client_addr, method, path, model,
    status, reason, tokens, latency_ms, user_agent, count)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::int[], $11::text[], $12::bigint[], $13::float8[], $14::text[],
    $15::int[])
ON CONFLICT (request_id) WHERE request_id IS NOT NULL DO NOTHING
"""

_LAST_USED_SQL = """
UPDATE api_keys k SET last_used_at = greatest(coalesce(k.last_used_at, u.at), u.at)
FROM (SELECT * FROM unnest($1::bigint[], $2::timestamptz[]) AS t(key_id, at)) u
WHERE k.id = u.key_id
"""

_PROMPT_SQL = """
INSERT INTO prompt_logs (request_id, tenant_id, key_id, request_text, response_text, created_at, expires_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::timestamptz[],
    $7::timestamptz[])
ON CONFLICT (request_id) DO NOTHING
"""


def _ts(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def _column(events: Sequence[UsageEvent], name: str) -> list[Any]:
    return [getattr(e, name) for e in events]


def _budget_rows(events: Sequence[UsageEvent]) -> list[list[Any]]:
    totals: dict[tuple[str, int, str, dt.date], int] = defaultdict(int)
    for event in events:
        if not event.periods or event.total_tokens <= 0:
            continue
        starts = {
            "day": dt.date.fromisoformat(event.periods["day"]),
            "month": dt.date.fromisoformat(event.periods["month"]),
            "total": dt.date(1970, 1, 1),
        }
        for scope, scope_id in (("tenant", event.tenant_id), ("key", event.key_id)):
            for period, start in starts.items():
                totals[(scope, scope_id, period, start)] += event.total_tokens
    columns: list[list[Any]] = [[], [], [], [], []]
    for (scope, scope_id, period, start), tokens in totals.items():
        for column, value in zip(columns, (scope, scope_id, period, start, tokens), strict=True):
            column.append(value)
    return columns


def _model_budget_rows(events: Sequence[UsageEvent]) -> list[list[Any]]:
    """Tokens and requests per scope, canonical model and period (the sums model rules rebuild from),
    in one order for every accountant (two upserting the same rows in opposite orders deadlock)."""
    totals: dict[tuple[str, int, str, str, dt.date], list[int]] = defaultdict(lambda: [0, 0])
    for event in events:
        if not event.periods or event.model_key is None:
            continue
        starts = {
            "day": dt.date.fromisoformat(event.periods["day"]),
            "month": dt.date.fromisoformat(event.periods["month"]),
            "total": dt.date(1970, 1, 1),
        }
        for scope, scope_id in (("tenant", event.tenant_id), ("key", event.key_id)):
            for period, start in starts.items():
                row = totals[(scope, scope_id, event.model_key, period, start)]
                row[0] += event.total_tokens
                row[1] += 1
    columns: list[list[Any]] = [[], [], [], [], [], [], []]
    for (scope, scope_id, model, period, start), (tokens, requests) in sorted(totals.items()):
        for column, value in zip(
            columns, (scope, scope_id, model, period, start, tokens, requests), strict=True
        ):
            column.append(value)
    return columns


def check(event: UsageEvent) -> None:
    """Raise (ValueError, KeyError) when an event's budget periods cannot be read: such an event
    would fail every batch it is in, so it is dead-lettered before the batch is written."""
    _budget_rows([event])


async def apply_usage(conn: Conn, events: Sequence[UsageEvent]) -> set[str]:
    """Write a batch in one transaction; returns the request ids that were new."""
    if not events:
        return set()
    async with conn.transaction():
        rows = await conn.fetch(
            _LEDGER_SQL,
            _column(events, "request_id"),
            _column(events, "tenant_id"),
            _column(events, "key_id"),
            _column(events, "endpoint"),
            _column(events, "model"),
            _column(events, "prompt_tokens"),
            _column(events, "completion_tokens"),
            _column(events, "reserved_tokens"),
            _column(events, "estimated"),
            _column(events, "estimate_reason"),
            _column(events, "http_status"),
            _column(events, "upstream_status"),
            [_ts(e.started_at) for e in events],
            [_ts(e.first_byte_at) for e in events],
            [_ts(e.finished_at) for e in events],
            _column(events, "bytes_relayed"),
            _column(events, "client_disconnected"),
            _column(events, "model_key"),
        )
        new = {r["request_id"] for r in rows}
        # One event per new request id, even if the batch carried a duplicate delivery.
        fresh = list({e.request_id: e for e in events if e.request_id in new}.values())
        if not fresh:
            return new
        await conn.execute(_BUDGET_SQL, *_budget_rows(fresh))
        if any(e.model_key is not None for e in fresh):
            await conn.execute(_MODEL_BUDGET_SQL, *_model_budget_rows(fresh))
        await conn.execute(
            _AUDIT_SQL,
            [_ts(e.finished_at) for e in fresh],
            _column(fresh, "request_id"),
            _column(fresh, "tenant_id"),
            _column(fresh, "key_id"),
            _column(fresh, "key_prefix"),
            _column(fresh, "client_addr"),
            _column(fresh, "method"),
            _column(fresh, "endpoint"),
            _column(fresh, "model"),
            _column(fresh, "http_status"),
            [e.estimate_reason for e in fresh],
            [e.total_tokens for e in fresh],
            [round((e.finished_at - e.started_at) * 1000, 3) for e in fresh],
            _column(fresh, "user_agent"),
            [1] * len(fresh),
        )
        last_used: dict[int, float] = {}
        for event in fresh:
            last_used[event.key_id] = max(last_used.get(event.key_id, 0.0), event.finished_at)
        await conn.execute(_LAST_USED_SQL, list(last_used), [_ts(v) for v in last_used.values()])
        logged = [e for e in fresh if e.request_text is not None and e.prompt_log_ttl_seconds]
        if logged:
            await conn.execute(
                _PROMPT_SQL,
                _column(logged, "request_id"),
                _column(logged, "tenant_id"),
                _column(logged, "key_id"),
                [e.request_text or "" for e in logged],
                [e.response_text or "" for e in logged],
                [_ts(e.finished_at) for e in logged],
                [_ts(e.finished_at + (e.prompt_log_ttl_seconds or 0)) for e in logged],
            )
    return new


_AUDIT_BUCKET_SQL = """
INSERT INTO audit_log (at, client_addr, method, path, status, reason, user_agent, count, bucket, tenant_id,
    key_id, key_prefix)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
    $7::text[], $8::int[], $9::text[], $10::bigint[], $11::bigint[], $12::text[])
ON CONFLICT (bucket) WHERE bucket IS NOT NULL DO UPDATE SET count = audit_log.count + EXCLUDED.count
"""

_AUDIT_RETENTION_SQL = """
DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < $1 ORDER BY at LIMIT $2)
"""


def _denial_row(row: dict[str, Any]) -> dict[str, Any]:
    """One denial row as the audit log takes it: text printable (no NUL, no lone surrogate),
    numbers numbers (a malformed field raises here, for this row only)."""
    clean = {k: printable(v, 2000) if isinstance(v, str) else v for k, v in row.items()}
    clean["status"] = int(clean["status"])
    clean["count"] = max(1, int(clean.get("count") or 1))
    clean["at"] = float(clean["at"])
    for name in ("tenant_id", "key_id"):
        clean[name] = None if clean.get(name) is None else int(clean[name])
    return clean


def denial_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows that can be written, and how many could not (logged by the caller)."""
    good: list[dict[str, Any]] = []
    for row in rows:
        try:
            good.append(_denial_row(row))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            continue
    return good, len(rows) - len(good)


async def apply_denials(conn: Conn, rows: Sequence[dict[str, Any]]) -> int:
    """Audit rows for denial batches from the sidecars. Aggregated rows (no request id) add their
    count to the one row of their (address, reason, status, minute) bucket."""
    rows, _ = denial_rows(rows)
    if not rows:
        return 0
    buckets: dict[str, dict[str, Any]] = {}
    single: list[dict[str, Any]] = []
    for row in rows:
        bucket = bucket_of(row)
        if bucket is None:
            single.append(row)
        elif bucket in buckets:  # one statement may touch a row once: merge first
            buckets[bucket]["count"] += row["count"]
        else:
            buckets[bucket] = dict(row)
    async with conn.transaction():
        if single:
            await _insert_single(conn, single)
        if buckets:
            # In one order for every accountant: two upserting the same buckets in opposite orders
            # would deadlock.
            order = sorted(buckets)
            merged = [buckets[b] for b in order]
            await conn.execute(
                _AUDIT_BUCKET_SQL,
                [_ts(r["at"]) for r in merged],
                [r.get("client_addr") for r in merged],
                [r.get("method") for r in merged],
                [r.get("path") for r in merged],
                [r["status"] for r in merged],
                [r.get("reason") for r in merged],
                [r.get("user_agent") for r in merged],
                [r["count"] for r in merged],
                order,
                [r.get("tenant_id") for r in merged],
                [r.get("key_id") for r in merged],
                [r.get("key_prefix") for r in merged],
            )
    return len(rows)


async def purge_audit(conn: Conn, *, before: dt.datetime, chunk: int = 10_000) -> int:
    """Delete audit rows older than `before`, in chunks (no long lock on a big table)."""
    total = 0
    while True:
        status = await conn.execute(_AUDIT_RETENTION_SQL, before, chunk)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < chunk:
            return total


async def _insert_single(conn: Conn, rows: Sequence[dict[str, Any]]) -> None:
    def col(name: str) -> list[Any]:
        return [r.get(name) for r in rows]

    await conn.execute(
        _AUDIT_SQL,
        [_ts(r.get("at")) for r in rows],
        col("request_id"),
        col("tenant_id"),
        col("key_id"),
        col("key_prefix"),
        col("client_addr"),
        col("method"),
        col("path"),
        [None] * len(rows),
        col("status"),
        col("reason"),
        [0] * len(rows),
        [None] * len(rows),
        col("user_agent"),
        col("count"),
    )
