"""The e2e stack: the real local stack (Caddy, sidecar, stream_proxy, simulator) started once per
test session on the session's Postgres and Valkey, plus a factory for tenants and keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import pytest

import localstack
from shared import admin
from shared.db import asyncpg_dsn
from shared.hashing import Argon2Params

KeyFactory = Callable[..., Awaitable[str]]
# Cheap hashing for the many keys tests create; production parameters are pinned in unit tests.
TEST_ARGON2 = Argon2Params(memory_kib=1024, time_cost=1, parallelism=1)


@attrs.frozen
class Stack:
    """URLs and settings of the running e2e stack."""

    gateway_url: str
    sidecar_url: str
    proxy_url: str
    ollama_url: str
    database_url: str
    redis_url: str
    env: dict[str, str]
    logs: Path


@pytest.fixture(scope="session")
async def stack(
    work_dir: Path, postgres_admin_url: str, template_database: str, redis_url: str
) -> AsyncIterator[Stack]:
    """Start the whole gateway once for the e2e tests."""
    name = f"e2e_{os.getpid()}"
    conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    base = postgres_admin_url.rsplit("/", 1)[0]
    query = "?" + postgres_admin_url.split("?", 1)[1] if "?" in postgres_admin_url else ""
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": f"{base}/{name}{query}",
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": f"e2e:{uuid.uuid4().hex[:8]}:",
        "GATEWAY_LOG_LEVEL": "INFO",
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    local = localstack.LocalStack(work_dir / "e2e", environ=environ).start()
    try:
        yield Stack(**local.urls, env=dict(local.env), logs=local.workdir)
    finally:
        local.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client with no total timeout (streams) but a bounded read."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60, sock_read=30), auto_decompress=False
    ) as session:
        yield session


@pytest.fixture
async def make_key(stack: Stack) -> AsyncIterator[KeyFactory]:
    """Create a tenant (unique name unless given) and a key on it; returns the full token."""
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))

    async def factory(tenant: str | None = None, **limits: Any) -> str:
        tenant_name = tenant or f"t-{uuid.uuid4().hex[:10]}"
        existing = {t.name for t, _ in await admin.list_tenants(conn)}
        if tenant_name not in existing:
            await admin.create_tenant(conn, name=tenant_name)
        created = await admin.create_key(
            conn,
            tenant=tenant_name,
            name=f"k-{uuid.uuid4().hex[:8]}",
            pepper=stack.env["GATEWAY_KEY_PEPPER"],
            params=TEST_ARGON2,
        )
        if limits:
            await admin.set_limits(
                conn,
                prefix=created.key.prefix,
                limits={n: admin.parse_limit(n, str(v)) for n, v in limits.items() if n != "models"},
                models=admin.parse_models(limits["models"]) if "models" in limits else None,
            )
        return created.token

    try:
        yield factory
    finally:
        await conn.close()


@pytest.fixture
async def simulator(stack: Stack, http: aiohttp.ClientSession) -> SimulatorControl:
    """The simulator's control API, reset before each test."""
    control = SimulatorControl(stack.ollama_url, http)
    await control.reset()
    return control


@attrs.frozen
class SimulatorControl:
    """Read what reached the simulator; change its settings."""

    url: str
    http: aiohttp.ClientSession

    async def reset(self) -> None:
        """Forget recorded requests and restore default settings."""
        async with self.http.post(f"{self.url}/_sim/reset") as resp:
            resp.raise_for_status()

    async def requests(self) -> list[dict[str, Any]]:
        """Every request recorded since the last reset."""
        async with self.http.get(f"{self.url}/_sim/requests") as resp:
            resp.raise_for_status()
            records: list[dict[str, Any]] = await resp.json()
            return records

    async def settings(self, **changes: Any) -> None:
        """Change simulator settings at runtime."""
        async with self.http.post(f"{self.url}/_sim/settings", json=changes) as resp:
            resp.raise_for_status()
