"""Rebuilding missing budget counters in Redis from Postgres's period totals.

Redis counters are a cache of Postgres. When the admission script finds one missing (first use of
a period, Redis restarted or flushed), one replica takes the tenant's counter lock and sets each
missing counter from the settled totals plus what Redis counts beyond them (shared/counters.py,
the same step as `rebuild-counters`); the others find the lock taken and retry. Within one
process, the requests of a burst that find the same counters missing share one hydration: only
it takes a pooled Postgres connection (a burst of first requests once emptied the pool and got
503s). Any failure here is answered 503: never an allow without a counter.
"""

from __future__ import annotations

import asyncio
from zoneinfo import ZoneInfo

import asyncpg
import attrs

from shared import counters
from shared.limits import LOCK_POLL_S, CountersBusy, LimitScripts, NeedsHydration, Scope
from shared.periods import Periods


class HydrationBusy(Exception):
    """Another replica is rebuilding this tenant's counters; retry shortly."""


@attrs.define
class BudgetHydrator:
    """Sets missing budget counters from Postgres under the tenant's counter lock."""

    pool: asyncpg.Pool[asyncpg.Record]
    scripts: LimitScripts
    zone: ZoneInfo
    hydrations: int = 0
    _running: dict[tuple[int, int, Periods], asyncio.Task[None]] = attrs.field(init=False, factory=dict)

    async def hydrate(self, scope: Scope, need: NeedsHydration, now: float) -> None:
        """Rebuild what `need` names; raises HydrationBusy when another replica holds the lock.

        While one runs for the key and periods, the others wait for it (and raise what it raised)
        instead of starting their own; the caller then asks the admission script again, which
        names whatever is still missing. Shielded: a caller that goes away leaves it running for
        the rest."""
        del now  # the periods are the scope's; the clock of the TTLs is Redis's
        at = (scope.tenant_id, scope.key_id, scope.periods)
        task = self._running.get(at)
        if task is None:
            task = asyncio.create_task(self._hydrate(scope, need))
            self._running[at] = task
            task.add_done_callback(lambda done: self._finished(at, done))
        await asyncio.shield(task)

    def _finished(self, at: tuple[int, int, Periods], task: asyncio.Task[None]) -> None:
        if self._running.get(at) is task:
            del self._running[at]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone (it is theirs to raise)

    async def _hydrate(self, scope: Scope, need: NeedsHydration) -> None:
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
