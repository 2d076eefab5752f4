"""`scripts/bench`: the gateway's performance record, regenerated into docs/BENCHMARKS.md.

Each scenario starts what it needs (embedded Postgres and Valkey, or GATEWAY_DATABASE_URL /
GATEWAY_REDIS_URL), measures, prints a rich table and rewrites its own section of
docs/BENCHMARKS.md between generated markers. Speed goals are proven here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import attrs
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from rich.console import Console
from rich.table import Table

import localstack
from authz_sidecar.app import ADMISSION, AUTHENTICATOR, POOL, create_app
from shared import admin, keys
from shared.config import SidecarConfig, load_config
from shared.db import asyncpg_dsn
from shared.limits import Scope
from shared.models import LIMIT_NAMES, Limits
from shared.periods import periods_at

DOC = localstack.ROOT / "docs" / "BENCHMARKS.md"
console = Console(highlight=False)


@attrs.frozen
class Row:
    """One measured figure beside its target."""

    figure: str
    value: str
    target: str
    met: bool | None


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


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
            "X-Forwarded-For": address,
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
        reserve_samples: list[float] = []
        settle_samples: list[float] = []
        for _ in range(min(decisions, 5000)):
            request_id = str(uuid.uuid4())
            t0 = time.perf_counter()
            await scripts.reserve(scope, request_id, metered=True, prompt_bound=50, requested_completion=100,
                                  default_completion=2048, lease_ttl_ms=30_000)  # fmt: skip
            t1 = time.perf_counter()
            await scripts.settle(scope, request_id, 60)
            reserve_samples.append(t1 - t0)
            settle_samples.append(time.perf_counter() - t1)
    finally:
        await runner.cleanup()
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
    ]


SCENARIOS: dict[str, Callable[..., Awaitable[list[Row]]]] = {
    "sidecar": scenario_sidecar,
    "limits": scenario_limits,
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


async def run(names: Sequence[str], decisions: int) -> int:
    """Run the named scenarios (all when none are named)."""
    workdir = localstack.ROOT / ".dev" / f"bench-{os.getpid()}"
    services = Services(workdir)
    with console.status("starting Postgres and Valkey…"):
        services.start()
    failed = 0
    try:
        for name in names or list(SCENARIOS):
            with console.status(f"running {name}…"):
                rows = await SCENARIOS[name](services, decisions=decisions)
            show(name, rows)
            meta = {
                "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                f"Python {platform.python_version()}",
                "command": f"`scripts/bench {name}`",
                "samples": f"{decisions:,}",
            }
            write_section(name, render(name, rows, meta))
            failed += sum(1 for r in rows if r.met is False)
    finally:
        services.stop()
    console.print(f"results written to {DOC.relative_to(localstack.ROOT)}")
    return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="scripts/bench")
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], metavar="scenario")
    parser.add_argument("--decisions", type=int, default=20_000, help="samples per measurement")
    args = parser.parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return asyncio.run(run(args.scenarios, args.decisions))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
