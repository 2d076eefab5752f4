"""Key and tenant changes made with the real admin CLI reach two real sidecar processes within one
second: over Redis pub/sub, and over the Postgres poll when the pub/sub notice never arrives."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import asyncpg
import attrs
import coredis
import pytest
from prometheus_client.parser import text_string_to_metric_families

import localstack
from shared import admin
from shared import grant as grants
from shared.hashing import Argon2Params
from shared.redis_keys import RedisKeys

pytestmark = pytest.mark.integration

PEPPER = "invalidation-test-pepper-0123456789abcdef0123456789"
GRANT_SECRET = "invalidation-test-grant-secret-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=1024, time_cost=1, parallelism=1)
CLI = [str(Path(sys.executable).parent / "neuronetz-gateway")]
PROPAGATION_SECONDS = 1.0
POLL_SECONDS = 0.02
START_SECONDS = 20.0
WAIT_SECONDS = 5.0


@attrs.frozen
class Process:
    """One running `python -m authz_sidecar`."""

    proc: subprocess.Popen[bytes]
    port: int

    def url(self, path: str) -> str:
        """A URL on this sidecar."""
        return f"http://127.0.0.1:{self.port}{path}"


@attrs.frozen
class Stack:
    """Two sidecar processes sharing one database and one Redis prefix, plus the CLI's environment."""

    sidecars: tuple[Process, Process]
    session: aiohttp.ClientSession
    env: Mapping[str, str]

    async def authz(
        self, sidecar: Process, token: str, uri: str = "/api/chat"
    ) -> tuple[int, str | None, bytes]:
        """Status, grant and body of one forward_auth call."""
        headers = {
            "X-Forwarded-Method": "POST",
            "X-Forwarded-Uri": uri,
            "X-Gw-Client-Ip": "198.51.100.7",
            "X-Request-Id": secrets.token_hex(16),
            "Authorization": f"Bearer {token}",
        }
        async with self.session.get(sidecar.url("/authz"), headers=headers) as resp:
            body = await resp.read()
            return resp.status, resp.headers.get("X-Gw-Grant"), body

    async def cli(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        """Run the admin CLI to completion; it must succeed without warnings."""
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            *args,
            env={**self.env, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert err == b"", err.decode()
        assert out

    async def subscribed(self, sidecar: Process) -> bool:
        """The sidecar's own gauge: subscribed to the invalidation channel."""
        async with self.session.get(sidecar.url("/metrics")) as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "authz_invalidation_subscribed":
                    return sample.value == 1
        return False


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Poll every 20 ms until `check()`; fail after `seconds`. Returns the time it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(POLL_SECONDS)
    return loop.time() - started


def start_sidecar(env: Mapping[str, str], log: Path) -> Process:
    """Spawn one sidecar on a free port, logging to a file."""
    port = localstack.free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz_sidecar"],
            env={**env, "GATEWAY_SIDECAR_PORT": str(port)},
            cwd=localstack.ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Process(proc, port)


def stop_sidecar(sidecar: Process) -> None:
    """SIGTERM, then SIGKILL if it does not exit."""
    if sidecar.proc.poll() is None:
        sidecar.proc.terminate()
        try:
            sidecar.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if shutdown hangs
            sidecar.proc.kill()
            sidecar.proc.wait()


@pytest.fixture
def gateway_env(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> dict[str, str]:
    """The environment both the sidecars and the CLI run with."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {
        **base,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "GATEWAY_GRANT_SECRET": GRANT_SECRET,
        "GATEWAY_KEY_PEPPER": PEPPER,
        "GATEWAY_SIDECAR_DRAIN_SECONDS": "0",
        "GATEWAY_DATABASE_POOL_MAX": "3",
        "GATEWAY_STACK_FILE": str(tmp_path / "no-stack.json"),
        "COLUMNS": "200",
    }


@contextlib.asynccontextmanager
async def two_sidecars(env: Mapping[str, str], logs: Path) -> AsyncIterator[Stack]:
    """Two sidecar processes, both listening and subscribed to invalidations."""
    started: list[Process] = []
    try:
        for n in (1, 2):
            started.append(start_sidecar(env, logs / f"sidecar-{n}.log"))
        for sidecar in started:
            await asyncio.to_thread(localstack.wait_for_port, sidecar.port, START_SECONDS, sidecar.proc)
        async with aiohttp.ClientSession() as session:
            stack = Stack((started[0], started[1]), session, env)
            for sidecar in started:
                await until(functools.partial(stack.subscribed, sidecar), START_SECONDS, "subscribed")
            yield stack
    finally:
        for sidecar in started:
            stop_sidecar(sidecar)


@pytest.fixture
async def stack(gateway_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    """Two running sidecars (started and stopped within this fixture's context)."""
    async with two_sidecars(gateway_env, tmp_path) as running:
        yield running


async def cached_everywhere(stack: Stack, token: str) -> None:
    """The key is allowed by both sidecars twice: the second answer comes from each one's cache."""
    for sidecar in stack.sidecars:
        for _ in range(2):
            status, _grant, body = await stack.authz(sidecar, token)
            assert status == 200, body


async def refused_everywhere(stack: Stack, token: str, status: int) -> bool:
    """Every sidecar answers `status` for the token."""
    statuses = [(await stack.authz(sidecar, token))[0] for sidecar in stack.sidecars]
    return statuses == [status] * len(statuses)


RPM_ENFORCED = "rpm enforced"


async def key_rpms(stack: Stack, token: str) -> list[int | str | None]:
    """key_limits.rpm of each sidecar's next grant for the token, or RPM_ENFORCED where the sidecar
    refused the request for the key's requests-per-minute limit instead of granting it."""
    rpms: list[int | str | None] = []
    for sidecar in stack.sidecars:
        status, token_grant, body = await stack.authz(sidecar, token)
        if status == 429 and b"requests per minute" in body:
            rpms.append(RPM_ENFORCED)
            continue
        assert status == 200, body
        grant = grants.verify(
            token_grant, secrets=(GRANT_SECRET,), method="POST", path="/api/chat", now=time.time()
        )
        rpms.append(grant.key_limits.rpm)
    return rpms


async def key_rpm_everywhere(stack: Stack, token: str, rpm: int) -> bool:
    """Every sidecar applies key_limits.rpm == rpm: its next grant carries it or, for a key that had
    no rpm limit before, it already refuses the key for its requests per minute (a sidecar that
    had not seen the change could not)."""
    return all(r in (rpm, RPM_ENFORCED) for r in await key_rpms(stack, token))


async def new_key(db: asyncpg.Connection, tenant: str) -> admin.CreatedKey:
    """A tenant with one key (cheap Argon2)."""
    await admin.create_tenant(db, name=tenant)
    return await admin.create_key(db, tenant=tenant, name="k", pepper=PEPPER, params=CHEAP)


async def test_revoked_key_is_refused_by_every_sidecar_within_a_second(
    stack: Stack, db: asyncpg.Connection
) -> None:
    """After `neuronetz-gateway revoke-key` returns, both sidecars, which had the key cached as
    valid, refuse it with 401 within one second; twice in a row, so the Postgres poll a sidecar
    runs soon after starting cannot be what applied both."""
    first, second = await new_key(db, "acme"), await new_key(db, "beta")
    for created in (first, second):
        await cached_everywhere(stack, created.token)

    for created in (first, second):
        await stack.cli("revoke-key", "--prefix", f"nz_{created.key.prefix}")
        await until(
            lambda: refused_everywhere(stack, created.token, 401),  # noqa: B023 - awaited in this iteration
            PROPAGATION_SECONDS,
            "revocation applied",
        )
        assert (await stack.authz(stack.sidecars[0], second.token))[0] == (401 if created is second else 200)


async def test_suspended_tenants_key_is_refused_by_every_sidecar_within_a_second(
    stack: Stack, db: asyncpg.Connection
) -> None:
    """After `neuronetz-gateway suspend-tenant` returns, both sidecars refuse the tenant's cached key
    with 403 within one second (for two tenants in a row)."""
    first, second = await new_key(db, "acme"), await new_key(db, "beta")
    for created in (first, second):
        await cached_everywhere(stack, created.token)

    for created in (first, second):
        await stack.cli("suspend-tenant", "--name", created.tenant.name)
        await until(
            lambda: refused_everywhere(stack, created.token, 403),  # noqa: B023 - awaited in this iteration
            PROPAGATION_SECONDS,
            "suspension applied",
        )
        assert (await stack.authz(stack.sidecars[0], second.token))[0] == (403 if created is second else 200)


async def test_limit_change_shows_in_every_sidecars_next_grant_within_a_second(
    stack: Stack, db: asyncpg.Connection
) -> None:
    """After `neuronetz-gateway set-limits --prefix P --rpm 7` returns, the grants of both sidecars
    carry key_limits.rpm == 7 within one second (for two keys in a row). Each key is used only once
    per sidecar before the change, so its 7 requests a minute are not spent before the change lands."""
    first, second = await new_key(db, "acme"), await new_key(db, "beta")
    for created in (first, second):
        assert await key_rpms(stack, created.token) == [None, None]  # now cached everywhere

    for created in (first, second):
        await stack.cli("set-limits", "--prefix", created.key.prefix, "--rpm", "7")
        await until(
            lambda: key_rpm_everywhere(stack, created.token, 7),  # noqa: B023 - awaited in this iteration
            PROPAGATION_SECONDS,
            "limit applied",
        )
    assert await key_rpms(stack, second.token) != [None, None]


async def test_changes_apply_within_a_second_from_postgres_when_notices_are_lost(
    stack: Stack, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """When the CLI's pub/sub notices reach no sidecar (published under another Redis prefix, so on a
    channel nobody listens to), both sidecars still apply each change within one second of the
    command returning, by re-reading Postgres: two limit changes, a revocation and a suspension made
    one after the other (so no single lucky poll can cover them all; the rpm values are high so the
    polling requests never reach them)."""
    limited = await new_key(db, "acme")
    revoked = await new_key(db, "beta")
    suspended = await new_key(db, "gamma")
    for created in (limited, revoked, suspended):
        await cached_everywhere(stack, created.token)
    elsewhere = {"GATEWAY_REDIS_PREFIX": f"elsewhere:{secrets.token_hex(6)}:"}
    channel = RedisKeys(redis_prefix).invalidations
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client, client.pubsub(channels=[channel], ignore_subscribe_messages=True) as pubsub:
        await stack.cli("set-limits", "--prefix", limited.key.prefix, "--rpm", "5000", env=elsewhere)
        await until(
            lambda: key_rpm_everywhere(stack, limited.token, 5000),
            PROPAGATION_SECONDS,
            "limit without notice",
        )
        await stack.cli("set-limits", "--prefix", limited.key.prefix, "--rpm", "6000", env=elsewhere)
        await until(
            lambda: key_rpm_everywhere(stack, limited.token, 6000),
            PROPAGATION_SECONDS,
            "2nd limit without notice",
        )
        await stack.cli("revoke-key", "--prefix", revoked.key.prefix, env=elsewhere)
        await until(
            lambda: refused_everywhere(stack, revoked.token, 401),
            PROPAGATION_SECONDS,
            "revoke without notice",
        )
        await stack.cli("suspend-tenant", "--name", "gamma", env=elsewhere)
        await until(
            lambda: refused_everywhere(stack, suspended.token, 403),
            PROPAGATION_SECONDS,
            "suspension without notice",
        )
        # Nothing reached the sidecars' channel: the first message there is our own marker.
        await client.publish(channel, b"marker")
        async with asyncio.timeout(WAIT_SECONDS):
            while (message := await pubsub.get_message(timeout=WAIT_SECONDS)) is None:
                pass  # the subscription confirmation, ignored
        assert message["data"] == b"marker"
