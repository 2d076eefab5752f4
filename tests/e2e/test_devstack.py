"""`scripts/dev up --detach` / `status` / `down`: the one-command local stack."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

import localstack

pytestmark = pytest.mark.e2e

FIELDS = {"gateway_url", "sidecar_url", "proxy_url", "ollama_url", "database_url", "redis_url", "demo_key"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


async def _dev(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(localstack.ROOT / "scripts" / "devstack.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_up_detach_serves_the_demo_key_and_down_leaves_nothing(
    work_dir: Path, http: aiohttp.ClientSession
) -> None:
    """`up --detach` returns once everything answers and writes stack.json with every URL and the
    demo key; the demo key streams a chat through Caddy; `down` stops every process it started,
    Postgres and Valkey included."""
    stack_file = work_dir / "devstack" / "stack.json"
    env = {
        **os.environ,
        "GATEWAY_STACK_FILE": str(stack_file),
        "GATEWAY_SIM_TOKENS_PER_SECOND": "0",
        "COLUMNS": "200",
    }
    for name in ("GATEWAY_DATABASE_URL", "GATEWAY_REDIS_URL", "GATEWAY_OLLAMA_URL"):
        env.pop(name, None)
    started = await _dev(env, "up", "--detach")
    assert started.returncode == 0, started.stdout + started.stderr
    state = orjson.loads(stack_file.read_bytes())
    try:
        assert set(state) >= FIELDS
        assert state["demo_key"] in started.stdout
        status = await _dev(env, "status")
        assert status.returncode == 0, status.stdout
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {state['demo_key']}"}
        async with http.post(f"{state['gateway_url']}/api/chat", json=body, headers=headers) as resp:
            assert resp.status == 200
            lines = (await resp.read()).splitlines()
        assert b'"done":true' in lines[-1]
    finally:
        stopped = await _dev(env, "down")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    pids = list(state["pids"].values())
    assert sorted(state["pids"]) == ["authz_sidecar", "caddy", "simulator", "stream_proxy", "valkey"]
    assert [pid for pid in pids if _alive(pid)] == []
    postmaster = Path(state["pgdata"]) / "postmaster.pid"
    assert not postmaster.exists()
    assert not stack_file.exists()
