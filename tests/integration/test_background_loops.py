"""Background loops against real Postgres and Valkey: no single bad item or failing step stops one
(the denial auditor, the accountant's reads, its sweeper and its run loop, the invalidation
listener), and the audit log, the dead-letter stream and the consumer groups have a retention and
cannot be flooded (docs/RELIABILITY.md#hostile-input)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from typing import Any, cast

import asyncpg
import coredis
import orjson
import pytest
from coredis.response.types import StreamPending

from authz_sidecar.accountant import GROUP, Accountant
from authz_sidecar.audit import Denial, DenialAuditor
from authz_sidecar.invalidations import InvalidationListener
from authz_sidecar.keys import KeyCache
from shared import invalidation, usage_wire
from shared.config import PostgresConfig
from shared.db import create_pool
from shared.limits import LimitScripts, Reserved
from shared.redis_keys import RedisKeys
from tests.integration.test_accountant import (
    accountant_on,
    fields_of,
    hydrate,
    ledger_rows,
    new_keys,
    period_names,
    scope_for,
    until,
    usage_event,
)

pytestmark = pytest.mark.integration

# What aiohttp makes of a header or request-target byte 0xFF (and 0xFE) that Caddy passed through.
ESCAPED = b"/api/chat\xff\xfe".decode("utf-8", "surrogateescape")


def denial(at: float, *, reason: str = "policy_404", status: int = 404, **changes: Any) -> Denial:
    """An unauthenticated denial from one address."""
    fields: dict[str, Any] = {
        "at": at,
        "request_id": uuid.uuid4().hex,
        "status": status,
        "reason": reason,
        "method": "GET",
        "path": "/nope",
        "client_addr": "203.0.113.9",
        "user_agent": "flood",
    } | changes
    return Denial(**fields)


# --- item 4: poisoned items never stop a loop -------------------------------------------------------


async def test_the_denial_auditor_survives_unencodable_strings_and_ships_the_next_denial(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A denial whose path and user agent hold lone surrogates (bytes 0xFF/0xFE as aiohttp decodes
    them) and NUL is shipped with those characters escaped (`\\xff`) and becomes an audit row; a
    row that cannot be encoded at all is dropped and counted; the running auditor task stays alive
    and ships the next, ordinary denial, which the accountant writes too."""
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        auditor = DenialAuditor(accountant.redis, accountant.keys.audit_stream, interval=0.05)
        task = asyncio.create_task(auditor.run())
        try:
            now = time.time()
            auditor.record(denial(now, path=ESCAPED, user_agent="\udcff\x00agent", client_addr="\udcfe"))
            await until(lambda: asyncio.sleep(0, auditor.shipped == 1), 5, "the poisoned denial shipped")
            # Beyond what the handler can produce: a value no encoder takes. Dropped, not fatal.
            auditor._rows.append({"at": now, "status": 404, "reason": "x", "path": object()})
            await until(lambda: asyncio.sleep(0, auditor.dropped == 1), 5, "the unencodable row dropped")
            auditor.record(denial(now, reason="policy_405", status=405, path="/api/chat"))
            await until(lambda: asyncio.sleep(0, auditor.shipped == 2), 5, "the next denial shipped")
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await accountant.read_denials() == 2
    rows = {r["reason"]: r for r in await db.fetch("SELECT * FROM audit_log")}
    assert set(rows) == {"policy_404", "policy_405"}
    assert rows["policy_404"]["path"] == "/api/chat\\xff\\xfe"
    assert rows["policy_404"]["user_agent"] == "\\xff\\x00agent"
    assert rows["policy_404"]["client_addr"] == "\\xfe"


async def test_poisoned_denial_batches_are_skipped_and_the_next_rows_are_written(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """On the audit stream, as a buggy or older sidecar might write them: a row holding NUL (which
    Postgres text refuses), a row without a status, a batch that is not a list, then good rows.
    The good rows and the NUL row (escaped) are written, the bad ones dropped, everything is
    acknowledged, and the next batch is read as usual."""
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        redis, stream = accountant.redis, accountant.keys.audit_stream
        at = time.time()
        nul = {"at": at, "request_id": "nul", "status": 404, "reason": "policy_404", "path": "/a\x00b"}
        no_status = {"at": at, "request_id": "no-status", "reason": "policy_404"}
        good = {"at": at, "request_id": "good", "status": 405, "reason": "policy_405", "path": "/x"}
        await redis.xadd(stream, {b"kind": b"denials", b"rows": orjson.dumps([nul, no_status, good])})
        await redis.xadd(stream, {b"kind": b"denials", b"rows": b'{"not": "a list"}'})
        assert await accountant.read_denials() == 2
        pending = cast(StreamPending, await redis.xpending(stream, GROUP))
        assert pending.pending == 0
        later = good | {"request_id": "later"}
        await redis.xadd(stream, {b"kind": b"denials", b"rows": orjson.dumps([later])})
        assert await accountant.read_denials() == 1
    rows = {r["request_id"]: r["path"] for r in await db.fetch("SELECT * FROM audit_log")}
    assert rows == {"nul": "/a\\x00b", "good": "/x", "later": "/x"}


async def test_a_usage_event_with_unreadable_periods_is_dead_lettered_and_the_batch_goes_on(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A usage event that decodes but whose budget periods are not dates (it would fail the
    ledger's and the settle's arithmetic for every batch it is in) goes to the dead-letter
    stream; the events before and after it in the same batch are applied and acknowledged, and
    the next batch is applied too."""
    (key,) = await new_keys(db, {"acme": 1})
    now = time.time()
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        redis, names = accountant.redis, accountant.keys
        for event in (
            usage_event(key, "before", now),
            usage_event(key, "bad-periods", now, periods={"day": "yesterday", "month": "never"}),
            usage_event(key, "after", now),
        ):
            await redis.xadd(names.usage_stream, usage_wire.encode(event))
        assert await accountant.read_batch(block_ms=100) == 2
        (dead,) = [fields_of(e) for e in await redis.xrange(names.dead_letters)]
        assert dead[b"reason"].startswith(b"undecodable: ")
        pending = cast(StreamPending, await redis.xpending(names.usage_stream, GROUP))
        assert pending.pending == 0
        await redis.xadd(names.usage_stream, usage_wire.encode(usage_event(key, "next", now)))
        assert await accountant.read_batch(block_ms=100) == 1
    assert sorted(r["request_id"] for r in await ledger_rows(db)) == ["after", "before", "next"]


async def test_a_tenant_whose_reservation_index_is_broken_never_stops_the_sweep(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A reserving tenant whose reservation index is not a sorted set (WRONGTYPE for every read)
    is listed before a tenant with a dead reservation: the sweep still charges the dead
    reservation, and so does the next sweep for new ones (the broken tenant is skipped, logged)."""
    (key,) = await new_keys(db, {"acme": 1})
    names = RedisKeys(redis_prefix)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        scripts = LimitScripts(client, names)
        redis_now = int((await client.time()).timestamp() * 1000)
        scope = scope_for(key, period_names(redis_now / 1000))
        await hydrate(client, scripts, scope)

        async def dead_reservation(request_id: str) -> None:
            reserved = await scripts.reserve(
                scope,
                request_id,
                metered=True,
                prompt_bound=300,
                requested_completion=200,
                default_completion=None,
                lease_ttl_ms=1_000,
                now_ms=redis_now - 21_000,
            )
            assert reserved == Reserved(completion_limit=200, reserved=500)

        await dead_reservation("dead-1")
        broken = key.tenant.id + 1000
        await client.set(names.reservation_index(broken), b"not a sorted set")
        await scripts.register_tenant(broken)
        await scripts.register_tenant(key.tenant.id)
        async with accountant_on(
            database_url, redis_url, redis_prefix, groups=False, sweep_grace=5.0
        ) as accountant:
            assert await accountant.sweep() == 1
            await dead_reservation("dead-2")
            assert await accountant.sweep() == 1
            assert accountant.failures == 2
    assert {r["request_id"] for r in await ledger_rows(db)} == {"dead-1", "dead-2"}


class FlakyAccountant(Accountant):
    """An accountant whose denial step raises once, recording the order its steps ran in."""

    calls: list[str]
    denials_before_first_sweep: int | None = None

    async def read_denials(self) -> int:
        self.calls.append("read_denials")
        if self.calls.count("read_denials") == 1:
            raise RuntimeError("a step that fails once")
        return await super().read_denials()

    async def sweep(self) -> int:
        if self.denials_before_first_sweep is None:
            self.denials_before_first_sweep = self.calls.count("read_denials")
        self.calls.append("sweep")
        return await super().sweep()

    async def purge(self) -> int:
        self.calls.append("purge")
        return await super().purge()


async def test_a_step_that_fails_once_skips_nothing_else_and_the_loop_goes_on(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The running accountant loop whose denial step raises once (an unexpected error, no store
    outage): the sweep and the purge of that same round still run, the loop stays alive, and a
    usage event and a denial batch sent afterwards are applied."""
    (key,) = await new_keys(db, {"acme": 1})
    async with accountant_on(database_url, redis_url, redis_prefix) as plain:
        accountant = FlakyAccountant(
            redis=plain.redis, pool=plain.pool, keys=plain.keys, options=plain.options, metrics=plain.metrics
        )
        accountant.calls = []
        task = asyncio.create_task(accountant.run())
        try:
            await until(lambda: asyncio.sleep(0, "purge" in accountant.calls), 5, "the first round")
            assert accountant.denials_before_first_sweep == 1  # the same round as the failure
            names = accountant.keys
            event = usage_wire.encode(usage_event(key, "after", time.time()))
            await accountant.redis.xadd(names.usage_stream, event)
            row = {"at": time.time(), "request_id": "d", "status": 404, "reason": "policy_404"}
            await accountant.redis.xadd(
                names.audit_stream, {b"kind": b"denials", b"rows": orjson.dumps([row])}
            )

            async def applied() -> bool:
                ledger = await db.fetchval("SELECT count(*) FROM usage_ledger")
                audit = await db.fetchval("SELECT count(*) FROM audit_log WHERE request_id = 'd'")
                return bool(ledger == 1 and audit == 1)

            await until(applied, 10, "the event and the denial after the failure")
            assert not task.done()
            assert accountant.failures == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_malformed_invalidation_notices_never_stop_the_listener(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Notices that are not JSON, hold bytes above 0x7F, name no tenant or carry wrong types are
    ignored; the subscription stays alive and applies the next, valid notice."""
    pool = await create_pool(PostgresConfig(url=database_url, pool_min=1, pool_max=2))
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    try:
        async with client:
            channel = RedisKeys(redis_prefix).invalidations
            listener = InvalidationListener(redis=client, pool=pool, cache=KeyCache(ttl=60), channel=channel)
            task = asyncio.create_task(listener.run_subscription())
            try:
                await until(lambda: asyncio.sleep(0, listener.subscribed), 5, "subscribed")
                publisher: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
                async with publisher:
                    for bad in (
                        b"{not json",
                        b"\xff\xfe",
                        b'{"kind": "key"}',
                        b'{"kind": 1, "tenant_id": "x"}',
                    ):
                        await publisher.publish(channel, bad)
                    await publisher.publish(
                        channel, invalidation.encode(invalidation.Invalidation("tenant", 7))
                    )
                    await until(
                        lambda: asyncio.sleep(0, listener.applied >= 1), 5, "the valid notice applied"
                    )
                assert listener.subscribed
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await pool.close()


# --- item 5: an audit that cannot be flooded and does not grow forever --------------------------


async def test_a_flood_of_denials_from_one_address_in_one_minute_is_one_row_with_its_count(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """900 unauthenticated denials from one address in one minute, of one class each (404, 405,
    400, 403, 415, malformed key), recorded by two sidecars and shipped in several flushes, become
    one audit row per class with count 150 each; another address and the next minute are rows of
    their own; a denial of an authenticated request (a tenant known) stays an individual row."""
    minute = (time.time() // 60 - 1) * 60
    classes = [
        ("policy_404", 404),
        ("policy_405", 405),
        ("policy_400", 400),
        ("policy_403", 403),
        ("encoding", 415),
        ("key_malformed", 401),
    ]
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        sidecars = [DenialAuditor(accountant.redis, accountant.keys.audit_stream) for _ in range(2)]
        for n in range(150):
            for reason, status in classes:
                auditor = sidecars[n % 2]
                auditor.record(denial(minute + n * 0.3, reason=reason, status=status, path=f"/p{n}"))
            if n % 40 == 39:
                for auditor in sidecars:
                    await auditor.flush()
        sidecars[0].record(denial(minute + 1, client_addr="203.0.113.10"))
        sidecars[0].record(denial(minute + 61))
        sidecars[0].record(denial(minute + 2, reason="model_not_allowed", status=403, tenant_id=1))
        for auditor in sidecars:
            await auditor.flush()
        while await accountant.read_denials():
            pass
    rows = await db.fetch("SELECT client_addr, reason, status, count, at, request_id FROM audit_log")
    flood = {
        r["reason"]: r["count"]
        for r in rows
        if r["client_addr"] == "203.0.113.9" and r["at"].timestamp() < minute + 60
    }
    assert flood == {reason: 150 for reason, _ in classes} | {"model_not_allowed": 1}
    assert len(rows) == len(classes) + 3
    assert all(r["request_id"] is None for r in rows if r["reason"] != "model_not_allowed")
    assert sum(r["count"] for r in rows) == 150 * len(classes) + 3


async def test_audit_rows_older_than_the_retention_are_deleted_and_newer_kept(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """With GATEWAY_AUDIT_RETENTION_DAYS=30: rows 31 and 400 days old are deleted by the
    accountant's retention step, rows 29 days old and new are kept."""
    now = time.time()
    for age_days, name in ((400, "ancient"), (31, "old"), (29, "recent"), (0, "new")):
        at = dt.datetime.fromtimestamp(now - age_days * 86_400, dt.UTC)
        await db.execute(
            "INSERT INTO audit_log (at, request_id, status, reason) VALUES ($1, $2, 404, 'policy_404')",
            at,
            name,
        )
    async with accountant_on(
        database_url, redis_url, redis_prefix, clock=lambda: now, audit_retention_days=30
    ) as accountant:
        done = await accountant.retention()
    assert done["audit_rows"] == 2
    assert {r["request_id"] for r in await db.fetch("SELECT request_id FROM audit_log")} == {"recent", "new"}


async def test_dead_letters_older_than_the_retention_are_trimmed(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """With GATEWAY_DEAD_LETTER_RETENTION_DAYS=14: dead letters 20 and 15 days old are trimmed,
    those 13 days old and new are kept."""
    now = time.time()
    async with accountant_on(
        database_url, redis_url, redis_prefix, clock=lambda: now, dead_letter_retention_days=14
    ) as accountant:
        redis, stream = accountant.redis, accountant.keys.dead_letters
        for age_days in (20, 15, 13):
            at_ms = int((now - age_days * 86_400) * 1000)
            await redis.xadd(stream, {b"age": str(age_days).encode()}, identifier=f"{at_ms}-0")
        await redis.xadd(stream, {b"age": b"0"})
        done = await accountant.retention()
        kept = [fields_of(e)[b"age"] for e in await redis.xrange(stream)]
    assert done["dead_letters"] == 2
    assert kept == [b"13", b"0"]


async def test_an_idle_dead_consumer_is_removed_while_a_live_one_stays(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """With GATEWAY_ACCOUNTANT_CONSUMER_IDLE_MAX=1: a consumer idle for longer with nothing pending
    leaves the usage stream's group; a live consumer (read just now), one idle as long but still
    holding a pending entry (it is claimed first) and the accountant itself stay."""
    async with accountant_on(database_url, redis_url, redis_prefix, consumer_idle_max=1.0) as accountant:
        redis, stream = accountant.redis, accountant.keys.usage_stream
        await redis.xgroup_createconsumer(stream, GROUP, "dead")
        await redis.xadd(stream, {b"event": b"{}"})
        await redis.xreadgroup(GROUP, "dead-with-pending", streams={stream: ">"}, count=1)
        await redis.xreadgroup(GROUP, accountant.consumer, streams={stream: ">"}, count=1)
        await asyncio.sleep(1.3)
        await redis.xreadgroup(GROUP, "live", streams={stream: ">"}, count=1, block=None)
        done = await accountant.retention()
        consumers = {c[b"name"] for c in await redis.xinfo_consumers(stream, GROUP)}
    assert done["consumers"] == 1
    assert consumers == {b"dead-with-pending", b"live", accountant.consumer.encode()}


async def test_a_flood_from_one_ipv6_64_is_one_row_whatever_its_source_addresses(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """200 unauthenticated denials in one minute, each from another address of one IPv6 /64: one
    audit row for the /64 with count 200 (a row per address would let a host with a /64 flood the
    audit log and crowd other addresses out of the auditor's buffer); another /64 is its own row."""
    minute = (time.time() // 60 - 1) * 60
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        auditor = DenialAuditor(accountant.redis, accountant.keys.audit_stream)
        for n in range(200):
            auditor.record(denial(minute + n * 0.1, client_addr=f"2001:db8:1:2:{n:x}:0:0:{n + 1:x}"))
        auditor.record(denial(minute + 1, client_addr="2001:db8:1:3::1"))
        await auditor.flush()
        while await accountant.read_denials():
            pass
    rows = {r["client_addr"]: r["count"] for r in await db.fetch("SELECT client_addr, count FROM audit_log")}
    assert rows == {"2001:db8:1:2::/64": 200, "2001:db8:1:3::/64": 1}


async def test_denial_batches_left_pending_are_read_again(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A denial batch a consumer read and never acknowledged (Postgres was down, or the consumer
    died) is taken over once idle for claim_idle and written; the stream then has nothing pending,
    so it can be trimmed."""
    async with accountant_on(database_url, redis_url, redis_prefix, claim_idle=0.2) as accountant:
        redis, stream = accountant.redis, accountant.keys.audit_stream
        row = {"at": time.time(), "request_id": "left", "status": 404, "reason": "policy_404", "path": "/a"}
        await redis.xadd(stream, {b"kind": b"denials", b"rows": orjson.dumps([row])})
        taken = await redis.xreadgroup(GROUP, "died", streams={stream: ">"}, count=10, block=None)
        assert taken
        await asyncio.sleep(0.3)
        assert await accountant.read_denials() == 1
        pending = cast("StreamPending", await redis.xpending(stream, GROUP))
        assert pending.pending == 0
    assert [r["request_id"] for r in await db.fetch("SELECT request_id FROM audit_log")] == ["left"]


async def test_events_arriving_one_by_one_are_applied_in_few_batches_after_a_short_one(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The accountant's linger: after a batch smaller than GATEWAY_ACCOUNTANT_BATCH the run loop
    waits before reading again, so 20 events written one every 10 ms during that wait land in the
    ledger in at most three transactions in all, not twenty-one; every one of them is applied."""
    (key,) = await new_keys(db, {"acme": 1})
    now = time.time()
    async with accountant_on(database_url, redis_url, redis_prefix, linger=0.5) as accountant:
        task = asyncio.create_task(accountant.run())
        try:
            redis, names = accountant.redis, accountant.keys
            await redis.xadd(names.usage_stream, usage_wire.encode(usage_event(key, "first", now)))

            async def ledgered(count: int) -> bool:
                return len(await ledger_rows(db)) == count

            await until(lambda: ledgered(1), 10, "the first event in the ledger")
            for n in range(20):
                await redis.xadd(names.usage_stream, usage_wire.encode(usage_event(key, f"then-{n}", now)))
                await asyncio.sleep(0.01)
            await until(lambda: ledgered(21), 10, "every event in the ledger")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        (histogram,) = accountant.metrics.batch_size.collect()
        batches = next(s.value for s in histogram.samples if s.name.endswith("_count"))
    assert 1 <= batches <= 3  # one per event (21) without the linger
