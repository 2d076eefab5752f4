"""The usage accountant against real Postgres and Valkey: every event applied exactly once in effect
across a SIGKILLed consumer and duplicate deliveries, dead letters, the expired-lease sweeper, prompt
logs and their purge, denial batches into the audit log, and the admin commands that read and
repair what the accountant writes (`audit`, `purge-prompts`, `rebuild-counters`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import attrs
import coredis
import orjson
import pytest
from coredis.response.types import StreamEntry, StreamPending
from prometheus_client import CollectorRegistry

import localstack
from authz_sidecar import ledger
from authz_sidecar.accountant import GROUP, Accountant, AccountantMetrics
from authz_sidecar.audit import Denial, DenialAuditor
from shared import admin, counters, usage_wire
from shared.config import AccountantOptions, PostgresConfig
from shared.db import create_pool
from shared.hashing import Argon2Params
from shared.limits import (
    TENANT_KEEP_MS,
    Admitted,
    CountersBusy,
    LimitScripts,
    NeedsHydration,
    Reserved,
    Scope,
)
from shared.models import Limits, ModelLimit, ModelRule, UsageEvent, model_rules
from shared.periods import PERIODS, Periods, periods_at
from shared.redis_keys import RedisKeys

pytestmark = pytest.mark.integration

PEPPER = "accountant-test-pepper-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=1024, time_cost=1, parallelism=1)
UTC = ZoneInfo("UTC")
CLI = [str(Path(sys.executable).parent / "neuronetz-gateway")]
POLL_SECONDS = 0.02
WAIT_SECONDS = 10.0
# Budgets large enough never to clamp a reservation, so every budget counter is charged by reserve.
ROOMY = Limits(daily_tokens=10**12, monthly_tokens=10**12, total_tokens=10**12)
LEASE_MS = 600_000


# --- helpers -------------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Poll until `check()` holds; fail after `seconds`. Returns how long it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


def period_names(at: float) -> dict[str, str]:
    """The budget period names (as the grant carries them) of a unix time, in UTC."""
    return {str(p): name for p, name in periods_at(at, UTC).names().items()}


def periods_of(names: Mapping[str, str]) -> Periods:
    """Periods back from their names."""
    return Periods(day=dt.date.fromisoformat(names["day"]), month=dt.date.fromisoformat(names["month"]))


def usage_event(key: admin.CreatedKey, request_id: str, finished_at: float, **changes: Any) -> UsageEvent:
    """A plausible exact usage event of `key` finished at `finished_at` (its periods included)."""
    event = UsageEvent(
        request_id=request_id,
        tenant_id=key.tenant.id,
        key_id=key.key.id,
        key_prefix=key.key.prefix,
        endpoint="/api/chat",
        model="llama3.2",
        prompt_tokens=10,
        completion_tokens=5,
        reserved_tokens=0,
        estimated=False,
        estimate_reason=None,
        http_status=200,
        upstream_status=200,
        started_at=finished_at - 0.5,
        first_byte_at=finished_at - 0.4,
        finished_at=finished_at,
        bytes_relayed=1234,
        client_disconnected=False,
        client_addr="198.51.100.7",
        periods=period_names(finished_at),
    )
    return attrs.evolve(event, **changes)


def scope_for(key: admin.CreatedKey, names: Mapping[str, str], limits: Limits = ROOMY) -> Scope:
    """The limit scope of a key for the given periods (key and tenant both under `limits`)."""
    return Scope(
        tenant_id=key.tenant.id,
        key_id=key.key.id,
        key_limits=limits,
        tenant_limits=limits,
        periods=periods_of(names),
    )


async def hydrate(redis: coredis.Redis[bytes], scripts: LimitScripts, scope: Scope) -> None:
    """What the sidecar's hydration does for an empty ledger: every budget counter set to 0."""
    for who in ("key", "tenant"):
        for period in PERIODS:
            await redis.set(scripts.budget_key(scope, who, period), b"0", condition=coredis.PureToken.NX)


async def counter(redis: coredis.Redis[bytes], key: str) -> int | None:
    """A counter's value (None: missing)."""
    raw = await redis.get(key)
    return None if raw is None else int(raw)


def fields_of(entry: StreamEntry) -> dict[bytes, bytes]:
    """A stream entry's fields (the clients here decode nothing: bytes)."""
    return {cast(bytes, k): cast(bytes, v) for k, v in entry.field_values.items()}


def stream_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry id, comparable."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, seq = text.split("-")
    return int(ms), int(seq)


async def new_keys(db: asyncpg.Connection, layout: Mapping[str, int]) -> list[admin.CreatedKey]:
    """Tenants with the given number of keys each (cheap Argon2)."""
    created = []
    for tenant, count in layout.items():
        await admin.create_tenant(db, name=tenant)
        for n in range(count):
            created.append(
                await admin.create_key(db, tenant=tenant, name=f"k{n}", pepper=PEPPER, params=CHEAP)
            )
    return created


@contextlib.asynccontextmanager
async def accountant_on(
    database_url: str,
    redis_url: str,
    prefix: str,
    *,
    clock: Callable[[], float] = time.time,
    consumer: str = "test-consumer",
    groups: bool = True,
    **options: Any,
) -> AsyncIterator[Accountant]:
    """An in-process Accountant whose Redis client lives in the calling task; with `groups`, it has
    created its consumer groups (sweeping and purging need none)."""
    pool = await create_pool(PostgresConfig(url=database_url, pool_min=1, pool_max=4))
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    try:
        async with client:
            accountant = Accountant(
                redis=client,
                pool=pool,
                keys=RedisKeys(prefix),
                options=AccountantOptions(consumer=consumer, **options),
                metrics=AccountantMetrics(CollectorRegistry()),
                clock=clock,
            )
            if groups:
                await accountant.ensure_groups()
            yield accountant
    finally:
        await pool.close()


async def xadd_all(redis: coredis.Redis[bytes], stream: str, entries: Iterable[Mapping[bytes, bytes]]) -> int:
    """XADD many entries in pipelined chunks; returns how many."""
    total = 0
    chunk: list[Mapping[bytes, bytes]] = []

    async def flush() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for fields in chunk:
                pipe.xadd(stream, fields)
        chunk.clear()

    for fields in entries:
        chunk.append(fields)
        total += 1
        if len(chunk) >= 1000:
            await flush()
    if chunk:
        await flush()
    return total


def cli_env(database_url: str, redis_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    """The admin CLI's environment: this test's database and Redis, no local stack file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {
        **base,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_KEY_PEPPER": PEPPER,
        "GATEWAY_STACK_FILE": str(tmp_path / "no-stack.json"),
        "COLUMNS": "250",
    }


@attrs.frozen
class Done:
    """A finished CLI run."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout as JSON (the run must have succeeded)."""
        assert self.code == 0, self.err
        return orjson.loads(self.out)


async def cli(env: Mapping[str, str], *args: str) -> Done:
    """Run `neuronetz-gateway` to completion."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def ledger_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every ledger row."""
    return await db.fetch("SELECT * FROM usage_ledger ORDER BY request_id")


def ledger_budget_sums(rows: Sequence[asyncpg.Record]) -> dict[tuple[str, int, str, dt.date], int]:
    """What budget_periods must hold: ledger tokens per scope, id, period and period start (UTC)."""
    sums: dict[tuple[str, int, str, dt.date], int] = defaultdict(int)
    for row in rows:
        periods = periods_at(row["finished_at"].timestamp(), UTC)
        for scope, ident in (("tenant", row["tenant_id"]), ("key", row["key_id"])):
            for period in PERIODS:
                sums[(scope, ident, period, periods.start(period))] += int(row["total_tokens"])
    return {k: v for k, v in sums.items() if v > 0}


async def budget_periods(db: asyncpg.Connection) -> dict[tuple[str, int, str, dt.date], int]:
    """budget_periods as a mapping."""
    rows = await db.fetch("SELECT scope, scope_id, period, period_start, tokens FROM budget_periods")
    return {(r["scope"], r["scope_id"], r["period"], r["period_start"]): int(r["tokens"]) for r in rows}


# --- exactly once across a killed consumer -----------------------------------------------------

EVENTS = 10_000
KILL_AT_LEDGER_ROWS = 2_000
RESERVED_EVENTS = 1_000
LOAD_SECONDS = 20.0
JOIN_SECONDS = 10.0


@attrs.define
class AccountantProcess:
    """One `python -m authz_sidecar.accountant` child."""

    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        """The end of its log, for failure messages."""
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_accountant(env: Mapping[str, str], consumer: str, log: Path) -> AccountantProcess:
    """Spawn a standalone accountant with its own consumer name."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz_sidecar.accountant"],
            env={**env, "GATEWAY_ACCOUNTANT_CONSUMER": consumer},
            cwd=localstack.ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return AccountantProcess(proc, log)


def load_events(keys: Sequence[admin.CreatedKey], now: float, rng: random.Random) -> list[UsageEvent]:
    """10,000 events over all keys: mostly in the current periods, 5% forty days old, some estimated,
    some refused (no tokens)."""
    events = []
    for i in range(EVENTS):
        key = keys[i % len(keys)]
        old = i % 20 == 7
        finished = now - (40 * 86400 + rng.uniform(0, 86400) if old else rng.uniform(1, 300))
        finished = round(finished, 3)
        changes: dict[str, Any] = {
            "prompt_tokens": rng.randint(1, 400),
            "completion_tokens": rng.randint(0, 300),
            "endpoint": rng.choice(["/api/chat", "/api/generate", "/v1/chat/completions", "/api/embed"]),
        }
        if i % 50 == 3:
            changes |= {
                "estimated": True,
                "estimate_reason": "client_disconnected",
                "client_disconnected": True,
            }
        if i % 97 == 5:
            changes |= {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "http_status": 429,
                "upstream_status": None,
            }
        events.append(usage_event(key, f"load-{i:05d}", finished, **changes))
    return events


async def reserve_for(scripts: LimitScripts, key: admin.CreatedKey, event: UsageEvent) -> UsageEvent:
    """A real reservation (larger than the actual usage) for the event's request; returns the event
    carrying the reserved amount."""
    assert event.periods is not None
    outcome = await scripts.reserve(
        scope_for(key, event.periods),
        event.request_id,
        metered=True,
        prompt_bound=event.prompt_tokens + 40,
        requested_completion=event.completion_tokens + 25,
        default_completion=None,
        lease_ttl_ms=LEASE_MS,
    )
    assert isinstance(outcome, Reserved), outcome
    assert outcome.reserved == event.total_tokens + 65
    return attrs.evolve(event, reserved_tokens=outcome.reserved)


@attrs.define
class TrimWatch:
    """Samples the stream atomically: its first entry never lies above the oldest pending one."""

    redis: coredis.Redis[bytes]
    stream: str
    samples: int = 0
    violations: list[str] = attrs.field(factory=list)

    async def sample(self) -> None:
        """One MULTI/EXEC snapshot of the first entry and the pending summary (none before the
        accountant has created its group)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                first_request = pipe.xrange(self.stream, count=1)
                pending_request = pipe.xpending(self.stream, GROUP)
        except coredis.exceptions.StreamConsumerGroupError:
            return
        first = await first_request
        pending = cast(StreamPending, await pending_request)
        self.samples += 1
        if pending.pending and pending.minimum_identifier is not None:
            oldest = stream_id(pending.minimum_identifier)
            if not first or stream_id(first[0].identifier) > oldest:
                shown = first[0].identifier if first else None
                self.violations.append(f"first entry {shown!r} above oldest pending {oldest}")


async def test_ten_thousand_events_delivered_twice_are_applied_once_across_a_killed_accountant(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """10,000 events (1,000 of them with a real reservation first), each XADDed twice (some copies
    adjacent, so within one batch), are applied by a standalone accountant process that is SIGKILLed
    while it holds a batch pending, and by a second process that claims that batch. In the end no
    entry is pending, every request id is in the ledger exactly once, the Redis budget counters of
    the current periods equal the ledger sums (reservations replaced by actual usage), the stream was
    trimmed but its first entry never lay above the oldest pending one, and budget_periods equals
    the ledger sums per scope, id and period."""
    rng = random.Random(20261127)  # noqa: S311 - reproducible test data, not secrets
    keys = await new_keys(db, {"alpha": 3, "beta": 2, "gamma": 1})
    by_key = {k.key.id: k for k in keys}
    names = RedisKeys(redis_prefix)
    now = time.time()
    events = load_events(keys, now, rng)

    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        scripts = LimitScripts(client, names)
        current = [e for e in events if e.finished_at > now - 3600]
        live_scopes = {(e.key_id, tuple(sorted((e.periods or {}).items()))) for e in current}
        for key_id, items in live_scopes:
            await hydrate(client, scripts, scope_for(by_key[key_id], dict(items)))
        reserved_ids = {e.request_id for e in rng.sample(current, RESERVED_EVENTS)}
        for index, event in enumerate(events):
            if event.request_id in reserved_ids:
                events[index] = await reserve_for(scripts, by_key[event.key_id], event)

        # Each event twice: the first 300 as two copies right next to each other (one batch), the
        # rest as two copies shuffled apart.
        twins = {e.request_id for e in events[:300]}
        singles = [*events[300:], *events[300:], *events[:300]]
        rng.shuffle(singles)
        ordered: list[UsageEvent] = []
        for event in singles:
            ordered.extend([event, event] if event.request_id in twins else [event])
        assert len(ordered) == 2 * EVENTS
        by_id = {e.request_id: e for e in events}
        await xadd_all(client, names.usage_stream, (usage_wire.encode(e) for e in ordered))
        assert await client.xlen(names.usage_stream) == 2 * EVENTS

        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": redis_prefix,
            "GATEWAY_ACCOUNTANT_BATCH": "200",
            "GATEWAY_ACCOUNTANT_CLAIM_IDLE": "1",
            "GATEWAY_DATABASE_POOL_MAX": "3",
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        watch = TrimWatch(client, names.usage_stream)
        processes: list[AccountantProcess] = []

        async def ledger_count() -> int:
            return int(await db.fetchval("SELECT count(*) FROM usage_ledger"))

        try:
            started = time.monotonic()
            first = start_accountant(env, "acct-1", tmp_path / "acct-1.log")
            processes.append(first)

            async def past_kill_point() -> bool:
                assert first.proc.poll() is None, first.tail()
                await watch.sample()
                return await ledger_count() > KILL_AT_LEDGER_ROWS

            await until(past_kill_point, LOAD_SECONDS, "first accountant applied 2,000 events")
            held: list[Any] = []
            for _ in range(200):  # stop it while it holds a batch (read, not yet acknowledged)
                first.proc.send_signal(signal.SIGSTOP)
                held = list(
                    await client.xpending(
                        names.usage_stream, GROUP, start="-", end="+", count=10_000, consumer="acct-1"
                    )
                )
                if held:
                    break
                first.proc.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.005)
            first.proc.kill()
            first.proc.wait()
            assert held, "the first accountant never held a pending batch"
            rows_at_kill = await ledger_count()
            assert rows_at_kill < EVENTS
            # Every entry the dead consumer holds is still in the stream, so it can be claimed.
            for entry in held:
                assert await client.xrange(names.usage_stream, entry.identifier, entry.identifier)
            await watch.sample()

            second = start_accountant(env, "acct-2", tmp_path / "acct-2.log")
            processes.append(second)

            async def second_joined() -> bool:
                assert second.proc.poll() is None, second.tail()
                consumers = await client.xinfo_consumers(names.usage_stream, GROUP)
                return any(c[b"name"] == b"acct-2" for c in consumers)

            try:
                await until(second_joined, JOIN_SECONDS, "the second accountant joined the group")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its log ends with:\n{second.tail()}") from None

            async def all_applied() -> bool:
                assert second.proc.poll() is None, second.tail()
                await watch.sample()
                groups = await client.xinfo_groups(names.usage_stream)
                ours = next(g for g in groups if g[b"name"] == GROUP.encode())
                return ours[b"pending"] == 0 and ours[b"lag"] == 0 and await ledger_count() == EVENTS

            await until(all_applied, LOAD_SECONDS, "every event applied, nothing pending")
            applied_seconds = time.monotonic() - started

            async def trimmed() -> bool:
                await watch.sample()
                return await client.xlen(names.usage_stream) < 2 * EVENTS

            await until(trimmed, WAIT_SECONDS, "the stream trimmed")
        finally:
            for process in processes:
                localstack.terminate(process.proc)

        consumers = {
            c[b"name"]: c[b"pending"] for c in await client.xinfo_consumers(names.usage_stream, GROUP)
        }
        assert consumers.get(b"acct-1") == 0, consumers  # its held batch was claimed by acct-2
        print(
            f"\n20,000 deliveries applied in {applied_seconds:.2f} s (first process killed at "
            f"{rows_at_kill} ledger rows holding {len(held)} entries); final XLEN "
            f"{await client.xlen(names.usage_stream)}; {watch.samples} trim samples"
        )

        # Every request id exactly once.
        rows = await ledger_rows(db)
        assert len(rows) == EVENTS
        assert {r["request_id"] for r in rows} == {e.request_id for e in events}
        fields = (
            "prompt_tokens",
            "completion_tokens",
            "reserved_tokens",
            "estimated",
            "http_status",
            "endpoint",
        )
        mismatched = [
            row["request_id"]
            for row in rows
            if tuple(row[f] for f in fields) != tuple(getattr(by_id[row["request_id"]], f) for f in fields)
        ]
        assert mismatched == [], f"{len(mismatched)} of {len(rows)} rows differ from their events"

        # Redis: reservations replaced by actual usage; counters equal the ledger sums.
        sums = ledger_budget_sums(rows)
        checked = 0
        for key_id, items in live_scopes:
            scope = scope_for(by_key[key_id], dict(items))
            for who, ident in (("key", key_id), ("tenant", scope.tenant_id)):
                for period in PERIODS:
                    value = await counter(client, scripts.budget_key(scope, who, period))
                    assert value is not None
                    assert value == sums.get((who, ident, period, scope.periods.start(period)), 0), (
                        who,
                        ident,
                        period,
                    )
                    checked += 1
        assert checked >= 6 * len(keys)
        for request_id in reserved_ids:
            event = by_id[request_id]
            assert not await client.exists([names.reservation(event.tenant_id, request_id)])
        assert watch.violations == []
        assert watch.samples > 10

        # budget_periods: one addition per request id, even for the copies that shared a batch.
        assert await budget_periods(db) == sums


async def test_the_same_event_twice_in_one_batch_adds_to_budget_periods_once(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A usage event written twice in a row (a stream_proxy retrying an XADD whose reply it lost)
    lands in one batch: the ledger gets one row and budget_periods adds its tokens once."""
    (key,) = await new_keys(db, {"acme": 1})
    now = time.time()
    twice = usage_event(key, "dup-1", now, prompt_tokens=100, completion_tokens=20)
    once = usage_event(key, "one-1", now, prompt_tokens=7, completion_tokens=3)
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        for event in (twice, twice, once):
            await accountant.redis.xadd(accountant.keys.usage_stream, usage_wire.encode(event))
        assert await accountant.read_batch(block_ms=100) == 3

    rows = await ledger_rows(db)
    assert [r["request_id"] for r in rows] == ["dup-1", "one-1"]
    day = dt.date.fromisoformat(period_names(now)["day"])
    tokens = await db.fetchval(
        "SELECT tokens FROM budget_periods WHERE scope = 'key' AND scope_id = $1 AND period = 'day' "
        "AND period_start = $2",
        key.key.id,
        day,
    )
    assert tokens == 130
    assert await budget_periods(db) == ledger_budget_sums(rows)


async def test_an_accountant_joining_an_existing_group_consumes_the_stream(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A second accountant (another instance, or the same one restarted) finds the consumer groups
    already created: ensure_groups() succeeds and it applies the events it reads."""
    (key,) = await new_keys(db, {"acme": 1})
    async with accountant_on(database_url, redis_url, redis_prefix, consumer="first"):
        pass
    async with accountant_on(database_url, redis_url, redis_prefix, groups=False, consumer="second") as later:
        await later.redis.xadd(
            later.keys.usage_stream, usage_wire.encode(usage_event(key, "r-1", time.time()))
        )
        await later.ensure_groups()
        assert await later.read_batch(block_ms=100) == 1
    assert [r["request_id"] for r in await ledger_rows(db)] == ["r-1"]


# --- dead letters ---------------------------------------------------------------------------------


async def test_undecodable_and_unknown_tenant_events_are_dead_lettered_and_the_batch_goes_on(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """In one batch with good events around them: an entry without the event field, an entry whose
    event is not JSON, and an event naming a tenant that does not exist each go to the dead-letter
    stream with the original entry id, a reason and the original fields; all are acknowledged, the
    good events are in the ledger, and the next read finds nothing left."""
    (key,) = await new_keys(db, {"acme": 1})
    now = time.time()
    before = usage_event(key, "good-before", now)
    after = usage_event(key, "good-after", now, prompt_tokens=3)
    ghost = attrs.evolve(usage_event(key, "ghost-tenant", now), tenant_id=key.tenant.id + 999)
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        redis, names = accountant.redis, accountant.keys
        entries: list[Mapping[bytes, bytes]] = [
            usage_wire.encode(before),
            {b"something": b"else"},
            {usage_wire.FIELD: b"{not json"},
            usage_wire.encode(ghost),
            usage_wire.encode(after),
        ]
        ids = [cast(bytes, await redis.xadd(names.usage_stream, fields)) for fields in entries]

        assert await accountant.read_batch(block_ms=100) == 2

        dead = await redis.xrange(names.dead_letters)
        by_origin = {fields[b"id"]: fields for fields in map(fields_of, dead)}
        assert set(by_origin) == {ids[1], ids[2], ids[3]}
        assert by_origin[ids[1]][b"reason"].startswith(b"undecodable: ")
        assert by_origin[ids[1]][b"f:something"] == b"else"
        assert by_origin[ids[2]][b"reason"].startswith(b"undecodable: ")
        assert by_origin[ids[2]][b"f:event"] == b"{not json"
        assert by_origin[ids[3]][b"reason"] == b"refused by Postgres: ForeignKeyViolationError"
        assert usage_wire.decode({b"event": by_origin[ids[3]][b"f:event"]}) == ghost

        pending = cast(StreamPending, await redis.xpending(names.usage_stream, GROUP))
        assert pending.pending == 0
        assert await accountant.read_batch(block_ms=50) == 0
        assert await redis.xlen(names.dead_letters) == 3
        assert not await redis.exists([names.settled(ghost.tenant_id, ghost.request_id)])
        assert await redis.exists([names.settled(before.tenant_id, before.request_id)])

    assert [r["request_id"] for r in await ledger_rows(db)] == ["good-after", "good-before"]


# --- the expired-lease sweeper -------------------------------------------------------------------


async def test_a_reservation_whose_lease_expired_is_charged_once_after_the_grace(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """A reservation whose stream_proxy died (lease expired 20 s ago, no usage event ever): a sweep
    whose grace has not passed charges nothing; after the grace one sweep charges it once, as a
    ledger row flagged estimated 'lease_expired' with tokens = the reservation, budget_periods and
    the Redis counters keeping the reserved tokens and the reservation gone; a second sweep changes
    nothing. A reservation whose usage event arrived (lease released, then settled) is never
    charged by the sweeper, neither between release and settle nor after."""
    (key,) = await new_keys(db, {"acme": 1})
    names = RedisKeys(redis_prefix)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        scripts = LimitScripts(client, names)
        redis_now = int((await client.time()).timestamp() * 1000)
        periods = period_names(redis_now / 1000)
        scope = scope_for(key, periods)
        await hydrate(client, scripts, scope)
        dead = await scripts.reserve(
            scope,
            "dead-proxy",
            metered=True,
            prompt_bound=300,
            requested_completion=200,
            default_completion=None,
            lease_ttl_ms=1_000,
            now_ms=redis_now - 21_000,
        )
        assert dead == Reserved(completion_limit=200, reserved=500)
        await scripts.register_tenant(key.tenant.id)
        expires = redis_now - 20_000

    async with accountant_on(
        database_url, redis_url, redis_prefix, groups=False, sweep_grace=60.0
    ) as patient:
        assert await patient.sweep() == 0
    assert await ledger_rows(db) == []

    async with accountant_on(
        database_url, redis_url, redis_prefix, groups=False, sweep_grace=5.0
    ) as accountant:
        redis = accountant.redis
        assert await accountant.sweep() == 1

        (row,) = await ledger_rows(db)
        assert row["request_id"] == "dead-proxy"
        assert (row["tenant_id"], row["key_id"]) == (key.tenant.id, key.key.id)
        assert row["estimated"] is True
        assert row["estimate_reason"] == "lease_expired"
        assert row["total_tokens"] == 500
        assert row["reserved_tokens"] == 500
        assert row["finished_at"] == dt.datetime.fromtimestamp(expires / 1000, dt.UTC)
        sums = ledger_budget_sums([row])
        assert await budget_periods(db) == sums
        values = {
            (who, period): await counter(redis, accountant.scripts.budget_key(scope, who, period))
            for who in ("key", "tenant")
            for period in PERIODS
        }
        assert set(values.values()) == {500}
        assert not await redis.exists([names.reservation(key.tenant.id, "dead-proxy")])
        assert await redis.zcard(names.reservation_index(key.tenant.id)) == 0

        assert await accountant.sweep() == 0
        assert len(await ledger_rows(db)) == 1
        assert await budget_periods(db) == sums
        for (who, period), value in values.items():
            assert await counter(redis, accountant.scripts.budget_key(scope, who, period)) == value

        # A request whose usage event arrived: its lease was released, then it was settled.
        redis_now = int((await redis.time()).timestamp() * 1000)
        live = await accountant.scripts.reserve(
            scope,
            "finished-normally",
            metered=True,
            prompt_bound=100,
            requested_completion=50,
            default_completion=None,
            lease_ttl_ms=1_000,
            now_ms=redis_now - 21_000,
        )
        assert isinstance(live, Reserved)
        await accountant.scripts.register_tenant(key.tenant.id)
        await accountant.scripts.lease(scope, "finished-normally", action="release", ttl_ms=1_000)
        assert await accountant.sweep() == 0
        assert await accountant.scripts.settle(scope, "finished-normally", 42)
        assert await accountant.sweep() == 0
        assert [r["request_id"] for r in await ledger_rows(db)] == ["dead-proxy"]
        for who in ("key", "tenant"):
            for period in PERIODS:
                assert await counter(redis, accountant.scripts.budget_key(scope, who, period)) == 542


async def test_an_unreadable_reservation_never_stops_the_sweep_or_the_rebuild(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Beside a dead reservation of 500 tokens: one whose amount is not a number, one missing its
    periods, one with a float amount as Lua may write it. The sweep charges the good one and the
    float one, drops the unreadable ones from the index (logged), and so does every later sweep;
    rebuild-counters over the same tenant completes too."""
    (key,) = await new_keys(db, {"acme": 1})
    names = RedisKeys(redis_prefix)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        scripts = LimitScripts(client, names)
        redis_now = int((await client.time()).timestamp() * 1000)
        scope = scope_for(key, period_names(redis_now / 1000))
        await hydrate(client, scripts, scope)
        for request_id in ("good", "bad-amount", "no-periods", "float-amount"):
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
        tenant = key.tenant.id
        await client.hset(names.reservation(tenant, "bad-amount"), {"amount": "lots"})
        await client.hdel(names.reservation(tenant, "no-periods"), ["day", "month"])
        await client.hset(names.reservation(tenant, "float-amount"), {"amount": "5e+2"})
        await scripts.register_tenant(tenant)
        rebuilt = await counters.rebuild(db, client, names, zone=ZoneInfo("UTC"), tenant_ids=[tenant])
        assert rebuilt.tenants == 1

    async with accountant_on(
        database_url, redis_url, redis_prefix, groups=False, sweep_grace=5.0
    ) as accountant:
        assert await accountant.sweep() == 2
        assert await accountant.redis.zcard(names.reservation_index(tenant)) == 0
        assert await accountant.sweep() == 0
    rows = {r["request_id"]: r["total_tokens"] for r in await ledger_rows(db)}
    assert rows == {"good": 500, "float-amount": 500}


# --- prompt logs -----------------------------------------------------------------------------------


async def test_the_sweeper_unlists_a_tenant_only_when_its_index_is_empty_and_its_registration_old(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """stream_proxy registers a tenant at most every TENANT_REFRESH_SECONDS, so a reservation may be
    made without a fresh registration: the sweeper must not unlist a tenant registered lately (even
    with an empty index), nor one with reservations; it unlists one registered long ago with none."""
    async with accountant_on(database_url, redis_url, redis_prefix, groups=False) as accountant:
        scripts = accountant.scripts
        redis_now = int((await accountant.redis.time()).timestamp() * 1000)
        await scripts.register_tenant(101)  # fresh, empty index
        await scripts.register_tenant(102, now_ms=redis_now - TENANT_KEEP_MS - 5_000)  # old, empty
        await scripts.register_tenant(103, now_ms=redis_now - TENANT_KEEP_MS - 5_000)  # old, in use
        await accountant.redis.zadd(scripts.keys.reservation_index(103), {"open-request": redis_now + 60_000})
        assert sorted(await scripts.reserving_tenants()) == [101, 102, 103]

        assert await accountant.sweep() == 0
        assert sorted(await scripts.reserving_tenants()) == [101, 103]
        # A registration refreshed between the sweeper's look at the index and its removal wins.
        assert not await scripts.forget_tenant(101)
        assert await scripts.forget_tenant(101, now_ms=redis_now + TENANT_KEEP_MS + 1_000)
        assert await scripts.reserving_tenants() == [103]


async def test_prompt_logs_expire_and_are_purged_by_the_accountant_and_the_cli(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Events carrying request and response text and a TTL get a prompt_logs row with created_at =
    finished_at and expires_at = finished_at + ttl; events without text (or without a TTL) get none.
    Accountant.purge() with a clock just past the first expiry deletes exactly that row; then
    `neuronetz-gateway purge-prompts --json` deletes the rows expired by now and keeps the others."""
    (key,) = await new_keys(db, {"acme": 1})
    now = float(int(time.time()))
    events = [
        usage_event(
            key,
            "logged-short",
            now - 7200.25,
            request_text='{"prompt":"hi"}',
            response_text="hello",
            prompt_log_ttl_seconds=60,
        ),
        usage_event(
            key,
            "logged-hour",
            now - 5400.5,
            request_text="q2",
            response_text="a2",
            prompt_log_ttl_seconds=3600,
        ),
        usage_event(
            key,
            "logged-month",
            now - 10.75,
            request_text="q3",
            response_text="",
            prompt_log_ttl_seconds=2592000,
        ),
        usage_event(key, "not-logged", now - 5.0),
        usage_event(key, "text-without-ttl", now - 4.0, request_text="q5", response_text="a5"),
    ]
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        for event in events:
            await accountant.redis.xadd(accountant.keys.usage_stream, usage_wire.encode(event))
        assert await accountant.read_batch(block_ms=100) == len(events)

    rows = {r["request_id"]: r for r in await db.fetch("SELECT * FROM prompt_logs")}
    assert set(rows) == {"logged-short", "logged-hour", "logged-month"}
    for event in events[:3]:
        row = rows[event.request_id]
        assert event.prompt_log_ttl_seconds is not None
        assert row["created_at"] == dt.datetime.fromtimestamp(event.finished_at, dt.UTC)
        assert row["expires_at"] - row["created_at"] == dt.timedelta(seconds=event.prompt_log_ttl_seconds)
        assert (row["request_text"], row["response_text"]) == (event.request_text, event.response_text)
        assert (row["tenant_id"], row["key_id"]) == (key.tenant.id, key.key.id)

    short_expiry = events[0].finished_at + 60
    async with accountant_on(
        database_url, redis_url, redis_prefix, clock=lambda: short_expiry + 0.001, groups=False
    ) as accountant:
        assert await accountant.purge() == 1
    remaining = {r["request_id"] for r in await db.fetch("SELECT request_id FROM prompt_logs")}
    assert remaining == {"logged-hour", "logged-month"}

    env = cli_env(database_url, redis_url, redis_prefix, tmp_path)
    assert (await cli(env, "purge-prompts", "--json")).json() == {"deleted": 1}
    remaining = {r["request_id"] for r in await db.fetch("SELECT request_id FROM prompt_logs")}
    assert remaining == {"logged-month"}
    assert (await cli(env, "purge-prompts", "--json")).json() == {"deleted": 0}


# --- denials and the audit command ---------------------------------------------------------------


async def test_denial_batches_become_audit_rows_that_the_audit_command_filters(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Denial batches on the audit stream (as the sidecar's DenialAuditor ships them) become audit
    rows with their counts (an aggregated flood of unknown keys is one row with its count); the
    `audit` command filters them by --tenant, --prefix, --since 1h and --status 429 (JSON), prints
    the table form, and neither its output nor any audit row contains a key."""
    alpha, beta = await new_keys(db, {"alpha": 1, "beta": 1})
    now = time.time()
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        auditor = DenialAuditor(accountant.redis, accountant.keys.audit_stream)

        def denial(at: float, status: int, reason: str, key: admin.CreatedKey | None, path: str) -> Denial:
            return Denial(
                at=at,
                request_id=uuid.uuid4().hex,
                status=status,
                reason=reason,
                method="POST",
                path=path,
                client_addr="198.51.100.7",
                user_agent="pytest",
                tenant_id=key.tenant.id if key else None,
                key_id=key.key.id if key else None,
                key_prefix=key.key.prefix if key else None,
            )

        for _ in range(3):
            auditor.record(denial(now - 60, 429, "rpm", alpha, "/api/chat"))
        auditor.record(denial(now - 3 * 3600, 429, "budget_day", alpha, "/api/chat"))
        auditor.record(denial(now - 30, 403, "model_not_allowed", alpha, "/v1/chat/completions"))
        auditor.record(denial(now - 20, 429, "tpm", beta, "/api/generate"))
        for _ in range(50):
            auditor.record(denial(now - 10, 401, "key_unknown", None, "/api/chat"))
        assert await auditor.flush() == 7
        auditor.record(denial(now - 5, 401, "key_revoked", beta, "/api/embed"))
        assert await auditor.flush() == 1
        await accountant.redis.xadd(accountant.keys.audit_stream, {b"kind": b"denials", b"rows": b"[oops"})

        assert await accountant.read_denials() == 8
        assert await accountant.read_denials() == 0
        pending = cast(StreamPending, await accountant.redis.xpending(accountant.keys.audit_stream, GROUP))
        assert pending.pending == 0
        # Acknowledged batches are trimmed like usage events (the stream would grow forever).
        assert await accountant.redis.xlen(accountant.keys.audit_stream) == 3
        assert await accountant.trim() >= 2
        assert await accountant.redis.xlen(accountant.keys.audit_stream) <= 1

    rows = await db.fetch("SELECT * FROM audit_log")
    assert len(rows) == 8
    assert sum(r["count"] for r in rows) == 57
    (flood,) = [r for r in rows if r["reason"] == "key_unknown"]
    assert flood["count"] == 50
    assert flood["tenant_id"] is None
    assert flood["request_id"] is None

    env = cli_env(database_url, redis_url, redis_prefix, tmp_path)

    def reasons(done: Done) -> list[tuple[str, int, int]]:
        return sorted((r["reason"], r["status"], r["count"]) for r in done.json())

    tenant_alpha = await cli(env, "audit", "--tenant", "alpha", "--json")
    assert reasons(tenant_alpha) == [
        ("budget_day", 429, 1),
        ("model_not_allowed", 403, 1),
        ("rpm", 429, 1),
        ("rpm", 429, 1),
        ("rpm", 429, 1),
    ]
    assert {r["tenant"] for r in tenant_alpha.json()} == {"alpha"}
    assert {r["key_prefix"] for r in tenant_alpha.json()} == {alpha.key.prefix}
    by_prefix = await cli(env, "audit", "--prefix", f"nz_{beta.key.prefix}", "--json")
    assert reasons(by_prefix) == [("key_revoked", 401, 1), ("tpm", 429, 1)]
    recent = await cli(env, "audit", "--since", "1h", "--json")
    assert len(recent.json()) == 7
    assert "budget_day" not in {r["reason"] for r in recent.json()}
    limited = await cli(env, "audit", "--status", "429", "--json")
    assert reasons(limited) == [
        ("budget_day", 429, 1),
        ("rpm", 429, 1),
        ("rpm", 429, 1),
        ("rpm", 429, 1),
        ("tpm", 429, 1),
    ]
    combined = await cli(env, "audit", "--tenant", "alpha", "--status", "429", "--since", "1h", "--json")
    assert reasons(combined) == [("rpm", 429, 1)] * 3
    newest_first = [r["at"] for r in recent.json()]
    assert newest_first == sorted(newest_first, reverse=True)

    table = await cli(env, "audit", "--tenant", "alpha", "--wide")
    assert table.code == 0, table.err
    assert "audit log" in table.out
    assert f"nz_{alpha.key.prefix}" in table.out
    assert "model_not_allowed" in table.out
    assert "POST /v1/chat/completions" in table.out

    outputs = [tenant_alpha, by_prefix, recent, limited, combined, table]
    stored = " ".join(str(dict(r)) for r in rows)
    for created in (alpha, beta):
        secret = created.token[len("nz_") + 8 :]
        for done in outputs:
            assert created.token not in done.out
            assert secret not in done.out
        assert secret not in stored


# --- rebuilding the counters -----------------------------------------------------------------------


async def test_rebuild_counters_after_flushdb_restores_budgets_and_tpm_windows(
    db: asyncpg.Connection,
    database_url: str,
    redis_prefix: str,
    work_dir: Path,
    tmp_path: Path,
) -> None:
    """On a Valkey of the test's own: the ledger holds recent, ten-minute-old and forty-day-old usage
    of three keys in two tenants; FLUSHDB loses every counter; a few requests get reserved again
    (their counters freshly set to 0, as a hydration would after the loss). `rebuild-counters
    --json` then sets every budget counter of the current periods to budget_periods plus the open
    reservations against it (counters that were missing are recreated) and every TPM window to the
    ledger's tokens of the last 61 s plus the open reservations, per second."""
    valkey = localstack.Valkey(work_dir / f"valkey-rebuild-{uuid.uuid4().hex[:8]}").start()
    try:
        a1, a2, b1 = await new_keys(db, {"alpha": 2, "beta": 1})
        names = RedisKeys(redis_prefix)
        now = float(int(time.time()))
        events = []
        for n, key in enumerate((a1, a2, b1, a1, b1)):
            events.append(
                usage_event(
                    key, f"recent-{n}", now - 2 - n + 0.5, prompt_tokens=100 + n, completion_tokens=10 * n
                )
            )
            events.append(usage_event(key, f"older-{n}", now - 600.5, prompt_tokens=1000))
            events.append(usage_event(key, f"ancient-{n}", now - 40 * 86400, prompt_tokens=5000))
        async with accountant_on(database_url, valkey.url, redis_prefix) as accountant:
            for event in events:
                await accountant.redis.xadd(accountant.keys.usage_stream, usage_wire.encode(event))
            assert await accountant.read_batch(block_ms=100) == len(events)

        client: coredis.Redis[bytes] = coredis.Redis.from_url(valkey.url)
        async with client:
            await client.flushdb()
            scripts = LimitScripts(client, names)
            today = period_names(float((await client.time()).timestamp()))
            scope = scope_for(
                a1, today, Limits(tpm=10**9, daily_tokens=10**12, monthly_tokens=10**12, total_tokens=10**12)
            )
            await hydrate(client, scripts, scope)
            open_reservations: list[tuple[int, int]] = []  # (second, amount)
            for n in range(3):
                outcome = await scripts.reserve(
                    scope,
                    f"open-{n}",
                    metered=True,
                    prompt_bound=70 + n,
                    requested_completion=30,
                    default_completion=None,
                    lease_ttl_ms=LEASE_MS,
                )
                assert isinstance(outcome, Reserved)
                record = await client.hgetall(names.reservation(a1.tenant.id, f"open-{n}"))
                open_reservations.append((int(record[b"sec"]), outcome.reserved))
            assert await counter(client, scripts.budget_key(scope_for(b1, today), "key", "day")) is None

            env = cli_env(database_url, valkey.url, redis_prefix, tmp_path)
            done = await cli(env, "rebuild-counters", "--json")
            assert done.json() == {"tenants": 2, "budget_counters": 15, "tpm_windows": 5}

            settled = await budget_periods(db)
            reserved_total = sum(amount for _, amount in open_reservations)
            for key in (a1, a2, b1):
                key_scope = scope_for(key, today)
                for who, ident in (("key", key.key.id), ("tenant", key.tenant.id)):
                    for period in PERIODS:
                        expected = settled.get((who, ident, period, key_scope.periods.start(period)), 0)
                        if key is a1 or (who == "tenant" and key.tenant.id == a1.tenant.id):
                            expected += reserved_total
                        value = await counter(client, scripts.budget_key(key_scope, who, period))
                        assert value == expected, (key.key.name, key.tenant.name, who, period)
                        assert period != "total" or expected > 0

            windows: dict[tuple[int, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
            for event in events:
                if event.finished_at >= now - 61:
                    second = int(event.finished_at)
                    windows[(event.tenant_id, "t")][second] += event.total_tokens
                    windows[(event.tenant_id, f"k{event.key_id}")][second] += event.total_tokens
            for second, amount in open_reservations:
                windows[(a1.tenant.id, "t")][second] += amount
                windows[(a1.tenant.id, f"k{a1.key.id}")][second] += amount
            for key in (a1, a2, b1):
                for name in ("t", f"k{key.key.id}"):
                    raw = await client.hgetall(names.tpm(key.tenant.id, name))
                    assert {int(s): int(v) for s, v in raw.items()} == dict(windows[(key.tenant.id, name)])
    finally:
        valkey.stop()


@attrs.define
class LiveTraffic:
    """Requests of two keys as stream_proxy makes them (reserve; later the usage event with, for
    most, the settle in the same round trip), against counters rebuilt and hydrated meanwhile."""

    redis: coredis.Redis[bytes]
    scripts: LimitScripts
    pool: asyncpg.Pool[asyncpg.Record]
    keys: list[admin.CreatedKey]
    rng: random.Random
    spent: dict[tuple[str, int], int] = attrs.field(factory=lambda: defaultdict(int))
    requests: int = 0
    hydrations: int = 0
    # The keys' model rules and, per model the requests name, the patterns of the rules covering it
    # (written out by the test, not computed by the matcher under test).
    rules: tuple[ModelRule, ...] = ()
    models: Mapping[str, tuple[str, ...]] = attrs.field(factory=lambda: {"llama3.2:latest": ()})
    model_spent: dict[tuple[str, int, str], int] = attrs.field(factory=lambda: defaultdict(int))

    async def one(self, key: admin.CreatedKey, request_id: str, limits: Limits) -> None:
        started = float((await self.redis.time()).timestamp())
        model = self.rng.choice(sorted(self.models))
        scope = attrs.evolve(scope_for(key, period_names(started), limits), rules=self.rules, model=model)
        prompt, completion = self.rng.randint(20, 300), self.rng.randint(0, 200)
        for _ in range(100):
            outcome = await self.scripts.reserve(
                scope,
                request_id,
                metered=True,
                prompt_bound=prompt,
                requested_completion=completion,
                default_completion=None,
                lease_ttl_ms=LEASE_MS,
            )
            if isinstance(outcome, Reserved):
                break
            assert isinstance(outcome, NeedsHydration), outcome
            async with self.pool.acquire() as conn:  # what the sidecar's hydration does
                with contextlib.suppress(CountersBusy):
                    await counters.rebuild_tenant(
                        conn,
                        self.scripts,
                        zone=UTC,
                        tenant_id=key.tenant.id,
                        key_ids=[key.key.id],
                        periods=scope.periods,
                        missing=set(outcome.missing),
                        wait=0.0,
                    )
                    self.hydrations += 1
        else:
            raise AssertionError("never reserved")
        await asyncio.sleep(self.rng.random() * 0.04)
        actual = self.rng.randint(1, outcome.reserved)
        event = usage_event(
            key,
            request_id,
            started + 0.01,
            prompt_tokens=actual // 2,
            completion_tokens=actual - actual // 2,
            reserved_tokens=outcome.reserved,
            started_at=started,
            model=model,
            model_key=model,
        )
        settle = self.rng.random() < 0.8  # the rest: stream_proxy's settle did not happen
        async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
            written = pipe.xadd(self.scripts.keys.usage_stream, usage_wire.encode(event))
            settled = (
                self.scripts.settle_in(pipe, scope, request_id, actual, ledgered=False) if settle else None
            )
        assert await written
        if settled is not None:
            assert await settled() == 1
        self.spent[("tenant", key.tenant.id)] += actual
        self.spent[("key", key.key.id)] += actual
        for pattern in self.models[model]:
            self.model_spent[("tenant", key.tenant.id, pattern)] += actual
            self.model_spent[("key", key.key.id, pattern)] += actual
        self.requests += 1

    async def worker(self, n: int, count: int, limits: Limits) -> None:
        for i in range(count):
            await self.one(self.keys[(n + i) % len(self.keys)], f"live-{n}-{i}", limits)


async def test_rebuild_counters_under_live_traffic_loses_nothing_and_counts_nothing_twice(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Six workers make 360 requests of two keys while the accountant applies their events and,
    concurrently, `rebuild-counters` runs over the tenant 40 times and counters are deleted and
    hydrated again. Every request is in one of the states a rebuild must count once: reserved,
    settled by stream_proxy but not yet in the ledger, in the ledger but not yet settled by the
    accountant, or done. Once the traffic is applied, every budget counter and TPM window equals
    the tokens the workers spent (their own tally), the ledger agrees, nothing is left unledgered."""
    keys = await new_keys(db, {"live": 2})
    tenant = keys[0].tenant.id
    names = RedisKeys(redis_prefix)
    limits = attrs.evolve(ROOMY, tpm=10**9)
    pool = await create_pool(PostgresConfig(url=database_url, pool_min=1, pool_max=4))
    try:
        async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
            client, scripts = accountant.redis, accountant.scripts
            traffic = LiveTraffic(client, scripts, pool, keys, random.Random(17))  # noqa: S311 - test data
            await counters.rebuild(db, client, names, zone=UTC, tenant_ids=[tenant])
            stop = asyncio.Event()

            async def apply() -> None:
                while not stop.is_set():
                    await accountant.read_batch(block_ms=20)

            rebuilds, done = 0, asyncio.Event()

            async def rebuild() -> None:
                """Rebuild (and now and then lose a counter) only while requests are being made: a
                rebuild after the traffic has settled would repair any earlier mistake."""
                nonlocal rebuilds
                rng = random.Random(5)  # noqa: S311 - test data
                for n in itertools.count():
                    if done.is_set():
                        return
                    if n % 4 == 1 and traffic.requests < 300:  # later requests hydrate it again
                        day = period_names(float((await client.time()).timestamp()))
                        victim = rng.choice(keys)
                        await client.delete([scripts.budget_key(scope_for(victim, day), "key", "day")])
                    else:
                        await counters.rebuild(db, client, names, zone=UTC, tenant_ids=[tenant])
                        rebuilds += 1
                    await asyncio.sleep(rng.random() * 0.01)

            async def workers() -> None:
                await asyncio.gather(*(traffic.worker(n, 60, limits) for n in range(6)))
                done.set()

            applier = asyncio.create_task(apply())
            await asyncio.gather(rebuild(), workers())
            assert traffic.requests == 360
            assert rebuilds >= 10, rebuilds
            print("REBUILDS", rebuilds, traffic.hydrations)
            assert traffic.hydrations > 0

            async def drained() -> bool:
                count = await db.fetchval("SELECT count(*) FROM usage_ledger WHERE tenant_id = $1", tenant)
                pending = await client.xpending(names.usage_stream, GROUP)
                return bool(count == 360 and isinstance(pending, StreamPending) and not pending.pending)

            await until(drained, WAIT_SECONDS, "every event applied")
            stop.set()
            await applier

            assert await client.zcard(names.reservation_index(tenant)) == 0
            assert await client.hlen(names.unledgered(tenant)) == 0
            settled = await budget_periods(db)
            today = period_names(float((await client.time()).timestamp()))
            window_total = traffic.spent[("tenant", tenant)]
            for key in keys:
                scope = scope_for(key, today)
                for who, ident in (("key", key.key.id), ("tenant", tenant)):
                    spent = traffic.spent[(who, ident)]
                    for period in PERIODS:
                        assert settled[(who, ident, period, scope.periods.start(period))] == spent
                        value = await counter(client, scripts.budget_key(scope, who, period))
                        assert value == spent, (who, ident, period, value, spent)
                raw = await client.hgetall(names.tpm(tenant, f"k{key.key.id}"))
                assert sum(int(v) for v in raw.values()) == traffic.spent[("key", key.key.id)]
            raw = await client.hgetall(names.tpm(tenant, "t"))
            assert sum(int(v) for v in raw.values()) == window_total
    finally:
        await pool.close()


@attrs.define
class Interleaved(LimitScripts):
    """The limit scripts with something done between a rebuild's snapshot and its Redis step."""

    before_rebuild: Callable[[], Awaitable[None]] | None = None

    async def rebuild_counters(self, keys: list[str], token: str, plan: bytes) -> int | None:
        if self.before_rebuild is not None:
            await self.before_rebuild()
        return await super().rebuild_counters(keys, token, plan)


async def test_a_rebuild_counts_each_state_of_a_request_once_and_holds_off_only_the_ledgered_settle(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Each state a request can be in while `rebuild-counters` runs, made on purpose: reserved;
    settled by stream_proxy with its event not yet applied; in the ledger with the accountant's
    settle not yet run; done. Between the rebuild's Postgres snapshot and its Redis step, one more
    request is reserved, one settled by stream_proxy, and an accountant's settle is held off (-1).
    After the rebuild each request is finished the way it would be: every budget counter then
    holds exactly the tokens spent, and so does the ledger."""
    (key,) = await new_keys(db, {"states": 1})
    names = RedisKeys(redis_prefix)
    tenant = key.tenant.id
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        client, scripts = accountant.redis, accountant.scripts
        now = float((await client.time()).timestamp())
        scope = scope_for(key, period_names(now))
        await counters.rebuild(db, client, names, zone=UTC, tenant_ids=[tenant])
        actual = {"reserved": 30, "proxy-settled": 41, "ledgered": 52, "done": 63, "during": 74, "late": 85}
        events = {}
        for request_id in ("reserved", "proxy-settled", "ledgered", "done", "late"):
            events[request_id] = await reserve_for(
                scripts, key, usage_event(key, request_id, now, prompt_tokens=actual[request_id])
            )

        async def proxy_settle(request_id: str) -> None:
            """stream_proxy: the usage event on the stream, the settle beside it."""
            await client.xadd(names.usage_stream, usage_wire.encode(events[request_id]))
            assert await scripts.settle(scope, request_id, events[request_id].total_tokens, ledgered=False)

        async def apply_all() -> None:
            while await accountant.read_batch(block_ms=50):
                pass

        await proxy_settle("done")
        await apply_all()
        await proxy_settle("proxy-settled")  # not applied yet
        async with accountant.pool.acquire() as conn:  # committed; its settle has not run yet
            await ledger.apply_usage(conn, [events["ledgered"]])

        held: list[int] = []

        async def between() -> None:
            """After the snapshot, before the Redis step: traffic goes on."""
            events["during"] = await reserve_for(
                scripts, key, usage_event(key, "during", now, prompt_tokens=actual["during"])
            )
            await proxy_settle("late")
            raw_keys, raw_args = scripts._settle_call(
                scope, "ledgered", events["ledgered"].total_tokens, True
            )
            held.append(int(await scripts._settle(keys=raw_keys, args=raw_args)))

        interleaved = Interleaved(client, names, before_rebuild=between)
        await counters.rebuild_tenant(db, interleaved, zone=UTC, tenant_id=tenant, key_ids=[key.key.id])
        assert held == [-1]

        assert await scripts.settle(scope, "ledgered", events["ledgered"].total_tokens)  # the accountant
        for request_id in ("reserved", "during"):
            await proxy_settle(request_id)
        await apply_all()
        assert await client.zcard(names.reservation_index(tenant)) == 0
        assert await client.hlen(names.unledgered(tenant)) == 0
        spent = sum(events[r].total_tokens for r in actual)
        assert spent == sum(actual.values()) + 6 * 5
        assert sum(r["total_tokens"] for r in await ledger_rows(db)) == spent
        for who in ("key", "tenant"):
            for period in PERIODS:
                value = await counter(client, scripts.budget_key(scope, who, period))
                assert value == spent, (who, period, value, spent)


async def test_model_rule_counters_stay_exact_under_live_traffic_rebuilds_and_lost_counters(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """As above, with model rules: a tenant rule on `big:*` (TPM and every budget) and a key rule on
    `*:*` for one key; requests name big:70b, big:8b, small:1b and ns/big:1 (which `big:*` does not
    cover: `*` stays inside one part). While rebuilds run and model budget counters are deleted (and
    hydrated again by the next request), every rule's budget counter and TPM window ends equal to
    the tokens the workers spent on the models it covers."""
    keys = await new_keys(db, {"models": 2})
    tenant = keys[0].tenant.id
    names = RedisKeys(redis_prefix)
    limits = attrs.evolve(ROOMY, tpm=10**9)
    roomy = Limits(tpm=10**9, daily_tokens=10**12, monthly_tokens=10**12, total_tokens=10**12)
    await db.execute(
        "INSERT INTO model_limits (tenant_id, key_id, pattern, tpm, daily_tokens, monthly_tokens, "
        "total_tokens) VALUES ($1, NULL, 'big:*', $2, $3, $3, $3), ($1, $4, '*:*', $2, $3, $3, $3)",
        tenant,
        10**9,
        10**12,
        keys[0].key.id,
    )
    tenant_rules = (ModelLimit("big:*", roomy),)
    rules = {
        k.key.id: model_rules(tenant_rules, (ModelLimit("*:*", roomy),) if k is keys[0] else ()) for k in keys
    }
    covering = {"big:70b": ("big:*", "*:*"), "big:8b": ("big:*", "*:*"), "small:1b": ("*:*",), "ns/big:1": ()}
    pool = await create_pool(PostgresConfig(url=database_url, pool_min=1, pool_max=4))
    try:
        async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
            client, scripts = accountant.redis, accountant.scripts
            by_key = {
                k.key.id: LiveTraffic(
                    client,
                    scripts,
                    pool,
                    [k],
                    random.Random(23 + n),  # noqa: S311 - test data
                    rules=rules[k.key.id],
                    models=covering,
                )
                for n, k in enumerate(keys)
            }
            await counters.rebuild(db, client, names, zone=UTC, tenant_ids=[tenant])
            stop, done = asyncio.Event(), asyncio.Event()

            async def apply() -> None:
                while not stop.is_set():
                    await accountant.read_batch(block_ms=20)

            rebuilds, lost = 0, 0

            async def rebuild() -> None:
                nonlocal rebuilds, lost
                rng = random.Random(7)  # noqa: S311 - test data
                for n in itertools.count():
                    if done.is_set():
                        return
                    if n % 3 == 1 and sum(t.requests for t in by_key.values()) < 200:
                        day = period_names(float((await client.time()).timestamp()))
                        victim = rng.choice(keys)
                        who, pattern = rng.choice([("tenant", "big:*"), ("key", "*:*")])
                        await client.delete(
                            [scripts.model_budget_key(scope_for(victim, day), pattern, who, "day")]
                        )
                        lost += 1
                    else:
                        await counters.rebuild(db, client, names, zone=UTC, tenant_ids=[tenant])
                        rebuilds += 1
                    await asyncio.sleep(rng.random() * 0.01)

            async def workers() -> None:
                await asyncio.gather(
                    *(
                        by_key[k.key.id].worker(3 * i + n, 40, limits)
                        for i, k in enumerate(keys)
                        for n in range(3)
                    )
                )
                done.set()

            applier = asyncio.create_task(apply())
            await asyncio.gather(rebuild(), workers())
            total = sum(t.requests for t in by_key.values())
            assert total == 240
            assert rebuilds >= 10, rebuilds
            assert lost > 0
            assert sum(t.hydrations for t in by_key.values()) > 0

            async def drained() -> bool:
                count = await db.fetchval("SELECT count(*) FROM usage_ledger WHERE tenant_id = $1", tenant)
                pending = await client.xpending(names.usage_stream, GROUP)
                return bool(count == total and isinstance(pending, StreamPending) and not pending.pending)

            await until(drained, WAIT_SECONDS, "every event applied")
            stop.set()
            await applier

            spent: dict[tuple[str, int, str], int] = defaultdict(int)
            for traffic in by_key.values():
                for where, tokens in traffic.model_spent.items():
                    spent[where] += tokens
            today = period_names(float((await client.time()).timestamp()))
            checked = 0
            for key in keys:
                scope = scope_for(key, today)
                # The keys inherit the tenant's big:* rule unchanged: counted at the tenant's scope
                # only (ModelRule.scopes); the first key's own *:* rule at its own scope.
                expected_scopes = [("tenant", tenant, "big:*")]
                if key is keys[0]:
                    expected_scopes.append(("key", key.key.id, "*:*"))
                for who, ident, pattern in expected_scopes:
                    for period in PERIODS:
                        value = await counter(client, scripts.model_budget_key(scope, pattern, who, period))
                        assert value == spent[(who, ident, pattern)], (who, ident, pattern, period, value)
                        checked += 1
                    window = await client.hgetall(scripts.model_key(scope, pattern, who, "tpm"))
                    assert sum(int(v) for v in window.values()) == spent[(who, ident, pattern)]
            assert checked == 3 * 3
            assert spent[("tenant", tenant, "big:*")] > 0
            # The per-model totals the counters are rebuilt from agree with the workers' tally too.
            rows = await db.fetch(
                "SELECT model, tokens FROM model_budget_periods WHERE scope = 'tenant' AND scope_id = $1 "
                "AND period = 'total'",
                tenant,
            )
            per_model = {r["model"]: r["tokens"] for r in rows}
            assert per_model["big:70b"] + per_model["big:8b"] == spent[("tenant", tenant, "big:*")]
            assert set(per_model) == set(covering)
    finally:
        await pool.close()


async def test_hydrating_a_model_rule_counter_sums_the_models_its_pattern_covers(
    db: asyncpg.Connection, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Events of big:70b, BIG:8B, small:1b and ns/big:1 applied by the accountant; a reservation on
    big:70b under a new tenant rule `big:*` with a daily budget asks for its counter, and the
    hydration (the admission's) sets it to the tokens of big:70b and big:8b only; `usage`'s source,
    model_budget_periods, holds one row per canonical model with its requests."""
    (key,) = await new_keys(db, {"hydrate-models": 1})
    now = float(int(time.time()))
    sent = {"big:70b": (100, 20), "BIG:8B": (7, 3), "small:1b": (1000, 0), "ns/big:1": (500, 5)}
    canonical = {"big:70b": "big:70b", "BIG:8B": "big:8b", "small:1b": "small:1b", "ns/big:1": "ns/big:1"}
    events = [
        usage_event(
            key,
            f"m-{n}-{i}",
            now - 1 - i,
            model=model,
            model_key=canonical[model],
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
        for n, (model, (prompt, completion)) in enumerate(sent.items())
        for i in range(2)
    ]
    async with accountant_on(database_url, redis_url, redis_prefix) as accountant:
        for event in events:
            await accountant.redis.xadd(accountant.keys.usage_stream, usage_wire.encode(event))
        assert await accountant.read_batch(block_ms=100) == len(events)
        client, scripts = accountant.redis, accountant.scripts
        today = period_names(float((await client.time()).timestamp()))
        rule = ModelRule("big:*", Limits(), Limits(daily_tokens=10_000))
        scope = attrs.evolve(scope_for(key, today, Limits()), rules=(rule,), model="big:70b")
        need = await scripts.admit(scope, "first", metered=True, lease_ttl_ms=LEASE_MS)
        assert need == NeedsHydration((("tenant", "day", "big:*"),))
        assert isinstance(need, NeedsHydration)
        written = await counters.rebuild_tenant(
            db,
            scripts,
            zone=UTC,
            tenant_id=key.tenant.id,
            key_ids=[key.key.id],
            periods=scope.periods,
            missing=set(need.missing),
        )
        assert written == 1
        counter_key = scripts.model_budget_key(scope, "big:*", "tenant", "day")
        assert await counter(client, counter_key) == 2 * (100 + 20 + 7 + 3)
        assert await counter(client, scripts.budget_key(scope, "tenant", "day")) is None  # not asked for
        assert isinstance(await scripts.admit(scope, "first", metered=True, lease_ttl_ms=LEASE_MS), Admitted)
    rows = await db.fetch(
        "SELECT model, tokens, requests FROM model_budget_periods WHERE scope = 'key' AND scope_id = $1 "
        "AND period = 'day' ORDER BY model COLLATE \"C\"",
        key.key.id,
    )
    assert [(r["model"], r["tokens"], r["requests"]) for r in rows] == [
        ("big:70b", 240, 2),
        ("big:8b", 20, 2),
        ("ns/big:1", 1010, 2),
        ("small:1b", 2000, 2),
    ]
    ledger = await db.fetch(
        "SELECT DISTINCT model, model_key FROM usage_ledger WHERE key_id = $1", key.key.id
    )
    assert {(r["model"], r["model_key"]) for r in ledger} == set(canonical.items())
