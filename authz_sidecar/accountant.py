"""The usage accountant: applies every usage event exactly once in effect (docs/ARCHITECTURE.md#accounting).

A consumer group on the usage stream; any number of instances (standalone with
`python -m authz_sidecar.accountant`, or embedded in each sidecar with GATEWAY_ACCOUNTANT=embedded).
Per batch: one Postgres transaction (ledger, budget totals, audit, last_used_at, prompt logs),
then the Redis settle of each reservation (idempotent per request id), then XACK. Entries left
pending by a dead consumer are claimed after `claim_idle`. An event that cannot be applied goes to
the dead-letter stream with its reason and never blocks the stream. Only the accountant trims the
stream, and only below the oldest pending entry. Reservations whose lease expired without a usage
event (stream_proxy died) are charged in full, flagged estimated. Denial batches from the sidecars
become audit rows. Expired prompt logs are purged. Retention: audit rows and dead letters older
than their settings are deleted, consumers idle for long with nothing pending leave the groups.
Every step survives any single bad item or failure: it is logged once and the next goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import attrs
import coredis
import orjson
import uvloop
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from authz_sidecar import ledger
from shared import admin, counters, logs, store, usage_wire
from shared.config import AccountantConfig, AccountantOptions, load_config
from shared.db import DB_ERRORS, create_pool
from shared.exceptions import ConfigError
from shared.limits import LimitScripts, Scope
from shared.models import Limits, UsageEvent
from shared.periods import from_names
from shared.redis_keys import RedisKeys

log = logging.getLogger("authz_sidecar.accountant")
GROUP = "accountant"
T = TypeVar("T")
STORE_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)
STORE_AND_DB_ERRORS: tuple[type[BaseException], ...] = (*STORE_ERRORS, *DB_ERRORS)
# A store that is down (not one that refused this item): wait for it rather than skip the item.
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    coredis.exceptions.ConnectionError,
    coredis.exceptions.BusyLoadingError,
    coredis.exceptions.ClusterError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.AuthenticationError,
    *POSTGRES_UNAVAILABLE,
)

# Denial batches read at once (each holds up to two buffers of rows of one sidecar's flush).
DENIAL_BATCHES = 10


@attrs.define
class AccountantMetrics:
    """Prometheus instruments of the accountant."""

    registry: CollectorRegistry
    applied: Counter = attrs.field(init=False)
    claimed: Counter = attrs.field(init=False)
    dead: Counter = attrs.field(init=False)
    charged_expired: Counter = attrs.field(init=False)
    batch_size: Histogram = attrs.field(init=False)
    batch_seconds: Histogram = attrs.field(init=False)
    lag: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.applied = Counter("accountant_events_applied", "usage events applied", registry=r)
        self.claimed = Counter("accountant_events_claimed", "events claimed from dead consumers", registry=r)
        self.dead = Counter("accountant_dead_letters", "events moved to the dead-letter stream", registry=r)
        self.charged_expired = Counter(
            "accountant_expired_reservations", "reservations charged at lease expiry", registry=r
        )
        self.batch_size = Histogram(
            "accountant_batch_size",
            "events per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.batch_seconds = Histogram("accountant_batch_seconds", "time to apply a batch", registry=r)
        self.lag = Gauge("accountant_lag_seconds", "age of the newest event applied when applied", registry=r)


def scope_of(event: UsageEvent) -> Scope | None:
    """The limit scope whose counters an event settles (None when it charged no budget period)."""
    if not event.periods:
        return None
    return Scope(
        tenant_id=event.tenant_id,
        key_id=event.key_id,
        key_limits=Limits(),
        tenant_limits=Limits(),
        periods=from_names(event.periods),
        model=event.model_key,
    )


@attrs.define
class Accountant:
    """One consumer of the usage and audit streams."""

    redis: coredis.Redis[bytes]
    pool: asyncpg.Pool[asyncpg.Record]
    keys: RedisKeys
    options: AccountantOptions
    metrics: AccountantMetrics
    clock: Callable[[], float] = time.time
    consumer: str = attrs.field(factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    scripts: LimitScripts = attrs.field(init=False)
    applied: int = 0
    failures: int = 0
    _failing: set[tuple[str, str]] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.scripts = LimitScripts(self.redis, self.keys)
        if self.options.consumer:
            self.consumer = self.options.consumer

    async def ensure_groups(self) -> None:
        """Create the consumer groups (from the start of each stream) if missing."""
        for stream in (self.keys.usage_stream, self.keys.audit_stream):
            # Another accountant created it first: join it.
            with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
                await self.redis.xgroup_create(stream, GROUP, identifier="0", mkstream=True)

    # --- usage events ------------------------------------------------------------------------------

    async def _dead_letter(self, identifier: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        await self.redis.xadd(
            self.keys.dead_letters,
            {b"id": identifier, b"reason": reason.encode(), **{b"f:" + k: v for k, v in fields.items()}},
        )
        self.metrics.dead.inc()
        log.warning(
            "usage event moved to the dead-letter stream",
            extra={"entry": identifier.decode(), "reason": reason},
        )

    async def _settle(self, events: Sequence[UsageEvent]) -> None:
        items: list[tuple[Scope, str, int | None]] = []
        for event in events:
            scope = scope_of(event)
            if scope is not None and event.metered:
                actual = None if event.estimate_reason == "lease_expired" else event.total_tokens
                items.append((scope, event.request_id, actual))
        await self.scripts.settle_many(items)

    async def apply(self, entries: Sequence[Any]) -> int:
        """Apply stream entries: Postgres, then Redis, then XACK. Returns events applied."""
        if not entries:
            return 0
        started = time.perf_counter()
        good: list[tuple[bytes, UsageEvent]] = []
        for entry in entries:
            try:
                event = usage_wire.decode(entry.field_values)
                ledger.check(event)  # budget periods the ledger and the settle can read
                scope_of(event)
                good.append((entry.identifier, event))
            except Exception as exc:  # noqa: BLE001 - any undecodable entry is dead-lettered
                await self._dead_letter(
                    entry.identifier, dict(entry.field_values), f"undecodable: {type(exc).__name__}"
                )
                await self.redis.xack(self.keys.usage_stream, GROUP, [entry.identifier])
        events = list({e.request_id: e for _, e in reversed(good)}.values())  # one per request id
        try:
            async with self.pool.acquire() as conn:
                await ledger.apply_usage(conn, events)
        except UNAVAILABLE:
            raise
        except Exception:  # noqa: BLE001 - refused as a whole: find the bad event one by one
            good = await self._one_by_one(good)
            events = [e for _, e in good]
        await self._settle(events)
        if good:
            await self.redis.xack(self.keys.usage_stream, GROUP, [i for i, _ in good])
        self.applied += len(good)
        self.metrics.applied.inc(len(good))
        self.metrics.batch_size.observe(len(entries))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if events:
            self.metrics.lag.set(max(0.0, self.clock() - max(e.finished_at for e in events)))
        return len(good)

    async def _one_by_one(self, batch: list[tuple[bytes, UsageEvent]]) -> list[tuple[bytes, UsageEvent]]:
        """A batch failed as a whole: apply events singly; dead-letter those Postgres refuses.

        Postgres being unavailable is no refusal (starting up or in recovery: 57P03, shutting down,
        too many connections, a lost connection, a read-only standby): that error is raised, so the
        events stay pending and are applied once Postgres is back (scripts/chaos found them lost).
        """
        kept: list[tuple[bytes, UsageEvent]] = []
        for identifier, event in batch:
            try:
                async with self.pool.acquire() as conn:
                    await ledger.apply_usage(conn, [event])
            except UNAVAILABLE:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever refuses one event dead-letters it
                refused = (
                    "refused by Postgres" if isinstance(exc, asyncpg.PostgresError) else "not applicable"
                )
                await self._dead_letter(
                    identifier, usage_wire.encode(event), f"{refused}: {type(exc).__name__}"
                )
                # Never in the ledger: a rebuild of the counters no longer counts it either.
                await self.redis.hdel(self.keys.unledgered(event.tenant_id), [event.request_id])
                await self.redis.xack(self.keys.usage_stream, GROUP, [identifier])
                continue
            kept.append((identifier, event))
        return kept

    async def read_batch(self, block_ms: int = 1000) -> int:
        """Read and apply new events."""
        reply = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            streams={self.keys.usage_stream: ">"},
            count=self.options.batch_size,
            block=block_ms,
        )
        entries = next(iter(reply.values())) if reply else ()
        applied = await self.apply(entries)
        if entries and len(entries) < self.options.batch_size and self.options.linger:
            # A short batch: let the next one gather, so the ledger's cost is paid per batch of
            # many events and not per event (docs/ARCHITECTURE.md#accounting).
            await asyncio.sleep(self.options.linger)
        return applied

    async def claim(self) -> int:
        """Take over entries another consumer left pending for longer than `claim_idle`."""
        start: Any = "0-0"
        total = 0
        for _ in range(100):
            reply = await self.redis.xautoclaim(
                self.keys.usage_stream,
                GROUP,
                self.consumer,
                min_idle_time=int(self.options.claim_idle * 1000),
                start=start,
                count=self.options.batch_size,
            )
            start, entries = reply[0], reply[1]
            if entries:
                self.metrics.claimed.inc(len(entries))
                total += await self.apply(entries)
            if start in (b"0-0", "0-0") or not entries:
                break
        return total

    async def trim(self) -> int:
        """Trim acknowledged entries of the usage and the denial-audit stream: never at or above the
        oldest pending one (both streams would otherwise grow forever)."""
        trimmed = 0
        for stream in (self.keys.usage_stream, self.keys.audit_stream):
            trimmed += await self._isolated(f"trim {stream}", functools.partial(self._trim, stream), 0)
        return trimmed

    async def _trim(self, stream: str) -> int:
        pending: Any = await self.redis.xpending(stream, GROUP)
        floor = getattr(pending, "minimum_identifier", None) if pending and pending.pending else None
        if floor is None:
            groups = await self.redis.xinfo_groups(stream)
            ours = next((g for g in groups if g.get(b"name") in (GROUP.encode(), GROUP)), None)
            floor = ours.get(b"last-delivered-id") if ours else None
        if not floor or floor in (b"0-0", "0-0"):
            return 0
        # MINID takes a stream id; coredis types the threshold as int only.
        minid: Any = floor
        return int(await self.redis.xtrim(stream, coredis.PureToken.MINID, minid))

    # --- expired reservations ------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Charge reservations whose lease expired with no usage event (their stream_proxy died)."""
        now_ms = await self.scripts.now_ms()
        cutoff = now_ms - int(self.options.sweep_grace * 1000)
        charged: list[UsageEvent] = []
        for tenant_id in await self.scripts.reserving_tenants():
            charged += await self._isolated(
                f"sweep tenant {tenant_id}", functools.partial(self._due, tenant_id, cutoff), []
            )
        if charged:
            async with self.pool.acquire() as conn:
                await ledger.apply_usage(conn, charged)
            await self._settle(charged)
            self.metrics.charged_expired.inc(len(charged))
            log.warning("charged reservations whose lease expired", extra={"count": len(charged)})
        return len(charged)

    async def _due(self, tenant_id: int, cutoff: int) -> list[UsageEvent]:
        """One tenant's reservations whose lease expired before `cutoff`, as usage events."""
        charged: list[UsageEvent] = []
        index = self.keys.reservation_index(tenant_id)
        due = await self.redis.zrange(
            index, "-inf", cutoff, sortby=coredis.PureToken.BYSCORE, offset=0, count=500
        )
        if not due and not await self.redis.zcard(index):
            await self.scripts.forget_tenant(tenant_id)
            return charged
        for raw_id in due:
            request_id = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else str(raw_id)
            raw = await self.redis.hgetall(self.keys.reservation(tenant_id, request_id))
            record = counters.reservation(request_id, raw) if raw else None
            if record is None:  # gone, or unreadable (logged): never block the sweep on it
                await self.redis.zrem(index, [request_id])
                continue
            expires = record.expires_ms / 1000
            charged.append(
                UsageEvent(
                    request_id=request_id,
                    tenant_id=tenant_id,
                    key_id=record.key_id,
                    key_prefix="",
                    endpoint="(lease expired)",
                    model=None,
                    prompt_tokens=record.amount,
                    completion_tokens=0,
                    reserved_tokens=record.amount,
                    estimated=True,
                    estimate_reason="lease_expired",
                    http_status=0,
                    upstream_status=None,
                    started_at=expires,
                    first_byte_at=None,
                    finished_at=expires,
                    bytes_relayed=0,
                    client_disconnected=False,
                    periods={"day": record.day, "month": record.month},
                    model_key=record.model,
                )
            )
        return charged

    # --- denials and prompt logs -------------------------------------------------------------------------

    async def read_denials(self) -> int:
        """Denial batches from the sidecars into the audit log."""
        # First what was read and never acknowledged (Postgres was down, a consumer died) once it
        # has been idle for `claim_idle`, by this consumer or another; then what is new.
        claimed = await self.redis.xautoclaim(
            self.keys.audit_stream,
            GROUP,
            self.consumer,
            min_idle_time=int(self.options.claim_idle * 1000),
            start="0-0",
            count=DENIAL_BATCHES,
        )
        entries: Any = [e for e in claimed[1] if e is not None]
        if not entries:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, streams={self.keys.audit_stream: ">"}, count=DENIAL_BATCHES, block=None
            )
            entries = next(iter(reply.values())) if reply else ()
        rows: list[dict[str, Any]] = []
        for entry in entries:
            try:
                batch = orjson.loads(entry.field_values[b"rows"])
            except (KeyError, orjson.JSONDecodeError):
                batch = None
            if not isinstance(batch, list):
                log.warning("ignored a malformed denial batch")
                continue
            rows.extend(row for row in batch if isinstance(row, dict))
        rows, bad = ledger.denial_rows(rows)
        if bad:
            log.warning("ignored malformed denial rows", extra={"rows": bad})
        if rows:
            try:
                async with self.pool.acquire() as conn:
                    await ledger.apply_denials(conn, rows)
            except UNAVAILABLE:
                raise  # pending; read again once Postgres is back (never lost to an outage)
            except Exception:  # noqa: BLE001 - one row Postgres refuses must not lose the batch
                rows = await self._denials_one_by_one(rows)
        if entries:
            await self.redis.xack(self.keys.audit_stream, GROUP, [e.identifier for e in entries])
        return len(rows)

    async def _denials_one_by_one(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept: list[dict[str, Any]] = []
        refused: str | None = None
        for row in rows:
            try:
                async with self.pool.acquire() as conn:
                    await ledger.apply_denials(conn, [row])
            except UNAVAILABLE:
                raise
            except Exception as exc:  # noqa: BLE001 - the refused row is dropped, the rest written
                refused = type(exc).__name__
                continue
            kept.append(row)
        if refused is not None:
            log.warning(
                "dropped denial rows Postgres refused",
                extra={"rows": len(rows) - len(kept), "error": refused},
            )
        return kept

    async def purge(self) -> int:
        """Delete expired prompt logs."""
        async with self.pool.acquire() as conn:
            return await admin.purge_prompts(conn, now=dt.datetime.fromtimestamp(self.clock(), dt.UTC))

    # --- retention -----------------------------------------------------------------------------------

    async def retention(self) -> dict[str, int]:
        """Enforce the retention settings: audit rows and dead letters older than theirs are
        deleted; consumers of the groups idle longer than `consumer_idle_max` with nothing pending
        are removed (their pending entries, if any, are claimed first by `claim`)."""
        now = self.clock()
        done = {"audit_rows": 0, "dead_letters": 0, "consumers": 0}
        audit_cutoff = dt.datetime.fromtimestamp(now - self.options.audit_retention_days * 86_400, dt.UTC)

        async def audit() -> int:
            async with self.pool.acquire() as conn:
                return await ledger.purge_audit(conn, before=audit_cutoff)

        async def dead_letters() -> int:
            cutoff_ms = int((now - self.options.dead_letter_retention_days * 86_400) * 1000)
            minid: Any = f"{max(0, cutoff_ms)}-0"  # MINID takes a stream id; coredis types it as int
            return int(await self.redis.xtrim(self.keys.dead_letters, coredis.PureToken.MINID, minid))

        done["audit_rows"] = await self._isolated("audit retention", audit, 0)
        done["dead_letters"] = await self._isolated("dead-letter retention", dead_letters, 0)
        for stream in (self.keys.usage_stream, self.keys.audit_stream):
            done["consumers"] += await self._isolated(
                "consumer retention", functools.partial(self._idle_consumers, stream), 0
            )
        if any(done.values()):
            log.info("retention enforced", extra=done)
        return done

    async def _idle_consumers(self, stream: str) -> int:
        idle_ms = int(self.options.consumer_idle_max * 1000)
        removed = 0
        for consumer in await self.redis.xinfo_consumers(stream, GROUP):
            name, pending, idle = (consumer.get(f) for f in (b"name", b"pending", b"idle"))
            if name is None or name in (self.consumer, self.consumer.encode()):
                continue
            # pending is 0 only once `claim` took over what a dead consumer left behind.
            if pending == 0 and isinstance(idle, int) and idle > idle_ms:
                await self.redis.xgroup_delconsumer(stream, GROUP, name)
                removed += 1
        return removed

    # --- failure isolation -------------------------------------------------------------------------

    async def _isolated(self, step: str, work: Callable[[], Awaitable[T]], fallback: T) -> T:
        """Run one step or item; on any failure but an unavailable store, log it once (its type and
        place, never its message, which may quote input) and answer `fallback`, so the next item and
        the next step go on. A store that is down is raised: the loop pauses and retries."""
        try:
            result = await work()
        except asyncio.CancelledError:
            raise
        except UNAVAILABLE:
            raise
        except Exception as exc:
            self.failures += 1
            failure = (step, type(exc).__name__)
            if failure not in self._failing:  # once, not on every retry of a lasting fault
                self._failing.add(failure)
                log.exception("accountant step failed; going on", extra={"step": step})
            return fallback
        self._failing = {f for f in self._failing if f[0] != step}
        return result

    # --- the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: read, claim, sweep, trim, purge, retention; survive Redis and Postgres outages
        and any single failing step (each step is isolated: one failing never skips the others)."""
        last_maintenance = last_purge = last_retention = -math.inf
        groups_ready = False
        while True:
            try:
                if not groups_ready:
                    await self.ensure_groups()
                    groups_ready = True
                failures = self.failures
                await self._isolated("read", self.read_batch, 0)
                if self.failures > failures:
                    # The read itself failed (NOGROUP after a FLUSHDB, say): recreate the groups,
                    # and do not spin on a read that fails at once.
                    groups_ready = False
                    await asyncio.sleep(1.0)
                now = time.monotonic()
                if now - last_maintenance >= 2.0:
                    last_maintenance = now
                    await self._isolated("denials", self.read_denials, 0)
                    await self._isolated("claim", self.claim, 0)
                    await self._isolated("sweep", self.sweep, 0)
                    await self._isolated("trim", self.trim, 0)
                if now - last_purge >= self.options.prompt_purge_interval:
                    last_purge = now
                    await self._isolated("purge", self.purge, 0)
                if now - last_retention >= self.options.retention_interval:
                    last_retention = now
                    await self._isolated("retention", self.retention, dict[str, int]())
            except asyncio.CancelledError:
                raise
            except STORE_AND_DB_ERRORS:
                log.warning("accountant paused: a store is unavailable", exc_info=True)
                groups_ready = False
                await asyncio.sleep(1.0)
            except Exception:
                # Never die silently: log where it failed and keep the stream moving.
                log.exception("accountant iteration failed")
                await asyncio.sleep(1.0)


async def _metrics_listener(registry: CollectorRegistry, options: AccountantOptions) -> web.AppRunner | None:
    """/metrics and /healthz of a standalone accountant (port 0 turns it off)."""
    if not options.metrics_port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, options.metrics_host, options.metrics_port).start()
    except OSError:
        # Accounting matters more than its metrics: carry on without the listener.
        log.warning("accountant metrics listener not started", extra={"port": options.metrics_port})
        await runner.cleanup()
        return None
    return runner


async def _standalone(config: AccountantConfig) -> None:
    pool = await create_pool(config.postgres)
    try:
        async with store.connect(
            config.redis.url, connect_timeout=config.redis.connect_timeout, reply_timeout=config.redis.timeout
        ) as client:
            registry = CollectorRegistry()
            accountant = Accountant(
                redis=client,
                pool=pool,
                keys=RedisKeys(config.redis.prefix),
                options=config.accountant,
                metrics=AccountantMetrics(registry),
            )
            runner = await _metrics_listener(registry, config.accountant)
            task = asyncio.create_task(accountant.run())
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for pending in (task, stopper):
                pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if runner is not None:
                await runner.cleanup()
    finally:
        await pool.close()


def main() -> int:
    """`python -m authz_sidecar.accountant`: run one accountant until SIGTERM."""
    try:
        config = load_config(AccountantConfig, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"accountant: {exc}\n")
        return 2
    logs.setup(config.logging.level)
    uvloop.run(_standalone(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
