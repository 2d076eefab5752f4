"""The e2e stack: the real local stack (Caddy, sidecar, stream_proxy, simulator) started once per
test session on the session's Postgres and Valkey, plus a factory for tenants and keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import secrets
import time
import uuid
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import ollama
import openai
import orjson
import pytest

import localstack
from shared import admin, keys
from shared.config import ProxyConfig, load_config
from shared.db import asyncpg_dsn
from shared.grant import Grant
from shared.hashing import Argon2Params
from shared.models import Limits
from shared.periods import periods_at
from stream_proxy import apis
from stream_proxy.backends import USER_AGENT as CATALOGUE
from stream_proxy.models import facts_from_show
from stream_proxy.prompt_bound import prompt_bound as bound_of
from tests import secret_scan
from tests.conftest import clone_database

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
    ollama_urls: str = ""  # GATEWAY_OLLAMA_URLS when the stack has several simulated backends
    caddy_admin_url: str = ""


@pytest.fixture(scope="session")
async def stack(
    work_dir: Path,
    postgres_admin_url: str,
    template_database: str,
    redis_url: str,
    secret_canary: secret_scan.Canary,
) -> AsyncIterator[Stack]:
    """Start the whole gateway once for the e2e tests (with the canary secrets, and the canary key
    used once, for the end-of-session secret scan)."""
    database_url = await clone_database(postgres_admin_url, template_database, f"e2e_{os.getpid()}")
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": f"e2e:{uuid.uuid4().hex[:8]}:",
        "GATEWAY_LOG_LEVEL": "INFO",
        # 1 MiB: a listing the simulator can make larger (tests/e2e/test_bounded.py); no other answer
        # an e2e test asks for comes near it.
        "GATEWAY_MAX_UPSTREAM_BODY_BYTES": str(1024 * 1024),
        # Prompt logs cut at 4 KiB (tests/e2e/test_prompt_logs.py); the canary's prompts are shorter.
        "GATEWAY_PROMPT_LOG_MAX_BYTES": "4096",
        # Canary secrets: the scan at the end of the session fails if any log line or audit row holds them.
        "GATEWAY_GRANT_SECRET": secret_canary.grant_secret,
        "GATEWAY_KEY_PEPPER": secret_canary.pepper,
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    local = localstack.LocalStack(work_dir / "e2e", environ=environ).start()
    try:
        await use_canary_key(local.urls, secret_canary)
        yield Stack(**local.urls, env=dict(local.env), logs=local.workdir)
    finally:
        local.stop()


# --- the canary key (tests/secret_scan.py) -----------------------------------------------------------
# Created on the e2e stack and sent through Caddy right and wrong, in the places clients put keys,
# so its text has every chance to reach a log or an audit row. From 127.0.0.2: the failed
# authentications count against an address no test uses. Rights: prompt logging on (so its prompts
# are stored and searched too) and 6 requests a minute (so it is also refused over its limit).

CANARY_TENANT = "secret-canary"
CANARY_SOURCE = "127.0.0.2"


def _one_char_off(token: str) -> str:
    """The key with the last character of its random part changed: well-formed but failing the checksum."""
    at = len(keys.KEY_SCHEME) + keys.PREFIX_LEN + keys.RANDOM_LEN - 1
    swapped = keys.ALPHABET[(keys.ALPHABET.index(token[at]) + 1) % len(keys.ALPHABET)]
    return token[:at] + swapped + token[at + 1 :]


def _same_prefix_other_secret(token: str) -> str:
    """A key with the canary's prefix, one random character changed and a valid checksum: it reaches
    the Argon2 verification and fails it."""
    body = _one_char_off(token)[
        len(keys.KEY_SCHEME) : len(keys.KEY_SCHEME) + keys.PREFIX_LEN + keys.RANDOM_LEN
    ]
    return keys.KEY_SCHEME + body + keys.checksum(body)


async def use_canary_key(urls: dict[str, str], canary: secret_scan.Canary) -> None:
    """Create the canary key and send it: valid (native and OpenAI, streaming or not, blocked
    endpoint, over its rate limit) and wrong or misplaced (one character off, other secret, cut
    short, no scheme, Basic, twice, in `api-key` / `X-Api-Key` headers, in the query string)."""
    conn = await asyncpg.connect(asyncpg_dsn(urls["database_url"]))
    try:
        await admin.create_tenant(conn, name=CANARY_TENANT)
        created = await admin.create_key(
            conn, tenant=CANARY_TENANT, name="canary", pepper=canary.pepper, params=TEST_ARGON2
        )
        await admin.set_limits(conn, prefix=created.key.prefix, limits={"rpm": admin.parse_limit("rpm", "6")})
        await admin.set_prompt_logging(conn, prefix=created.key.prefix, on=True, ttl=dt.timedelta(days=1))
    finally:
        await conn.close()
    key = created.token
    canary.key = key
    gateway = urls["gateway_url"]
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "canary says hello"}]}
    bearer = {"Authorization": f"Bearer {key}"}
    off, other = _one_char_off(key), _same_prefix_other_secret(key)
    basic = base64.b64encode(f"{key}:".encode()).decode()
    v1, native = "/v1/chat/completions", "/api/chat"
    # (case, method, path, body, headers, True if it must be answered 2xx, else 4xx)
    cases: list[tuple[str, str, str, dict[str, Any], dict[str, str], bool]] = [
        ("native", "POST", native, {**chat, "stream": False}, bearer, True),
        ("native stream", "POST", native, chat, bearer, True),
        ("openai stream", "POST", v1, {**chat, "stream": True}, bearer, True),
        ("openai, key in query too", "POST", f"{v1}?key={key}&api_key={key}", chat, bearer, True),
        ("tags, key in query too", "GET", f"/api/tags?key={key}", {}, bearer, True),
        ("blocked endpoint", "POST", "/api/pull", {"model": "llama3.2"}, bearer, False),
        ("one char off", "POST", native, chat, {"Authorization": f"Bearer {off}"}, False),
        ("other secret", "POST", native, chat, {"Authorization": f"Bearer {other}"}, False),
        ("cut short", "POST", native, chat, {"Authorization": f"Bearer {key[:-1]}"}, False),
        ("no scheme", "POST", native, chat, {"Authorization": key}, False),
        ("basic", "POST", v1, chat, {"Authorization": f"Basic {basic}"}, False),
        ("api-key headers", "POST", v1, chat, {"api-key": key, "X-Api-Key": key}, False),
        ("query only", "POST", f"{native}?key={key}", chat, {}, False),
        ("openai query only", "POST", f"{v1}?api_key={key}", chat, {}, False),
    ]
    connector = aiohttp.TCPConnector(local_addr=(CANARY_SOURCE, 0))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def send(
            case: str, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
        ) -> int:
            data = orjson.dumps(body) if body else None
            async with http.request(method, gateway + path, data=data, headers=headers) as resp:
                await resp.read()
                canary.statuses[f"{case}: {resp.status}"] += 1
                return resp.status

        wrong = []
        for case, method, path, body, headers, ok in cases:
            status = await send(case, method, path, body, headers)
            if ok != (200 <= status < 300) or status >= 500:
                wrong.append(f"{case}: {status}")
        twice = [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")]
        async with http.post(gateway + native, data=orjson.dumps(chat), headers=twice) as resp:
            canary.statuses[f"twice: {resp.status}"] += 1
        # Over the rate limit: the refusal names the key's prefix in the sidecar's log and the audit log.
        for _ in range(10):
            if await send("over the limit", "POST", native, {**chat, "stream": False}, bearer) == 429:
                break
        else:
            wrong.append("over the limit: never 429")
    if wrong:
        raise RuntimeError(f"the canary key's requests were not answered as expected: {wrong}")


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
        """Every request recorded since the last reset, but stream_proxy's model-catalogue polls."""
        async with self.http.get(f"{self.url}/_sim/requests", params={"ignore_agent": CATALOGUE}) as resp:
            resp.raise_for_status()
            records: list[dict[str, Any]] = await resp.json()
            return records

    async def settings(self, **changes: Any) -> None:
        """Change simulator settings at runtime."""
        async with self.http.post(f"{self.url}/_sim/settings", json=changes) as resp:
            resp.raise_for_status()


# --- helpers several e2e files share ---------------------------------------------------------


@pytest.fixture
async def stack_db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the running stack's database (revoking, suspending, reading the ledger)."""
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        yield conn
    finally:
        await conn.close()


def openai_client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    """The official openai client on the gateway, without retries (a retry would hide a 429)."""
    return openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0)


@contextlib.asynccontextmanager
async def ollama_client(stack: Stack, key: str) -> AsyncIterator[ollama.AsyncClient]:
    """The official ollama client on the gateway with the key, closed afterwards."""
    client = ollama.AsyncClient(host=stack.gateway_url, headers={"Authorization": f"Bearer {key}"})
    try:
        yield client
    finally:
        await client.close()  # type: ignore[no-untyped-call]  # ollama 0.6.3 leaves close() unannotated


def forged_key(prefix: str) -> str:
    """A well-formed key (valid checksum) for `prefix` with a random secret."""
    random_part = "".join(secrets.choice(keys.ALPHABET) for _ in range(keys.RANDOM_LEN))
    return keys.KEY_SCHEME + prefix + random_part + keys.checksum(prefix + random_part)


def sent_bytes(record: dict[str, Any]) -> bytes:
    """The exact bytes the simulator wrote back for one request."""
    return base64.b64decode(record["response_base64"])


async def key_ids(conn: asyncpg.Connection, token: str) -> tuple[int, int]:
    """(tenant id, key id) of a key made by make_key."""
    row = await conn.fetchrow(
        "SELECT id, tenant_id FROM api_keys WHERE prefix = $1", keys.parse_key(token).prefix
    )
    assert row is not None
    return int(row["tenant_id"]), int(row["id"])


async def finished_records(
    http: aiohttp.ClientSession, stack: Stack, count: int, *, wait_seconds: float = 10.0
) -> list[dict[str, Any]]:
    """The simulator's records once `count` requests have finished (the simulator bounds the wait),
    stream_proxy's model-catalogue polls left out."""
    url = f"{stack.ollama_url}/_sim/requests"
    query = {"wait_finished": str(count), "timeout": f"{wait_seconds:g}", "ignore_agent": CATALOGUE}
    async with http.get(url, params=query) as resp:
        assert resp.status == 200, await resp.text()
        records: list[dict[str, Any]] = await resp.json()
        return records


async def prompt_bound(
    stack: Stack, http: aiohttp.ClientSession, body: dict[str, Any], route: Any = "chat"
) -> int:
    """The prompt bound stream_proxy reserves for a body: its own computation from the model's
    /api/show answer (the clamp arithmetic is what these tests pin; whether the bound itself holds
    is pinned against the simulator's record in test_zero_overshoot.py)."""
    options = load_config(ProxyConfig, stack.env).options
    ask = {"model": body["model"]}
    headers = {"User-Agent": CATALOGUE}  # asked as the catalogue asks: not one of the test's requests
    async with http.post(f"{stack.ollama_url}/api/show", json=ask, headers=headers) as resp:
        facts = facts_from_show(await resp.json(), None)
    size = apis.adapter(route).prompt(route, body)
    return bound_of(route, body, size, facts, fallback_context=options.fallback_context_tokens)


async def ledger_rows(
    conn: asyncpg.Connection, key: str, count: int, *, wait_seconds: float = 10.0, status: int | None = None
) -> list[asyncpg.Record]:
    """The key's ledger rows (oldest first; only those of one HTTP status when given) once there
    are `count` of them; exactly `count`."""
    _, key_id = await key_ids(conn, key)
    deadline = time.monotonic() + wait_seconds
    query = "SELECT * FROM usage_ledger WHERE key_id = $1 AND ($2::int IS NULL OR http_status = $2)"
    while True:
        rows = await conn.fetch(query + " ORDER BY finished_at", key_id, status)
        if len(rows) >= count or time.monotonic() > deadline:
            assert len(rows) == count, [dict(r) for r in rows]
            return list(rows)
        await asyncio.sleep(0.05)


def chat_grant(
    tenant_id: int, key_id: int, token: str, request_id: str, limits: Limits | None = None
) -> Grant:
    """A metered grant for POST /api/chat as the sidecar would issue it (50 s to live, this UTC day's
    periods), for tests that talk to a stream_proxy of their own."""
    now = time.time()
    periods = periods_at(now, zoneinfo.ZoneInfo("UTC")).names()
    return Grant(
        request_id=request_id,
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix=keys.parse_key(token).prefix,
        method="POST",
        path="/api/chat",
        expires_at=now + 50,
        metered=True,
        key_limits=limits or Limits(),
        periods={str(k): v for k, v in periods.items()},
    )
