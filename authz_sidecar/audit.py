"""Denials to the audit stream, in batches, off the hot path.

The handler only appends to an in-memory buffer; a background task ships the buffer to the Redis
audit stream (one XADD per batch) every `interval` seconds. Every unauthenticated denial (policy
400/403/404/405/415, key failures, the failed-authentication limiter) is aggregated per client
address, reason, status and minute, so a flood of any kind from one address becomes one row per
minute with its count (the accountant merges the batches of every flush and every sidecar into
that one row), not one per request. Both buffers are bounded: under a flood beyond them, the
oldest individual denials and new aggregates are dropped and counted. Every string is made
printable before it is buffered, and no single batch can stop the task (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import coredis
import orjson

from authz_sidecar.limiter import address_group
from shared.untrusted import printable

log = logging.getLogger("authz_sidecar.audit")

AGGREGATED_REASONS = frozenset(
    {"key_malformed", "key_unknown", "key_mismatch", "auth_failures", "key_guesses"}
)
_TEXT_FIELDS = ("request_id", "reason", "method", "path", "client_addr", "user_agent", "key_prefix")


def aggregated(denial: Denial) -> bool:
    """Aggregated per (address, reason, status, minute): every denial of a request that presented
    no valid key (no tenant known), and every key failure."""
    return denial.tenant_id is None or denial.reason in AGGREGATED_REASONS


def bucket_of(row: dict[str, Any]) -> str | None:
    """The name of an aggregated row's (address, reason, status, minute) bucket, which the audit
    log keeps unique so every batch for one bucket adds to one row (None for individual rows)."""
    if row.get("request_id") is not None:
        return None
    minute = int(float(row.get("at") or 0) // 60)
    return f"{row.get('client_addr')}|{row.get('reason')}|{row.get('status')}|{minute}"


def safe_row(row: dict[str, Any]) -> dict[str, Any]:
    """A denial row with every string printable (defence in depth: the handler already did it)."""
    return {k: printable(v, 2000) if isinstance(v, str) else v for k, v in row.items()}


@attrs.frozen
class Denial:
    """One refused request, as the audit log stores it (never the key)."""

    at: float
    request_id: str | None
    status: int
    reason: str
    method: str | None
    path: str | None
    client_addr: str | None
    user_agent: str | None
    tenant_id: int | None = None
    key_id: int | None = None
    key_prefix: str | None = None


@attrs.define
class DenialAuditor:
    """Buffers denials and ships them in batches."""

    redis: coredis.Redis[bytes]
    stream: str
    interval: float = 1.0
    max_buffer: int = 10_000
    clock: Callable[[], float] = time.time
    _rows: list[dict[str, Any]] = attrs.field(factory=list)
    _aggregates: dict[tuple[str | None, str, int, int], dict[str, Any]] = attrs.field(factory=dict)
    dropped: int = 0
    shipped: int = 0

    def record(self, denial: Denial) -> None:
        """Called on the hot path: O(1), no I/O."""
        denial = attrs.evolve(
            denial, **{name: printable(getattr(denial, name), 200) for name in _TEXT_FIELDS}
        )
        if aggregated(denial):
            # Per address group (an IPv6 /64, as the failure limiter counts): a host owning a /64
            # cannot make a row per request by changing its source address.
            if denial.client_addr is not None:
                denial = attrs.evolve(denial, client_addr=address_group(denial.client_addr))
            minute = int(denial.at // 60)
            key = (denial.client_addr, denial.reason, denial.status, minute)
            row = self._aggregates.get(key)
            if row is None:
                if len(self._aggregates) >= self.max_buffer:  # a flood from many addresses
                    self.dropped += 1
                    return
                row = attrs.asdict(denial) | {"at": minute * 60.0, "count": 0, "request_id": None}
                self._aggregates[key] = row
            row["count"] += 1
            return
        if len(self._rows) >= self.max_buffer:
            self._rows.pop(0)
            self.dropped += 1
        self._rows.append(attrs.asdict(denial) | {"count": 1})

    def take(self) -> list[dict[str, Any]]:
        """Everything buffered, emptying the buffer."""
        rows, self._rows = self._rows, []
        rows.extend(self._aggregates.values())
        self._aggregates = {}
        return rows

    async def flush(self) -> int:
        """Ship one batch; on Redis failure keep the rows for the next try (bounded)."""
        rows = self.take()
        if not rows:
            return 0
        try:
            encoded = orjson.dumps(rows)
        except (TypeError, ValueError):
            try:
                encoded = orjson.dumps([safe_row(r) for r in rows])
            except (TypeError, ValueError):
                self.dropped += len(rows)
                log.error("dropped a denial audit batch that cannot be encoded", extra={"rows": len(rows)})
                return 0
        try:
            await self.redis.xadd(self.stream, {b"kind": b"denials", b"rows": encoded})
        except (coredis.exceptions.RedisError, OSError, TimeoutError):
            self._rows = (rows + self._rows)[-self.max_buffer :]
            log.warning("could not ship denial audit batch; will retry", extra={"rows": len(rows)})
            return 0
        self.shipped += len(rows)
        return len(rows)

    async def run(self) -> None:
        """Background task: flush every `interval` seconds, and once more on the way out."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.flush()
                except Exception:
                    # Never die: this batch is lost (logged once, type and place only), the next goes.
                    log.exception("denial audit flush failed")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())
