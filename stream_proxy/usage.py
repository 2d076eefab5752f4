"""After every request: the usage event onto the Redis stream, with a bounded local spool.

If Redis cannot take an event, it waits in an in-memory spool and is retried every half second.
A full spool makes the process not ready (/readyz 503) and new requests are refused with 503, so
nothing already accepted is dropped. If the process dies with events in the spool, those events
are lost, but their reservations are still charged in full when the leases expire (flagged
estimated), so budgets are never undercounted.

Events are written by group commit (docs/ARCHITECTURE.md#accounting): a request's event (and its
settle) joins whatever is waiting while the previous round trip is in flight, and one pipeline
writes them all, so under load the cost of a round trip is shared by every request that ended
meanwhile, and at rest an event leaves at once. Each event keeps its own reply: one that failed is
spooled, whatever happened to the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import coredis

from shared import usage_wire
from shared.models import UsageEvent

log = logging.getLogger("stream_proxy.usage")
STORE_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)


@attrs.define
class _Waiting:
    """An event waiting for the next group commit, and how its caller learns the outcome."""

    event: UsageEvent
    then: Callable[[Any], Callable[[], Awaitable[Any]]] | None
    done: asyncio.Future[bool]

    def resolve(self, written: bool) -> None:
        if not self.done.done():
            self.done.set_result(written)

    def fail(self, error: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(error)


@attrs.define
class UsageReporter:
    """Writes usage events; spools them while Redis is unavailable."""

    redis: coredis.Redis[bytes]
    stream: str
    spool_max: int = 10_000
    # Events with prompt logging carry the request's and the answer's text: bounded by bytes too.
    spool_max_bytes: int = 256 * 1024 * 1024
    retry_interval: float = 0.5
    _spool: collections.deque[UsageEvent] = attrs.field(factory=collections.deque)
    _sizes: collections.deque[int] = attrs.field(factory=collections.deque)
    _bytes: int = 0
    written: int = 0
    spooled: int = 0
    batches: int = 0  # pipelines sent by group commit
    _pending: list[_Waiting] = attrs.field(factory=list)
    _flusher: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Events waiting in the spool."""
        return len(self._spool)

    @property
    def spooled_bytes(self) -> int:
        """Bytes of the events waiting in the spool, as they will be written."""
        return self._bytes

    @property
    def full(self) -> bool:
        """No room for another event: the process must stop accepting requests."""
        return len(self._spool) >= self.spool_max or self._bytes >= self.spool_max_bytes

    def _keep(self, event: UsageEvent) -> None:
        size = len(usage_wire.encode(event)[usage_wire.FIELD])
        self._spool.append(event)
        self._sizes.append(size)
        self._bytes += size
        self.spooled += 1

    async def report(
        self, event: UsageEvent, *, then: Callable[[Any], Callable[[], Awaitable[Any]]] | None = None
    ) -> bool:
        """Write one event now (with `then(pipeline)` queued in the same round trip, which returns
        what reads its outcome), or spool it.

        Returns whether the event reached the stream now. A reply lost after a successful write
        spools the event again; the accountant applies each request id once, so that is harmless.
        """
        if self._spool:
            self._keep(event)  # keep order: older events go first
            return False
        if isinstance(self.redis, coredis.RedisCluster) and then is not None:
            return await self._report_then(event, then)
        waiting = _Waiting(event, then, asyncio.get_running_loop().create_future())
        self._pending.append(waiting)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: a cancelled request does not take its event (or anyone else's) with it.
        return await asyncio.shield(waiting.done)

    async def _flush(self) -> None:
        """Write what waits, one pipeline at a time, until nothing does."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write(batch)
                except Exception as exc:  # noqa: BLE001 - its events are spooled; the next batch goes on
                    log.error("usage batch not written", extra={"error": type(exc).__name__})
        finally:
            self._flusher = None
            for waiting in self._pending:  # only when cancelled on the way out
                self._keep(waiting.event)
                waiting.resolve(False)
            self._pending = []

    async def _write(self, batch: list[_Waiting]) -> None:
        ready: list[tuple[_Waiting, dict[bytes, bytes]]] = []
        for waiting in batch:
            try:
                ready.append((waiting, usage_wire.encode(waiting.event)))
            except Exception as exc:  # noqa: BLE001 - handed to that event's caller, as if alone
                waiting.fail(exc)
        queued: list[tuple[Any, Callable[[], Awaitable[Any]] | None]] = []
        sent = False
        try:
            # Errors stay with their command: a failed follow-up never hides a written event. On a
            # cluster the pipeline may raise for one node after another node took the event, so
            # the event's own reply decides (it raises RuntimeError when the command never ran).
            with contextlib.suppress(*STORE_ERRORS):
                async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
                    for waiting, fields in ready:
                        command = pipe.xadd(self.stream, fields)
                        queued.append((command, self._follow_up(waiting, pipe)))
            sent = True  # run, or failed in the store: either way each command holds its reply
            self.batches += 1
        finally:
            cancelled = None
            for index, (waiting, _) in enumerate(ready):
                # A pipeline that never ran leaves its commands without replies: nothing to await.
                written, follow = queued[index] if sent else (None, None)
                if cancelled is None:
                    try:
                        waiting.resolve(await self._outcome(waiting.event, written, follow))
                        continue
                    except asyncio.CancelledError as error:
                        cancelled = error
                self._keep(waiting.event)  # cancelled on the way out: the spool's last drain takes it
                waiting.resolve(False)
            if cancelled is not None:
                raise cancelled

    @staticmethod
    def _follow_up(waiting: _Waiting, pipe: Any) -> Callable[[], Awaitable[Any]] | None:
        """Queue an event's follow-up; one that cannot be queued is logged (by type) and skipped,
        never taking the event or the batch with it."""
        if waiting.then is None:
            return None
        try:
            return waiting.then(pipe)
        except Exception as exc:  # noqa: BLE001 - the event is written regardless
            log.error(
                "usage follow-up not queued",
                extra={"request_id": waiting.event.request_id, "error": type(exc).__name__},
            )
            return None

    async def _outcome(
        self, event: UsageEvent, written: Any, follow: Callable[[], Awaitable[Any]] | None
    ) -> bool:
        try:
            if written is None:
                raise RuntimeError("the event was never queued")
            await written
            self.written += 1
        except (*STORE_ERRORS, RuntimeError):
            self._keep(event)
            log.warning("usage event spooled: Redis unavailable", extra={"request_id": event.request_id})
            return False
        if follow is not None:
            with contextlib.suppress(*STORE_ERRORS):
                await follow()
        return True

    async def _report_then(
        self, event: UsageEvent, then: Callable[[Any], Callable[[], Awaitable[Any]]]
    ) -> bool:
        """On a cluster the stream and the tenant's counters live on different nodes, and one
        pipeline may run the follow-up first: a process killed in between would have settled a
        reservation whose event never reached the stream (usage lost, nothing left for the sweeper
        to charge). So the event is written first, and the follow-up only once it is on the stream."""
        try:
            await self.redis.xadd(self.stream, usage_wire.encode(event))
            self.written += 1
        except STORE_ERRORS:
            self._keep(event)
            log.warning("usage event spooled: Redis unavailable", extra={"request_id": event.request_id})
            return False
        with contextlib.suppress(*STORE_ERRORS):
            async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
                follow = then(pipe)
            await follow()
        return True

    async def drain(self) -> int:
        """Retry spooled events in order; returns how many were written."""
        sent = 0
        while self._spool:
            try:
                await self.redis.xadd(self.stream, usage_wire.encode(self._spool[0]))
            except STORE_ERRORS:
                break
            self._spool.popleft()
            self._bytes -= self._sizes.popleft()
            self.written += 1
            sent += 1
        return sent

    async def run(self) -> None:
        """Background task: keep draining the spool; one last try on the way out."""
        try:
            while True:
                await asyncio.sleep(self.retry_interval)
                if self._spool:
                    await self.drain()
        finally:
            if self._spool:
                await asyncio.shield(self.drain())
                if self._spool:
                    log.error("exiting with spooled usage events", extra={"events": len(self._spool)})
