"""Rebuilding missing budget counters in Redis from Postgres's period totals.

Redis counters are a cache of Postgres. When the admission script finds one missing (first use of
a period, Redis restarted or flushed), one replica takes the tenant's counter lock and sets each
missing counter from the settled totals plus what Redis counts beyond them (shared/counters.py,
the same step as `rebuild-counters`); the others find the lock taken and retry. Any failure here
is answered 503: never an allow without a counter.
"""

from __future__ import annotations

import asyncio
from zoneinfo import ZoneInfo

import asyncpg
import attrs

from shared import counters
from shared.limits import LOCK_POLL_S, CountersBusy, LimitScripts, NeedsHydration, Scope


class HydrationBusy(Exception):
    """Another replica is rebuilding this tenant's counters; retry shortly."""


@attrs.define
class BudgetHydrator:
    """Sets missing budget counters from Postgres under the tenant's counter lock."""

    pool: asyncpg.Pool[asyncpg.Record]
    scripts: LimitScripts
    zone: ZoneInfo
    hydrations: int = 0

    async def hydrate(self, scope: Scope, need: NeedsHydration, now: float) -> None:
        """Rebuild what `need` names; raises HydrationBusy when another replica holds the lock."""
        del now  # the periods are the scope's; the clock of the TTLs is Redis's
        try:
            async with self.pool.acquire() as conn:
                await counters.rebuild_tenant(
                    conn,
                    self.scripts,
                    zone=self.zone,
                    tenant_id=scope.tenant_id,
                    key_ids=[scope.key_id],
                    periods=scope.periods,
                    missing=set(need.missing),
                    wait=0.0,
                )
        except CountersBusy:
            await asyncio.sleep(LOCK_POLL_S)
            raise HydrationBusy from None
        self.hydrations += 1
