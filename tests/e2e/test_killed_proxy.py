"""A stream_proxy killed mid-stream: its reservation is charged once, flagged estimated, after the
lease expires (docs/ARCHITECTURE.md#failure-behaviour), by the accountant embedded in the stack's sidecar."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid

import aiohttp
import asyncpg
import coredis
import pytest

import localstack
from shared.db import asyncpg_dsn
from shared.grant import sign
from shared.limits import LimitScripts
from shared.models import Limits
from shared.redis_keys import RedisKeys
from stream_proxy.proxy import scope_of
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, chat_grant

pytestmark = pytest.mark.e2e

BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "Tell me a long story"}]}


async def _wait_for(query: str, conn: asyncpg.Connection, *args: object, seconds: float) -> asyncpg.Record:
    deadline = time.monotonic() + seconds
    while True:
        row = await conn.fetchrow(query, *args)
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"nothing after {seconds} s: {query}"
            return row
        await asyncio.sleep(0.2)


async def test_killed_stream_proxy_reservation_is_charged_once_after_the_lease(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """SIGKILL a stream_proxy while it relays a slow stream: no usage event is ever written, so the
    accountant's sweeper charges the whole reservation once the lease has expired: one ledger row
    flagged estimated with reason `lease_expired` and tokens = the reservation, and the Redis budget
    counter keeps exactly those reserved tokens."""
    token = await make_key(total_tokens=100_000)
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        key = await conn.fetchrow("SELECT id, tenant_id FROM api_keys WHERE prefix = $1", token[3:11])
        assert key is not None
        # One request through the gateway hydrates the key's budget counter.
        async with http.post(
            f"{stack.gateway_url}/api/chat",
            json={**BODY, "stream": False},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200
        await simulator.settings(tokens_per_second=5, completion_tokens=200)
        port = localstack.free_port()
        env = {**os.environ, **stack.env, "GATEWAY_PROXY_PORT": str(port), "GATEWAY_LEASE_TTL": "1",
               "GATEWAY_PROXY_DRAIN_SECONDS": "0"}  # fmt: skip
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_proxy", env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await asyncio.to_thread(localstack.wait_for_port, port, 20.0)
            request_id = f"killed-{uuid.uuid4().hex[:8]}"
            grant = chat_grant(key["tenant_id"], key["id"], token, request_id, Limits(total_tokens=100_000))
            signed = sign(grant, stack.env["GATEWAY_GRANT_SECRET"])
            async with http.post(
                f"http://127.0.0.1:{port}/api/chat", json=BODY, headers={"X-Gw-Grant": signed}
            ) as resp:
                assert resp.status == 200
                await resp.content.readline()
                await resp.content.readline()
                proxy.send_signal(signal.SIGKILL)
                await proxy.wait()
        finally:
            if proxy.returncode is None:
                proxy.kill()
                await proxy.wait()
        row = await _wait_for(
            "SELECT estimated, estimate_reason, prompt_tokens, completion_tokens, reserved_tokens "
            "FROM usage_ledger WHERE request_id = $1",
            conn,
            request_id,
            seconds=40,
        )
        assert row["estimated"] is True
        assert row["estimate_reason"] == "lease_expired"
        assert row["reserved_tokens"] > 0
        assert row["prompt_tokens"] + row["completion_tokens"] == row["reserved_tokens"]
        count = await conn.fetchval("SELECT count(*) FROM usage_ledger WHERE request_id = $1", request_id)
        assert count == 1
        total = await conn.fetchval("SELECT sum(total_tokens) FROM usage_ledger WHERE key_id = $1", key["id"])
    finally:
        await conn.close()
    client: coredis.Redis[bytes] = coredis.Redis.from_url(stack.redis_url)
    async with client:
        scripts = LimitScripts(client, RedisKeys(stack.env["GATEWAY_REDIS_PREFIX"]))
        counter = await client.get(scripts.budget_key(scope_of(grant), "key", "total"))
    assert counter is not None
    assert int(counter) == total
