"""Denials to the audit stream, in batches, off the hot path.

The handler only appends to an in-memory buffer; a background task ships the buffer to the Redis
audit stream (one XADD per batch) every `interval` seconds. Denials by unknown or malformed keys
are aggregated per client address, reason and minute, so a flood of random keys becomes a handful
of rows, not one per request. The buffer is bounded: under a flood beyond it, the oldest
individual denials are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import coredis
import orjson

log = logging.getLogger("authz_sidecar.audit")

AGGREGATED_REASONS = frozenset({"key_malformed", "key_unknown", "key_mismatch", "auth_failures"})


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
        if denial.reason in AGGREGATED_REASONS:
            minute = int(denial.at // 60)
            key = (denial.client_addr, denial.reason, denial.status, minute)
            row = self._aggregates.get(key)
            if row is None:
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
            await self.redis.xadd(self.stream, {b"kind": b"denials", b"rows": orjson.dumps(rows)})
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
                await self.flush()
        finally:
            await asyncio.shield(self.flush())
