"""Deploys without errors (docs/DEPLOYMENT.md): a stream_proxy told to stop keeps serving while its
/readyz is 503, for GATEWAY_PROXY_DRAIN_SECONDS, so a request Caddy still sends it in that time is
answered, not refused; the default drain outlasts Caddy's health checks of it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import uuid

import aiohttp
import asyncpg
import pytest

import localstack
from shared.config import ProxyOptions
from shared.db import asyncpg_dsn
from shared.grant import sign
from tests.e2e.conftest import KeyFactory, Stack, chat_grant

pytestmark = pytest.mark.e2e

BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def _seconds(text: str) -> float:
    value = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text)
    assert value is not None, text
    return float(value[1]) / (1000 if value[2] == "ms" else 1)


def test_the_default_drain_outlasts_caddys_health_checks() -> None:
    """Caddy stops sending to a stream_proxy after `health_fails` failed health checks in a row, at
    most health_fails x health_interval + health_timeout after the drain starts: the default drain
    is longer."""
    text = (localstack.ROOT / "caddy" / "Caddyfile").read_text()
    interval = _seconds(re.findall(r"health_interval\s+(\S+)", text)[0])
    timeout = _seconds(re.findall(r"health_timeout\s+(\S+)", text)[0])
    fails = int((re.findall(r"health_fails\s+(\d+)", text) or ["1"])[0])
    assert ProxyOptions().drain_seconds > fails * interval + timeout


async def test_a_draining_stream_proxy_still_serves_what_reaches_it(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory
) -> None:
    """SIGTERM to a stream_proxy with a 3 s drain: /readyz turns 503 at once, a request that
    reaches it during the drain is served (200), and the process exits after the drain."""
    token = await make_key()
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        key = await conn.fetchrow("SELECT id, tenant_id FROM api_keys WHERE prefix = $1", token[3:11])
    finally:
        await conn.close()
    assert key is not None
    port = localstack.free_port()
    env = {**os.environ, **stack.env, "GATEWAY_PROXY_PORT": str(port), "GATEWAY_PROXY_DRAIN_SECONDS": "3"}
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_proxy", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(localstack.wait_for_port, port, 20.0)
        proxy.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await asyncio.sleep(0.3)
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 503
        grant = chat_grant(key["tenant_id"], key["id"], token, f"drain-{uuid.uuid4().hex[:8]}")
        headers = {"X-Gw-Grant": sign(grant, stack.env["GATEWAY_GRANT_SECRET"])}
        async with http.post(f"http://127.0.0.1:{port}/api/chat", json=BODY, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        assert time.monotonic() - stopped_at < 3
        async with asyncio.timeout(20):
            await proxy.wait()
    finally:
        if proxy.returncode is None:
            proxy.kill()
            await proxy.wait()
