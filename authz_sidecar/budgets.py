"""Rebuilding missing budget counters in Redis from Postgres's period totals.

Redis counters are a cache of Postgres. When the admission script finds one missing (first use of
a period, Redis restarted or flushed), one replica takes a short lock under the tenant's hash tag,
reads the settled totals, and sets each missing counter only if it is still missing; the others
wait for it and retry. Any failure here is answered 503: never an allow without a counter.
"""

from __future__ import annotations

import asyncio
import secrets
from zoneinfo import ZoneInfo

import asyncpg
import attrs
import coredis

from shared.limits import LimitScripts, NeedsHydration, Scope
from shared.periods import TOTAL_START
from shared.redis_keys import RedisKeys

LOCK_MS = 5000
EXTRA_TTL_SECONDS = 2 * 86400

_TOTALS_SQL = """
SELECT tokens FROM budget_periods
WHERE scope = $1 AND scope_id = $2 AND period = $3 AND period_start = $4
"""


class HydrationBusy(Exception):
    """Another replica is rebuilding this tenant's counters; retry shortly."""


@attrs.define
class BudgetHydrator:
    """Sets missing budget counters from Postgres under a per-tenant lock."""

    redis: coredis.Redis[bytes]
    pool: asyncpg.Pool[asyncpg.Record]
    scripts: LimitScripts
    keys: RedisKeys
    zone: ZoneInfo
    hydrations: int = 0

    async def hydrate(self, scope: Scope, need: NeedsHydration, now: float) -> None:
        """Rebuild what `need` names; raises HydrationBusy when another replica holds the lock."""
        lock = self.keys.hydrate_lock(scope.tenant_id)
        token = secrets.token_hex(8).encode()
        if not await self.redis.set(lock, token, condition=coredis.PureToken.NX, px=LOCK_MS):
            await asyncio.sleep(0.02)
            raise HydrationBusy
        try:
            async with self.pool.acquire() as conn:
                for who, period in need.missing:
                    scope_id = scope.key_id if who == "key" else scope.tenant_id
                    start = scope.periods.start(period) if period != "total" else TOTAL_START  # type: ignore[arg-type]
                    tokens = await conn.fetchval(_TOTALS_SQL, who, scope_id, period, start) or 0
                    left = scope.periods.seconds_left(period, now, self.zone)  # type: ignore[arg-type]
                    ttl = None if left is None else int(left) + EXTRA_TTL_SECONDS
                    await self.redis.set(
                        self.scripts.budget_key(scope, who, period),
                        str(int(tokens)).encode(),
                        condition=coredis.PureToken.NX,
                        ex=ttl,
                    )
            self.hydrations += 1
        finally:
            if await self.redis.get(lock) == token:
                await self.redis.delete([lock])
