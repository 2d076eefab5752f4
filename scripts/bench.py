"""`scripts/bench`: the gateway's performance record, regenerated into docs/BENCHMARKS.md.

Each scenario starts what it needs (embedded Postgres and Valkey, or GATEWAY_DATABASE_URL /
GATEWAY_REDIS_URL), measures, prints a rich table and rewrites its own section of
docs/BENCHMARKS.md between generated markers. Speed goals are proven here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import attrs
import coredis
import orjson
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from rich.console import Console
from rich.table import Table

import bench_bound
import bench_hostile
import bench_http
import bench_redis
import bench_routing
import localstack
from authz_sidecar.app import ADMISSION, AUTHENTICATOR, POOL, create_app
from shared import admin, keys, usage_wire
from shared.config import SidecarConfig, load_config
from shared.db import asyncpg_dsn
from shared.grant import Grant, sign
from shared.limits import NeedsHydration, Reserved, Scope
from shared.model_names import normalise_pattern
from shared.models import LIMIT_NAMES, Limits, ModelRule, UsageEvent
from shared.periods import periods_at
from shared.redis_keys import RedisKeys

DOC = localstack.ROOT / "docs" / "BENCHMARKS.md"
Row = bench_http.Row
percentile = bench_http.percentile
HTTP_SCENARIOS = {
    "chat": bench_http.scenario_chat,
    "stream": bench_http.scenario_stream,
    "replicas": bench_http.scenario_replicas,
    "slow": bench_http.scenario_slow,
}
console = Console(highlight=False)


@attrs.define
class Services:
    """Postgres and Valkey for a scenario, started unless given by URL."""

    workdir: Path
    postgres: localstack.Postgres | None = None
    valkey: localstack.Valkey | None = None
    database_url: str = ""
    redis_url: str = ""

    def start(self) -> Services:
        """Start (or adopt) both and migrate a fresh database."""
        admin_url = os.environ.get("GATEWAY_DATABASE_URL")
        if admin_url:
            self.database_url = admin_url
        else:
            self.postgres = localstack.Postgres(self.workdir).start()
            self.database_url = self.postgres.createdb(f"bench_{uuid.uuid4().hex[:8]}")
        localstack.dbmate(self.database_url, "up")
        self.redis_url = os.environ.get("GATEWAY_REDIS_URL") or ""
        if not self.redis_url:
            self.valkey = localstack.Valkey(self.workdir / "valkey").start()
            self.redis_url = self.valkey.url
        return self

    def stop(self) -> None:
        """Stop what was started."""
        if self.valkey:
            self.valkey.stop()
        if self.postgres:
            self.postgres.stop()


def _authz_request(app: web.Application, token: str, address: str) -> web.Request:
    return make_mocked_request(
        "GET",
        "/authz",
        headers={
            "Authorization": f"Bearer {token}",
            "X-Forwarded-Method": "POST",
            "X-Forwarded-Uri": "/api/chat",
            "X-Gw-Client-Ip": address,
            "X-Request-Id": str(uuid.uuid4()),
        },
        app=app,
    )


async def _timed(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]], requests: Sequence[web.Request]
) -> tuple[list[float], float]:
    """Per-call latency and total time of handling prepared requests one after another."""
    samples: list[float] = []
    start = time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        await handle(request)
        samples.append(time.perf_counter() - t0)
    return samples, time.perf_counter() - start


def _invalid_token() -> str:
    """A well-shaped key whose checksum is wrong (so it must be refused without any I/O)."""
    token = keys.generate_key().token
    return token[:-1] + ("x" if token[-1] != "x" else "y")


async def scenario_sidecar(services: Services, *, decisions: int) -> list[Row]:
    """/authz alone, in process: cached-key decisions and invalid-key rejections."""
    config = _sidecar_config(services)
    conn = await asyncpg.connect(asyncpg_dsn(services.database_url))
    try:
        await admin.create_tenant(conn, name="bench")
        token = (await admin.create_key(conn, tenant="bench", name="k", pepper=config.hashing.pepper)).token
    finally:
        await conn.close()
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        admission, authenticator = app[ADMISSION], app[AUTHENTICATOR]
        first = await admission.handle(_authz_request(app, token, "10.0.0.1"))
        if first.status != 200:
            raise RuntimeError(f"the bench key was refused: {first.status}")
        for _ in range(500):  # warm-up
            await admission.handle(_authz_request(app, token, "10.0.0.1"))
        good = [_authz_request(app, token, "10.0.0.1") for _ in range(decisions)]
        samples, elapsed = await _timed(admission.handle, good)
        stats_before = await _pg_queries(app)
        argon_before, lookups_before = authenticator.argon2_calls, authenticator.db_lookups
        bad = [
            _authz_request(app, _invalid_token(), f"10.1.{i % 250}.{i // 250 % 250}")
            for i in range(decisions)
        ]
        bad_samples, bad_elapsed = await _timed(admission.handle, bad)
        pg_queries = await _pg_queries(app) - stats_before
        argon_calls = authenticator.argon2_calls - argon_before
        lookups = authenticator.db_lookups - lookups_before
    finally:
        await runner.cleanup()
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    rate = decisions / elapsed
    bad_rate = decisions / bad_elapsed
    return [
        Row("cached-key decision p50", f"{p50:.3f} ms", "—", None),
        Row("cached-key decision p99", f"{p99:.3f} ms", "≤ 0.5 ms", p99 <= 0.5),
        Row(
            "cached-key decisions per second (1 process, sequential)", f"{rate:,.0f}", "≥ 4,000", rate >= 4000
        ),
        Row("invalid-key rejections per second", f"{bad_rate:,.0f}", "≥ 10,000", bad_rate >= 10000),
        Row("invalid-key rejection p99", f"{percentile(bad_samples, 99) * 1e3:.3f} ms", "—", None),
        Row(f"Argon2 calls for {decisions:,} invalid keys", str(argon_calls), "0", argon_calls == 0),
        Row(
            f"Postgres lookups for {decisions:,} invalid keys",
            f"{lookups} (all statements in the window: {pg_queries}, from the invalidation safety poll)",
            "0",
            lookups == 0,
        ),
    ]


async def _pg_queries(app: web.Application) -> int:
    """Committed transactions in the bench database so far (each query outside a transaction is one)."""
    async with app[POOL].acquire() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )
    # the two statements above are themselves two transactions
    return int(value) - 2


async def _concurrent(
    handle: Callable[[web.Request], Awaitable[web.StreamResponse]],
    requests: Sequence[web.Request],
    workers: int,
) -> float:
    """Requests per second with `workers` decisions in flight at once."""
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            await handle(queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return len(requests) / (time.perf_counter() - start)


def _sidecar_config(services: Services) -> SidecarConfig:
    return load_config(
        SidecarConfig,
        {
            "GATEWAY_DATABASE_URL": services.database_url,
            "GATEWAY_REDIS_URL": services.redis_url,
            "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
            "GATEWAY_GRANT_SECRET": secrets.token_urlsafe(32),
            "GATEWAY_KEY_PEPPER": secrets.token_urlsafe(32),
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_ACCOUNTANT": "off",
        },
    )


async def scenario_limits(services: Services, *, decisions: int) -> list[Row]:
    """/authz in process with every limit configured (one Redis script call per decision), and the
    reservation call alone."""
    config = _sidecar_config(services)
    conn = await asyncpg.connect(asyncpg_dsn(services.database_url))
    big = admin.LimitChange(10**9)
    try:
        tenant = f"limits-{uuid.uuid4().hex[:6]}"
        await admin.create_tenant(conn, name=tenant)
        created = await admin.create_key(conn, tenant=tenant, name="k", pepper=config.hashing.pepper)
        everything = dict.fromkeys(LIMIT_NAMES, big)
        await admin.set_limits(conn, tenant=tenant, limits=everything)
        await admin.set_limits(conn, prefix=created.key.prefix, limits=everything)
    finally:
        await conn.close()
    token = created.token
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        admission = app[ADMISSION]
        for _ in range(500):
            response = await admission.handle(_authz_request(app, token, "10.0.0.1"))
            if response.status != 200:
                raise RuntimeError(f"the bench key was refused: {response.status}")
        samples, elapsed = await _timed(
            admission.handle, [_authz_request(app, token, "10.0.0.1") for _ in range(decisions)]
        )
        rate32 = await _concurrent(
            admission.handle, [_authz_request(app, token, "10.0.0.1") for _ in range(decisions)], 32
        )
        scripts = admission.scripts
        scope = Scope(
            tenant_id=created.key.tenant_id,
            key_id=created.key.id,
            key_limits=Limits(**dict.fromkeys(LIMIT_NAMES, 10**9)),
            tenant_limits=Limits(**dict.fromkeys(LIMIT_NAMES, 10**9)),
            periods=periods_at(time.time(), ZoneInfo("UTC")),
        )
        # The same scope with eight model rules in the grant, one of which covers the model the request
        # names, with every limit: a tenant's rule its key inherits (counted once, at the tenant's
        # scope), or one whose key and tenant limits differ (counted at both).
        everything_limits = Limits(**dict.fromkeys(LIMIT_NAMES, 10**9))
        other_limits = Limits(**dict.fromkeys(LIMIT_NAMES, 10**9 - 1))
        patterns = ("big:*", "small:*", "mid:*", "embed:*", "ns/a:*", "ns/b:*", "x:*", "y:*")
        ruled = attrs.evolve(
            scope,
            rules=tuple(
                ModelRule(normalise_pattern(p), everything_limits, everything_limits) for p in patterns
            ),
            model="big:70b",
        )
        split = attrs.evolve(
            ruled, rules=tuple(ModelRule(r.pattern, other_limits, r.tenant_limits) for r in ruled.rules)
        )
        for with_rules in (ruled, split):
            need = await scripts.reserve(
                with_rules,
                f"hydrate-{uuid.uuid4()}",
                metered=True,
                prompt_bound=1,
                requested_completion=1,
                default_completion=1,
                lease_ttl_ms=1000,
            )
            # The model budget counters start at 0 (the admission's hydration sets them in service).
            for whom, period, pattern in need.missing if isinstance(need, NeedsHydration) else ():
                if pattern is not None:
                    key = scripts.model_budget_key(with_rules, pattern, whom, period)
                    await scripts.redis.set(key, "0")
        reserve_samples: list[float] = []
        ruled_samples: list[float] = []
        split_samples: list[float] = []
        settle_samples: list[float] = []
        rounds = [(scope, reserve_samples), (ruled, ruled_samples), (split, split_samples)]
        for i in range(3 * min(decisions, 5000)):
            who, into = rounds[i % 3]  # interleaved: drift on a busy machine hits all three alike
            request_id = str(uuid.uuid4())
            t0 = time.perf_counter()
            outcome = await scripts.reserve(
                who,
                request_id,
                metered=True,
                prompt_bound=50,
                requested_completion=100,
                default_completion=2048,
                lease_ttl_ms=30_000,
            )
            t1 = time.perf_counter()
            if not isinstance(outcome, Reserved):
                raise RuntimeError(f"the bench reservation was not made: {outcome}")
            await scripts.settle(who, request_id, 60)
            into.append(t1 - t0)
            settle_samples.append(time.perf_counter() - t1)
    finally:
        await runner.cleanup()
    base, one_scope = percentile(reserve_samples, 50), percentile(ruled_samples, 50)
    added = (one_scope / base - 1) * 100
    both = percentile(split_samples, 50)
    added_both = (both / base - 1) * 100
    p99 = percentile(samples, 99) * 1e3
    return [
        Row("decision p50, all limits", f"{percentile(samples, 50) * 1e3:.3f} ms", "—", None),
        Row("decision p99, all limits", f"{p99:.3f} ms", "≤ 1 ms", p99 <= 1.0),
        Row(
            "decisions per second, sequential",
            f"{decisions / elapsed:,.0f}",
            "≥ 3,000",
            decisions / elapsed >= 3000,
        ),
        Row("decisions per second, 32 in flight", f"{rate32:,.0f}", "≥ 3,000", rate32 >= 3000),
        Row("reservation call p50", f"{percentile(reserve_samples, 50) * 1e3:.3f} ms", "—", None),
        Row(
            "reservation call p99",
            f"{percentile(reserve_samples, 99) * 1e3:.3f} ms",
            "≤ 1 ms",
            percentile(reserve_samples, 99) * 1e3 <= 1.0,
        ),
        Row("settle call p99", f"{percentile(settle_samples, 99) * 1e3:.3f} ms", "—", None),
        Row(
            "reservation p50, 1 of 8 model rules applying (tenant's)", f"{one_scope * 1e3:.3f} ms", "—", None
        ),
        Row("a tenant's model rule adds to the reservation's p50", f"{added:+.1f} %", "≤ 20 %", added <= 20),
        Row("reservation p50, the rule's key and tenant limits differ", f"{both * 1e3:.3f} ms", "—", None),
        Row("a rule counted at both scopes adds", f"{added_both:+.1f} %", "—", None),
    ]


@contextlib.contextmanager
def _process(name: str, argv: list[str], port: int, env: dict[str, str], workdir: Path) -> Iterator[int]:
    """A child process for the duration of a scenario; yields its pid."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        localstack.wait_for_port(port, proc=proc)
        yield proc.pid
    finally:
        localstack.terminate(proc)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _stream_once(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, list[float]]:
    """Time to first body byte and the gaps between chunks of one streamed request."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.read())[:200]!r}")
        async for _ in resp.content.iter_any():
            arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - t0, gaps


def _grant_headers(secret: str, tenant_id: int, key_id: int) -> dict[str, str]:
    now = time.time()
    periods = periods_at(now, ZoneInfo("UTC")).names()
    grant = Grant(
        request_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix="benchkey",
        method="POST",
        path="/api/chat",
        expires_at=now + 55,
        metered=True,
        periods={str(k): v for k, v in periods.items()},
    )
    return {"X-Gw-Grant": sign(grant, secret), "Content-Type": "application/json"}


async def scenario_proxy(services: Services, *, decisions: int) -> list[Row]:
    """The stream_proxy hop alone, against the simulator directly, in interleaved rounds."""
    workdir = services.workdir / "proxy"
    secret = secrets.token_urlsafe(32)
    sim_port, proxy_port, floor_port = (localstack.free_port() for _ in range(3))
    sim_url, proxy_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{proxy_port}"
    floor_url = f"http://127.0.0.1:{floor_port}"
    env = {
        "GATEWAY_REDIS_URL": services.redis_url,
        "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
        "GATEWAY_GRANT_SECRET": secret,
        "GATEWAY_OLLAMA_URL": sim_url,
        "GATEWAY_PROXY_PORT": str(proxy_port),
        "GATEWAY_PROXY_DRAIN_SECONDS": "0",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    simulator = [sys.executable, "-m", "ollama_simulator", "--port", str(sim_port)]
    body = orjson.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "Say hi"}]})
    rows: list[Row] = []
    rounds = max(4, decisions // 1000)
    with (
        _process("simulator", simulator, sim_port, dict(localstack.SIMULATOR_ENV), workdir),
        _process(
            "stream_proxy", [sys.executable, "-m", "stream_proxy"], proxy_port, env, workdir
        ) as proxy_pid,
        _process(
            "floor_relay",
            [sys.executable, str(localstack.ROOT / "scripts" / "floor_relay.py"), str(floor_port), sim_url],
            floor_port,
            {},
            workdir,
        ),
    ):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=600)
        ) as session:

            async def settings(**values: object) -> None:
                async with session.post(f"{sim_url}/_sim/settings", json=values) as resp:
                    resp.raise_for_status()

            async def arm(
                direct: bool, concurrency: int, count: int, *, floor: bool = False
            ) -> tuple[list[float], list[float]]:
                ttfb: list[float] = []
                gaps: list[float] = []

                async def one() -> None:
                    url = f"{floor_url if floor else sim_url if direct else proxy_url}/api/chat"
                    plain = direct or floor
                    headers = {"Content-Type": "application/json"} if plain else _grant_headers(secret, 1, 1)
                    first, between = await _stream_once(session, url, body, headers)
                    ttfb.append(first)
                    gaps.extend(between)

                for _ in range(count // concurrency):
                    await asyncio.gather(*(one() for _ in range(concurrency)))
                return ttfb, gaps

            await settings(tokens_per_second=0, time_to_first_token=0, completion_tokens=12)
            for concurrency in (1, 64):
                direct_ttfb: list[float] = []
                proxy_ttfb: list[float] = []
                floor_ttfb: list[float] = []
                per_round = 64 if concurrency == 64 else 100
                await arm(False, concurrency, per_round)  # warm-up
                await arm(False, concurrency, per_round, floor=True)
                for _ in range(rounds):
                    direct_ttfb += (await arm(True, concurrency, per_round))[0]
                    floor_ttfb += (await arm(False, concurrency, per_round, floor=True))[0]
                    proxy_ttfb += (await arm(False, concurrency, per_round))[0]
                for q in (50, 99):
                    floor = (percentile(floor_ttfb, q) - percentile(direct_ttfb, q)) * 1e3
                    rows.append(
                        Row(
                            f"floor: a do-nothing aiohttp relay adds, p{q}, {concurrency} concurrent",
                            f"{floor:.3f} ms",
                            "—",
                            None,
                        )
                    )
                for q, target in ((50, 0.6), (99, 1.5)):
                    added = (percentile(proxy_ttfb, q) - percentile(direct_ttfb, q)) * 1e3
                    rows.append(
                        Row(
                            f"added time to first byte p{q}, {concurrency} concurrent",
                            f"{added:.3f} ms",
                            f"≤ {target} ms",
                            added <= target,
                        )
                    )
            await settings(tokens_per_second=100, completion_tokens=40)
            direct_gaps: list[float] = []
            proxy_gaps: list[float] = []
            for _ in range(rounds):
                direct_gaps += (await arm(True, 8, 16))[1]
                proxy_gaps += (await arm(False, 8, 16))[1]
            added_gap = (percentile(proxy_gaps, 99) - percentile(direct_gaps, 99)) * 1e3
            rows.append(
                Row(
                    "added inter-chunk delay p99 (100 tokens/s)",
                    f"{added_gap:.3f} ms",
                    "≤ 0.5 ms",
                    added_gap <= 0.5,
                )
            )
            await settings(tokens_per_second=2, completion_tokens=16)
            rss_before = _rss_mb(proxy_pid)
            peak = 0.0
            streams = [
                asyncio.create_task(
                    _stream_once(session, f"{proxy_url}/api/chat", body, _grant_headers(secret, 1, 1))
                )
                for _ in range(1000)
            ]
            while not all(t.done() for t in streams):
                peak = max(peak, _rss_mb(proxy_pid))
                await asyncio.sleep(0.25)
            failed = sum(1 for t in streams if t.exception() is not None)
            rows.append(
                Row(
                    "1,000 concurrent slow streams: RSS of stream_proxy (peak)",
                    f"{peak:.0f} MB (idle {rss_before:.0f} MB), {failed} failed",
                    "≤ 200 MB",
                    peak <= 200 and failed == 0,
                )
            )
    return rows


async def _ledger_rows(pool: asyncpg.Pool[asyncpg.Record], key_id: int) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM usage_ledger WHERE key_id = $1", key_id))


async def scenario_accountant(services: Services, *, decisions: int) -> list[Row]:
    """Usage events applied per second by one accountant, and event-to-ledger latency at 500/s."""
    prefix = f"bench:{uuid.uuid4().hex[:6]}:"
    keys = RedisKeys(prefix)
    conn = await asyncpg.connect(asyncpg_dsn(services.database_url))
    tenant = f"acct-{uuid.uuid4().hex[:6]}"
    try:
        owner = await admin.create_tenant(conn, name=tenant)
        key = (await admin.create_key(conn, tenant=tenant, name="k", pepper="p")).key
    finally:
        await conn.close()
    periods = {str(k): v for k, v in periods_at(time.time(), ZoneInfo("UTC")).names().items()}

    def event(finished: float) -> UsageEvent:
        return UsageEvent(
            request_id=str(uuid.uuid4()),
            tenant_id=owner.id,
            key_id=key.id,
            key_prefix=key.prefix,
            endpoint="/api/chat",
            model="llama3.2",
            prompt_tokens=20,
            completion_tokens=12,
            reserved_tokens=0,
            estimated=False,
            estimate_reason=None,
            http_status=200,
            upstream_status=200,
            started_at=finished,
            first_byte_at=finished,
            finished_at=finished,
            bytes_relayed=1000,
            client_disconnected=False,
            periods=periods,
        )

    count = max(decisions, 20_000)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(services.redis_url)
    env = {
        "GATEWAY_DATABASE_URL": services.database_url,
        "GATEWAY_REDIS_URL": services.redis_url,
        "GATEWAY_REDIS_PREFIX": prefix,
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    async with client:
        now = time.time()
        for start in range(0, count, 1000):
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(min(1000, count - start)):
                    pipe.xadd(keys.usage_stream, usage_wire.encode(event(now)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authz_sidecar.accountant", env={**os.environ, **env}
        )
        try:
            pool = await asyncpg.create_pool(asyncpg_dsn(services.database_url), min_size=1, max_size=2)
            try:
                first_row = None
                while True:
                    applied = await _ledger_rows(pool, key.id)
                    if applied and first_row is None:
                        first_row = time.perf_counter()
                        first_applied = applied
                    if applied >= count:
                        break
                    await asyncio.sleep(0.05)
                drained = time.perf_counter()
                rate = (count - first_applied) / max(drained - (first_row or drained), 1e-9)
                # Latency at a steady 500 events per second for 10 seconds.
                await pool.execute("DELETE FROM usage_ledger WHERE key_id = $1", key.id)
                sent = 0
                begin = time.perf_counter()
                while sent < 5000:
                    due = int((time.perf_counter() - begin) * 500)
                    if due > sent:
                        async with client.pipeline(transaction=False) as pipe:
                            for _ in range(due - sent):
                                pipe.xadd(keys.usage_stream, usage_wire.encode(event(time.time())))
                        sent = due
                    await asyncio.sleep(0.01)
                while await _ledger_rows(pool, key.id) < sent:  # noqa: ASYNC110 - polling Postgres
                    await asyncio.sleep(0.05)
                lags = [
                    float(r["lag"])
                    for r in await pool.fetch(
                        "SELECT extract(epoch FROM recorded_at - finished_at) AS lag FROM usage_ledger "
                        "WHERE key_id = $1",
                        key.id,
                    )
                ]
            finally:
                await pool.close()
        finally:
            proc.terminate()
            await proc.wait()
    p99 = percentile(lags, 99)
    return [
        Row(
            f"usage events applied per second ({count:,} queued, 1 process)",
            f"{rate:,.0f}",
            "≥ 5,000",
            rate >= 5000,
        ),
        Row(
            "event written → ledger row p50 at 500 events/s",
            f"{percentile(lags, 50) * 1e3:.0f} ms",
            "—",
            None,
        ),
        Row(
            "event written → ledger row p99 at 500 events/s", f"{p99 * 1e3:.0f} ms", "≤ 1,000 ms", p99 <= 1.0
        ),
    ]


SCENARIOS: dict[str, Callable[..., Awaitable[list[Row]]]] = {
    "proxy": scenario_proxy,
    "accountant": scenario_accountant,
    "sidecar": scenario_sidecar,
    "limits": scenario_limits,
    "bound": bench_bound.scenario_bound,
    "hostile": bench_hostile.scenario_hostile,
    "routing": bench_routing.scenario_routing,
    "redis": bench_redis.scenario_redis,
}


def render(name: str, rows: list[Row], meta: dict[str, str]) -> str:
    """The Markdown section of one scenario."""
    lines = [f"### {name}", "", " · ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    lines += ["| figure | measured | target | met |", "|---|---|---|---|"]
    for row in rows:
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.figure} | {row.value} | {row.target} | {met} |")
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace this scenario's generated block in docs/BENCHMARKS.md (append it if new)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def show(name: str, rows: list[Row]) -> None:
    """The results as a rich table."""
    table = Table(title=f"scenario: {name}")
    for column in ("figure", "measured", "target", "met"):
        table.add_column(column)
    for row in rows:
        met = "—" if row.met is None else ("[green]yes[/]" if row.met else "[red]no[/]")
        table.add_row(row.figure, row.value, row.target, met)
    console.print(table)


@attrs.frozen
class Options:
    """How much to measure."""

    decisions: int = 20_000
    rounds: int = 4
    seconds: float = 2.0
    peers: tuple[str, ...] = ()


async def run(names: Sequence[str], options: Options) -> int:
    """Run the named scenarios (all when none are named)."""
    workdir = localstack.ROOT / ".dev" / f"bench-{os.getpid()}"
    services = Services(workdir)
    with console.status("starting Postgres and Valkey…"):
        services.start()
    failed = 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            http: tuple[bench_http.Bench, bench_http.LoadGenerator] | None = None
            for name in names or [*SCENARIOS, *HTTP_SCENARIOS]:
                meta = {
                    "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                    f"Python {platform.python_version()}",
                    "command": f"`scripts/bench {name}{''.join(' --peer ' + p for p in options.peers)}`",
                }
                extra = ""
                if name in HTTP_SCENARIOS:
                    if http is None:
                        with console.status("starting the local stack and the other arms…"):
                            bench = await stack.enter_async_context(_http_bench(services, options))
                            generator = await bench_http.LoadGenerator().start()
                            stack.push_async_callback(generator.stop)
                        http = (bench, generator)
                    with console.status(f"running {name} ({', '.join(a.name for a in http[0].arms)})…"):
                        outcome = await HTTP_SCENARIOS[name](
                            http[0], http[1], rounds=options.rounds, seconds=options.seconds,
                            charts=DOC.parent / "bench",
                        )  # fmt: skip
                    rows, extra = outcome.rows, outcome.markdown
                    meta.update(outcome.meta)
                else:
                    with console.status(f"running {name}…"):
                        rows = await SCENARIOS[name](services, decisions=options.decisions)
                    meta["samples"] = f"{options.decisions:,}"
                show(name, rows)
                write_section(name, render(name, rows, meta) + (f"\n\n{extra}" if extra else ""))
                failed += sum(1 for r in rows if r.met is False)
    finally:
        services.stop()
    console.print(f"results written to {DOC.relative_to(localstack.ROOT)}")
    return 1 if failed else 0


def _http_bench(
    services: Services, options: Options
) -> contextlib.AbstractAsyncContextManager[bench_http.Bench]:
    stores = {}
    if services.valkey is not None and services.valkey.proc is not None:
        stores["valkey"] = services.valkey.proc.pid
    if services.postgres is not None and services.postgres.pid is not None:
        stores["postgres"] = services.postgres.pid
    return bench_http.Bench(
        services.workdir / "http",
        services.database_url,
        services.redis_url,
        store_pids=stores,
        peers=options.peers,
    ).running()


def main(argv: Sequence[str]) -> int:
    """Entry point."""
    known = [*SCENARIOS, *HTTP_SCENARIOS]
    parser = argparse.ArgumentParser(prog="scripts/bench", description=f"scenarios: {', '.join(known)}")
    parser.add_argument("scenarios", nargs="*", metavar="scenario")
    parser.add_argument("--decisions", type=int, default=20_000, help="samples per in-process measurement")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per HTTP measurement")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per arm per round")
    parser.add_argument(
        "--peer",
        action="append",
        choices=["litellm", "portkey"],
        default=[],
        help="add a peer arm, installed under .dev/ (repeat for both)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in known]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(known)}")
    options = Options(
        decisions=args.decisions, rounds=args.rounds, seconds=args.seconds, peers=tuple(args.peer)
    )
    # SIGTERM unwinds like Ctrl-C, so the scenario's servers and processes are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return asyncio.run(run(args.scenarios, options))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
