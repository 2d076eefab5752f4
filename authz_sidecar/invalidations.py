"""Applying key and tenant changes to the in-process key cache on every replica within a second.

The admin CLI publishes a notice on Redis for every change. This listener drops the affected cache
entries as notices arrive. Postgres is the fallback: changed rows are re-read by `updated_at` every
`fallback_interval` seconds (and on every resubscription), so a change still applies within a
second when a notice is lost or Redis pub/sub is unavailable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import asyncpg
import attrs
import coredis
from coredis.retry import NoRetryPolicy

from authz_sidecar.keys import KeyCache
from shared import invalidation

log = logging.getLogger("authz_sidecar.invalidations")

_CHANGED_SQL = """
SELECT 'key' AS kind, tenant_id, id AS key_id FROM api_keys WHERE updated_at > $1
UNION ALL
SELECT 'tenant', id, NULL FROM tenants WHERE updated_at > $1
"""


@attrs.define
class InvalidationListener:
    """Subscription plus Postgres fallback; `run()` is the background task."""

    redis: coredis.Redis[bytes]
    pool: asyncpg.Pool[asyncpg.Record]
    cache: KeyCache
    channel: str
    # A notice can also be lost while subscribed (the CLI could not reach Redis, a dropped
    # connection not yet noticed), so Postgres is re-read at this interval all the time: one small
    # indexed query, and every change applies within a second whatever happens to pub/sub.
    fallback_interval: float = 0.5
    subscribed: bool = False
    applied: int = 0
    _watermark: dt.datetime | None = None

    def apply(self, notice: invalidation.Invalidation) -> None:
        """Drop what a notice names from the cache."""
        self.applied += 1
        if notice.kind == "tenant":
            self.cache.drop(tenant_id=notice.tenant_id)
        else:
            self.cache.drop(tenant_id=notice.tenant_id, key_id=notice.key_id)

    async def poll(self) -> int:
        """Re-read rows changed since the last poll; returns how many changes were applied."""
        async with self.pool.acquire() as conn:
            now: dt.datetime = await conn.fetchval("SELECT now()")
            if self._watermark is None:
                self._watermark = now
                return 0
            rows = await conn.fetch(_CHANGED_SQL, self._watermark - dt.timedelta(seconds=1))
        self._watermark = now
        for row in rows:
            self.apply(invalidation.Invalidation(row["kind"], row["tenant_id"], row["key_id"], "poll"))
        return len(rows)

    async def _subscribe(self) -> None:
        pubsub = self.redis.pubsub(
            channels=[self.channel], ignore_subscribe_messages=True, retry_policy=NoRetryPolicy()
        )
        async with pubsub:
            self.subscribed = True
            await self.poll()  # catch up on anything missed while unsubscribed
            while True:
                message: Any = await pubsub.get_message(timeout=1)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    self.apply(invalidation.decode(message["data"]))
                except Exception:  # noqa: BLE001 - a malformed notice must not stop the listener
                    log.warning("ignored a malformed invalidation notice")

    async def run_subscription(self) -> None:
        """Keep a subscription alive; reconnect with backoff."""
        backoff = 0.1
        while True:
            try:
                await self._subscribe()
            except asyncio.CancelledError:
                raise
            except BaseException:  # noqa: BLE001 - Redis failures surface as exception groups
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Cancelled while coredis unwound an error: the group hid the cancellation.
                    raise asyncio.CancelledError from None
                if self.subscribed:
                    log.warning("invalidation subscription lost; falling back to Postgres")
                self.subscribed = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:  # pragma: no cover - _subscribe only returns by raising
                backoff = 0.1

    async def run_fallback(self) -> None:
        """Poll Postgres every `fallback_interval` seconds."""
        while True:
            await asyncio.sleep(self.fallback_interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a Postgres hiccup only delays the next poll
                log.warning("invalidation poll failed")
