"""Several worker processes per service (GATEWAY_SIDECAR_WORKERS=2, GATEWAY_PROXY_WORKERS=2, one
port each shared with SO_REUSEPORT) behind the real Caddy: connections spread over the workers,
limits and budgets stay exact across them (they live in Redis, like replicas'), the ledger matches
what the simulator generated, and SIGTERM to a service stops every worker it forked."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

import localstack
from bench_http import cpu_seconds, process_tree
from shared.db import asyncpg_dsn
from tests.conftest import clone_database
from tests.e2e.test_scale_out import chat, new_key, reset_simulator, send, simulated

pytestmark = pytest.mark.e2e
WORKERS = 2


async def workers_environ(postgres_admin_url: str, template_database: str, name: str) -> dict[str, str]:
    """The environment of a stack whose sidecar and stream_proxy fork WORKERS workers each, on a
    database and Redis prefix of its own (`name`)."""
    database_url = await clone_database(postgres_admin_url, template_database, f"{name}_{os.getpid()}")
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_PREFIX": f"{name}-{uuid.uuid4().hex[:6]}:",
        "GATEWAY_SIDECAR_WORKERS": str(WORKERS),
        "GATEWAY_PROXY_WORKERS": str(WORKERS),
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    return environ


@pytest.fixture(scope="module")
async def workers_stack(
    work_dir: Path, postgres_admin_url: str, template_database: str
) -> AsyncIterator[localstack.LocalStack]:
    """One sidecar and one stream_proxy, each forking two workers, on a database of their own."""
    environ = await workers_environ(postgres_admin_url, template_database, "workers")
    environ["GATEWAY_GRANT_SECRET"] = secrets.token_urlsafe(32)
    environ["GATEWAY_KEY_PEPPER"] = secrets.token_urlsafe(32)
    stack = localstack.LocalStack(work_dir / "workers", environ=environ)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def alive(pid: int) -> bool:
    """Whether a process still exists (a supervisor reaps its workers before it exits)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def workers_of(stack: localstack.LocalStack, service: str) -> list[int]:
    """The worker processes a service's supervisor forked."""
    return [pid for pid in process_tree(stack.pids()[service]) if pid != stack.pids()[service]]


async def test_each_service_runs_its_workers_and_connections_reach_all_of_them(
    workers_stack: localstack.LocalStack,
) -> None:
    """Two workers under each supervisor; 300 requests from 24 connections through Caddy are all
    answered, and every worker of both services spent CPU on them (the kernel spread Caddy's
    upstream connections over the port's listeners)."""
    stack = workers_stack
    token, _ = await new_key(stack)
    workers = {name: workers_of(stack, name) for name in ("authz_sidecar", "stream_proxy")}
    assert {name: len(pids) for name, pids in workers.items()} == {
        "authz_sidecar": WORKERS,
        "stream_proxy": WORKERS,
    }
    before = {pid: cpu_seconds(pid) for pids in workers.values() for pid in pids}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=24)) as http:
        await reset_simulator(http, stack, tokens_per_second=0)
        statuses = await asyncio.gather(*(send(http, stack, token, chat(f"hi {n}")) for n in range(300)))
    assert Counter(statuses) == {200: 300}
    busy = {pid: cpu_seconds(pid) - before[pid] for pid in before}
    assert all(spent > 0 for spent in busy.values()), busy


async def test_an_rpm_limit_is_exact_across_workers(workers_stack: localstack.LocalStack) -> None:
    """RPM 10 on the key, 40 requests at once (spread over both workers of both services): exactly
    10 are served, 30 refused with 429."""
    stack = workers_stack
    token, _ = await new_key(stack, rpm=10)
    async with aiohttp.ClientSession() as http:
        await reset_simulator(http, stack, tokens_per_second=0)
        statuses = await asyncio.gather(*(send(http, stack, token, chat(f"q {n}")) for n in range(40)))
    assert Counter(statuses) == {200: 10, 429: 30}


async def test_a_daily_budget_is_never_overshot_across_workers_and_the_ledger_matches(
    workers_stack: localstack.LocalStack,
) -> None:
    """A daily budget of 3,000 tokens, 40 concurrent streams asking for 200 tokens each: what the
    simulator generated for this key stays within the budget, and the ledger holds exactly that,
    one row per served stream."""
    stack = workers_stack
    token, tenant_id = await new_key(stack, daily_tokens=3000)
    async with aiohttp.ClientSession() as http:
        await reset_simulator(http, stack, tokens_per_second=400, completion_tokens=200)
        statuses = await asyncio.gather(
            *(send(http, stack, token, chat(f"s {n}", stream=True, num_predict=200)) for n in range(40))
        )
        served = statuses.count(200)
        assert served >= 1
        assert set(statuses) <= {200, 429}, Counter(statuses)
        records = [r for r in await simulated(http, stack, served) if r["path"] == "/api/chat"]
    assert len(records) == served
    generated = sum(r["generation"]["prompt_tokens"] + r["generation"]["completion_tokens"] for r in records)
    assert generated <= 3000
    conn = await asyncpg.connect(asyncpg_dsn(stack.env["GATEWAY_DATABASE_URL"]))
    try:
        deadline = time.monotonic() + 15
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens"
                " FROM usage_ledger WHERE tenant_id = $1 AND http_status = 200",
                tenant_id,
            )
            assert row is not None
            if row["n"] >= served or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert (row["n"], row["tokens"]) == (served, generated)


async def test_sigterm_to_a_supervisor_stops_every_worker(
    work_dir: Path, postgres_admin_url: str, template_database: str
) -> None:
    """A stack of its own: SIGTERM to each supervisor ends it and both its workers, exit code 0."""
    environ = await workers_environ(postgres_admin_url, template_database, "workers_stop")
    stack = localstack.LocalStack(work_dir / "workers-stop", environ=environ)
    stack.start()
    try:
        for name in ("authz_sidecar", "stream_proxy"):
            service = next(s for s in stack.services if s.name == name)
            forked = workers_of(stack, name)
            assert len(forked) == WORKERS
            service.proc.send_signal(signal.SIGTERM)
            assert service.proc.wait(20) == 0
            assert [pid for pid in forked if alive(pid)] == []
    finally:
        stack.stop()
