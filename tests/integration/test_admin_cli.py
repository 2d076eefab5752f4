"""The `neuronetz-gateway` admin CLI, run as a real subprocess against real Postgres and Valkey:
tables and JSON for every command, keys stored only as Argon2id hashes, clean one-line errors that
change nothing, and invalidation notices on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import attrs
import coredis
import orjson
import pytest
from asyncpg.connection import LoggedQuery
from coredis.patterns.pubsub import PubSub

from shared import admin, invalidation, keys
from shared.db import asyncpg_dsn
from shared.exceptions import AdminError
from shared.hashing import Argon2Params, verify_key
from shared.invalidation import Invalidation
from shared.keystore import Verdict, authenticate
from shared.model_limits import MAX_RULES_PER_SCOPE
from shared.periods import periods_at
from shared.redis_keys import RedisKeys

pytestmark = pytest.mark.integration

PEPPER = "cli-test-pepper-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=64, time_cost=1)
TABLES = (
    "tenants",
    "api_keys",
    "usage_ledger",
    "budget_periods",
    "audit_log",
    "prompt_logs",
    "model_limits",
    "model_budget_periods",
)
SCRIPT = Path(sys.executable).parent / "neuronetz-gateway"
# The installed console script when it exists (see test_console_script_is_installed), else the
# same entry point through `python -m`, so the behaviour tests still run.
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shared.cli"]
TOKEN_RE = re.compile(r"nz_[0-9A-Za-z]{46}")
WAIT_SECONDS = 5.0

LIMIT_FIELDS = {"rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens", "total_tokens"}
TENANT_FIELDS = {
    "id",
    "name",
    "status",
    "limits",
    "allowed_models",
    "max_body_bytes",
    "max_num_ctx",
    "max_keep_alive_seconds",
    "prompt_logging",
    "prompt_log_ttl_seconds",
    "created_at",
    "model_limits",
}
KEY_FIELDS = {
    "id",
    "tenant_id",
    "name",
    "prefix",
    "status",
    "created_at",
    "expires_at",
    "revoked_at",
    "last_used_at",
    "limits",
    "allowed_models",
    "prompt_logging",
    "prompt_log_ttl_seconds",
    "allow_templates",
    "allow_reload_options",
    "model_limits",
    "tenant",
}


SHOW_KEY_EXTRA = {
    "effective_limits",
    "limit_sources",
    "tenant_limits",
    "effective_models",
    "model_rules",
    "prompt_logging_in_force",
    "usage",
    "streams_in_flight",
}


@attrs.frozen
class Done:
    """A finished CLI run."""

    code: int
    stdout: str
    stderr: str


@attrs.frozen
class Cli:
    """Runs the admin CLI with the test's database, Redis and pepper."""

    env: Mapping[str, str]

    async def __call__(self, *args: str, env: Mapping[str, str] | None = None, wide: bool = True) -> Done:
        """Run one command; never raises for a non-zero exit. Tables are asked for in full
        (`--wide`, which these tests read by column) unless `wide` is False."""
        flags = ["--wide"] if wide and args and not args[0].startswith("-") else []
        proc = await asyncio.create_subprocess_exec(
            *COMMAND,
            *args,
            *flags,
            env={**self.env, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return Done(proc.returncode, out.decode(), err.decode())

    async def ok(self, *args: str) -> str:
        """Run a command that must succeed silently on stderr; its stdout."""
        done = await self(*args)
        assert done.code == 0, done.stderr
        assert done.stderr == ""
        return done.stdout

    async def json(self, *args: str) -> Any:
        """Run a command with --json; its parsed stdout."""
        return orjson.loads(await self.ok(*args, "--json"))


@pytest.fixture
def cli(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> Cli:
    """The CLI configured for this test only (no stack file, wide terminal for whole tables)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return Cli(
        {
            **base,
            "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": redis_prefix,
            "GATEWAY_KEY_PEPPER": PEPPER,
            "GATEWAY_STACK_FILE": str(tmp_path / "no-stack.json"),
            "COLUMNS": "250",
        }
    )


def cells(stdout: str, needle: str) -> list[str]:
    """The cells of the one table row containing `needle`."""
    rows = [line for line in stdout.splitlines() if needle in line and "│" in line]
    assert len(rows) == 1, stdout
    return [cell.strip() for cell in rows[0].strip().strip("│").split("│")]


async def snapshot(db: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table, as JSON text."""
    dump: dict[str, list[str]] = {}
    for table in TABLES:
        rows = await db.fetch(f"SELECT row_to_json(t)::text AS j FROM {table} t")  # noqa: S608 - fixed names
        dump[table] = sorted(r["j"] for r in rows)
    return dump


@attrs.define
class Listener:
    """A subscriber on the invalidation channel."""

    client: coredis.Redis[bytes]
    pubsub: PubSub[bytes]
    channel: str

    async def next(self) -> Invalidation:
        """The next notice, waiting at most WAIT_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        while (remaining := deadline - loop.time()) > 0:
            message = await self.pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "message":
                data = message["data"]
                assert isinstance(data, bytes | str)
                return invalidation.decode(data)
        raise AssertionError(f"no invalidation on {self.channel} within {WAIT_SECONDS} s")

    async def assert_nothing_published(self) -> None:
        """Publish a marker ourselves: it must be the next notice, so nothing came before it."""
        marker = Invalidation("tenant", 0, reason=f"marker-{uuid.uuid4().hex}")
        await self.client.publish(self.channel, invalidation.encode(marker))
        assert await self.next() == marker


@contextlib.asynccontextmanager
async def listen(redis_url: str, prefix: str) -> AsyncIterator[Listener]:
    """Subscribe to `<prefix>invalidate` before the command under test runs."""
    channel = RedisKeys(prefix).invalidations
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client, client.pubsub(channels=[channel]) as pubsub:
        yield Listener(client, pubsub, channel)


def _check_key_json(doc: Mapping[str, Any], tenant: str | None = None) -> None:
    assert set(doc) - {"key"} == KEY_FIELDS, doc
    assert "hash" not in doc
    assert set(doc["limits"]) == LIMIT_FIELDS
    assert len(doc["prefix"]) == 8
    if tenant is not None:
        assert doc["tenant"] == tenant


def _check_tenant_json(doc: Mapping[str, Any], *, keys_counted: bool) -> None:
    assert set(doc) == TENANT_FIELDS | ({"active_keys"} if keys_counted else set()), doc
    assert set(doc["limits"]) == LIMIT_FIELDS


@attrs.frozen
class World:
    """A tenant `acme` with an active key and a revoked key, and a tenant `other`."""

    acme_id: int
    prefix: str
    key_id: int
    revoked: str


async def populate(db: asyncpg.Connection) -> World:
    """Set up World with the core functions (cheap Argon2 parameters: these keys are not used)."""
    acme = await admin.create_tenant(db, name="acme")
    await admin.create_tenant(db, name="other")
    live = await admin.create_key(db, tenant="acme", name="k1", pepper=PEPPER, params=CHEAP)
    gone = await admin.create_key(db, tenant="acme", name="gone", pepper=PEPPER, params=CHEAP)
    await admin.revoke_key(db, prefix=gone.key.prefix)
    return World(acme.id, live.key.prefix, live.key.id, gone.key.prefix)


async def test_tenant_commands(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """create-tenant, list-tenants, suspend-tenant and resume-tenant print a table or JSON;
    suspend and resume change the status and publish a tenant invalidation."""
    out = await cli.ok("create-tenant", "--name", "acme")
    acme_id = await db.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    assert "tenant created" in out
    assert cells(out, "acme")[:4] == ["acme", str(acme_id), "active", "0"]
    [beta] = await cli.json("create-tenant", "--name", "beta")
    _check_tenant_json(beta, keys_counted=True)
    assert (beta["name"], beta["status"], beta["active_keys"]) == ("beta", "active", 0)
    assert beta["limits"] == dict.fromkeys(LIMIT_FIELDS)
    assert (beta["allowed_models"], beta["prompt_logging"]) == (None, False)

    out = await cli.ok("list-tenants")
    assert cells(out, "acme")[2] == "active"
    assert cells(out, "beta")[2] == "active"
    listed = await cli.json("list-tenants")
    assert [t["name"] for t in listed] == ["acme", "beta"]
    for doc in listed:
        _check_tenant_json(doc, keys_counted=True)

    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok("suspend-tenant", "--name", "acme")
        assert "tenant suspended" in out
        assert cells(out, "acme")[2] == "suspended"
        assert await notices.next() == Invalidation("tenant", acme_id, reason="suspended")
        assert await db.fetchval("SELECT status FROM tenants WHERE name = 'acme'") == "suspended"
        listed = await cli.json("list-tenants")
        assert [(t["name"], t["status"]) for t in listed] == [("acme", "suspended"), ("beta", "active")]

        [resumed] = await cli.json("resume-tenant", "--name", "acme")
        _check_tenant_json(resumed, keys_counted=False)
        assert (resumed["name"], resumed["status"]) == ("acme", "active")
        assert await notices.next() == Invalidation("tenant", acme_id, reason="active")
        [suspended] = await cli.json("suspend-tenant", "--name", "beta")
        _check_tenant_json(suspended, keys_counted=False)
        assert (suspended["name"], suspended["status"]) == ("beta", "suspended")
    assert await db.fetchval("SELECT status FROM tenants WHERE name = 'acme'") == "active"


async def test_create_and_list_keys(cli: Cli, db: asyncpg.Connection) -> None:
    """create-key prints the key once (table and panel, or {"key": "nz_…", "prefix": …}), with
    --expires-in setting an expiry; list-keys lists every key or one tenant's, never a token."""
    await admin.create_tenant(db, name="acme")
    await admin.create_tenant(db, name="other")
    out = await cli.ok("create-key", "--tenant", "acme", "--name", "laptop")
    assert "key created" in out
    assert "Shown once" in out
    [token] = TOKEN_RE.findall(out)
    first_prefix = token[3:11]
    row = cells(out, f"nz_{first_prefix} ")
    assert row[:4] == [f"nz_{first_prefix}", "acme", "laptop", "active"]
    assert row[5] == "—"  # no expiry

    created = await cli.json("create-key", "--tenant", "acme", "--name", "ci", "--expires-in", "7d")
    assert set(created) == KEY_FIELDS | {"key"}
    _check_key_json(created, tenant="acme")
    assert TOKEN_RE.fullmatch(created["key"])
    assert created["key"][3:11] == created["prefix"]
    assert (created["name"], created["status"]) == ("ci", "active")
    lifetime = dt.datetime.fromisoformat(created["expires_at"]) - dt.datetime.fromisoformat(
        created["created_at"]
    )
    assert abs(lifetime - dt.timedelta(days=7)) < dt.timedelta(minutes=1)
    other = await cli.json("create-key", "--tenant", "other", "--name", "ci")
    assert other["tenant"] == "other"

    out = await cli.ok("list-keys")
    assert token not in out
    assert created["key"] not in out
    assert cells(out, f"nz_{first_prefix} ")[1:3] == ["acme", "laptop"]
    assert cells(out, f"nz_{created['prefix']} ")[1:3] == ["acme", "ci"]
    assert cells(out, f"nz_{other['prefix']} ")[1:3] == ["other", "ci"]
    everything = await cli.json("list-keys")
    assert {k["prefix"] for k in everything} == {first_prefix, created["prefix"], other["prefix"]}
    mine = await cli.json("list-keys", "--tenant", "acme")
    assert [(k["prefix"], k["tenant"]) for k in mine] == [(first_prefix, "acme"), (created["prefix"], "acme")]
    for doc in (*everything, *mine):
        _check_key_json(doc)
    out = await cli.ok("list-keys", "--tenant", "other")
    assert other["prefix"] in out
    assert first_prefix not in out


async def test_created_key_is_stored_only_as_its_hash(cli: Cli, db: asyncpg.Connection) -> None:
    """The api_keys row holds an Argon2id PHC hash that verifies with the pepper; no column and no
    row anywhere in the database contains the token or its secret part."""
    await admin.create_tenant(db, name="acme")
    created = await cli.json("create-key", "--tenant", "acme", "--name", "ci")
    token: str = created["key"]

    row = await db.fetchrow("SELECT * FROM api_keys WHERE prefix = $1", created["prefix"])
    assert row is not None
    stored = row["hash"]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_key(token, stored, pepper=PEPPER)
    assert not verify_key(token, stored, pepper="another pepper")
    for column, value in row.items():
        assert token[11:43] not in str(value), column
    dump = orjson.dumps(await snapshot(db)).decode()
    assert created["prefix"] in dump  # the dump does contain the key's row
    assert stored in dump
    assert token not in dump
    assert token[11:] not in dump
    assert token[11:43] not in dump


async def test_created_key_authenticates(cli: Cli, db: asyncpg.Connection) -> None:
    """shared.keystore.authenticate accepts a key the CLI created, with its tenant's context."""
    await admin.create_tenant(db, name="acme")
    created = await cli.json("create-key", "--tenant", "acme", "--name", "ci")
    verdict = await authenticate(db, created["key"], pepper=PEPPER, now=dt.datetime.now(dt.UTC))
    assert verdict.reason == "ok"
    assert verdict.context is not None
    assert (verdict.context.prefix, verdict.context.key_id) == (created["prefix"], created["id"])
    assert verdict.context.tenant_name == "acme"


async def test_typo_in_created_key_costs_no_query(cli: Cli, db: asyncpg.Connection) -> None:
    """A created key with one character changed is refused as "malformed" without a single
    database query (while a well-formed unknown key does query, so the counter works)."""
    await admin.create_tenant(db, name="acme")
    created = await cli.json("create-key", "--tenant", "acme", "--name", "ci")
    token: str = created["key"]
    now = dt.datetime.now(dt.UTC)
    queries: list[str] = []

    def record(query: LoggedQuery) -> None:
        queries.append(query.query)

    unknown = keys.generate_key().token
    with db.query_logger(record):
        assert await authenticate(db, unknown, pepper=PEPPER, now=now) == Verdict(None, "unknown")
        await asyncio.sleep(0)  # asyncpg calls query loggers with loop.call_soon
    assert len(queries) == 1, "the query logger must see the lookup, or the zero below proves nothing"

    for position in (3, 20, len(token) - 1):
        typo = token[:position] + ("a" if token[position] != "a" else "b") + token[position + 1 :]
        queries.clear()
        with db.query_logger(record):
            refused = await authenticate(db, typo, pepper=PEPPER, now=now)
            await asyncio.sleep(0)
        assert refused == Verdict(None, "malformed")
        assert queries == []


async def test_revoke_key(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """revoke-key accepts the prefix with or without nz_, prints the revoked key (table or JSON),
    marks it revoked in Postgres and publishes a key invalidation."""
    tenant = await admin.create_tenant(db, name="acme")
    one = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    two = await admin.create_key(db, tenant="acme", name="two", pepper=PEPPER, params=CHEAP)
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok("revoke-key", "--prefix", f"nz_{one.key.prefix}")
        assert "key revoked" in out
        assert cells(out, one.key.prefix)[3] == "revoked"
        assert await notices.next() == Invalidation("key", tenant.id, one.key.id, reason="revoked")

        [doc] = await cli.json("revoke-key", "--prefix", two.key.prefix)
        _check_key_json(doc)
        assert (doc["prefix"], doc["status"]) == (two.key.prefix, "revoked")
        assert doc["revoked_at"] is not None
        assert await notices.next() == Invalidation("key", tenant.id, two.key.id, reason="revoked")
    rows = await db.fetch("SELECT status, revoked_at FROM api_keys ORDER BY id")
    assert [r["status"] for r in rows] == ["revoked", "revoked"]
    assert all(r["revoked_at"] is not None for r in rows)


async def test_changed_key_json_names_its_tenant(cli: Cli, db: asyncpg.Connection) -> None:
    """The JSON (and table) of a key changed by revoke-key or set-limits names the key's tenant,
    like list-keys does, not an empty string."""
    await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    [limited] = await cli.json("set-limits", "--prefix", made.key.prefix, "--rpm", "5")
    [revoked] = await cli.json("revoke-key", "--prefix", made.key.prefix)
    assert (limited["tenant"], revoked["tenant"]) == ("acme", "acme")


async def test_set_limits(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """set-limits stores numbers, 'unlimited' and 'inherit' and model allowlists (normalised, or
    'all') for a tenant or a key, prints them, and publishes an invalidation each time."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    prefix = made.key.prefix
    limit_sql = "SELECT rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens, allowed_models"
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok(
            "set-limits",
            "--tenant",
            "acme",
            "--rpm",
            "100",
            "--tpm",
            "5000",
            "--concurrency",
            "2",
            "--daily-tokens",
            "10",
            "--monthly-tokens",
            "20",
            "--total-tokens",
            "30000",
            "--models",
            "llama3.2, Qwen3:8b",
        )
        assert "limits changed" in out
        assert cells(out, "acme")[4:11] == [
            "100",
            "5,000",
            "2",
            "10",
            "20",
            "30,000",
            "llama3.2:latest, qwen3:8b",
        ]
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")
        row = await db.fetchrow(f"{limit_sql} FROM tenants WHERE id = $1", tenant.id)
        assert row is not None
        assert tuple(row.values()) == (100, 5000, 2, 10, 20, 30000, ["llama3.2:latest", "qwen3:8b"])

        [doc] = await cli.json("set-limits", "--tenant", "acme", "--rpm", "unlimited", "--models", "all")
        assert (doc["limits"]["rpm"], doc["limits"]["tpm"], doc["allowed_models"]) == (None, 5000, None)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")

        out = await cli.ok(
            "set-limits",
            "--prefix",
            f"nz_{prefix}",
            "--rpm",
            "10",
            "--tpm",
            "unlimited",
            "--concurrency",
            "inherit",
            "--models",
            "qwen3:8b",
        )
        assert cells(out, prefix)[7:14] == [
            "10",
            "unlimited",
            "inherit",
            "inherit",
            "inherit",
            "inherit",
            "qwen3:8b",
        ]
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")
        row = await db.fetchrow(f"{limit_sql} FROM api_keys WHERE id = $1", made.key.id)
        assert row is not None
        assert tuple(row.values()) == (10, -1, None, None, None, None, ["qwen3:8b"])

        [doc] = await cli.json("set-limits", "--prefix", prefix, "--models", "all")
        _check_key_json(doc)
        assert doc["allowed_models"] == ["*"]
        assert (doc["limits"]["rpm"], doc["limits"]["tpm"]) == (10, -1)
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")

        [doc] = await cli.json("set-limits", "--prefix", prefix, "--models", "inherit", "--rpm", "inherit")
        assert (doc["allowed_models"], doc["limits"]["rpm"]) == (None, None)
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")


async def test_set_prompt_logging(
    cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """set-prompt-logging --on --ttl stores the switch and the TTL in seconds, --off clears both,
    for a tenant or a key; each change publishes an invalidation."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    sql = "SELECT prompt_logging, prompt_log_ttl_seconds FROM {} WHERE id = $1"
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok("set-prompt-logging", "--tenant", "acme", "--on", "--ttl", "7d")
        assert "prompt logging changed" in out
        assert cells(out, "acme")[-1] == "on, 604800s"
        assert tuple(await db.fetchrow(sql.format("tenants"), tenant.id) or ()) == (True, 604800)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="prompt-logging")

        [doc] = await cli.json("set-prompt-logging", "--tenant", "acme", "--off")
        assert (doc["prompt_logging"], doc["prompt_log_ttl_seconds"]) == (False, None)
        assert tuple(await db.fetchrow(sql.format("tenants"), tenant.id) or ()) == (False, None)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="prompt-logging")

        [doc] = await cli.json("set-prompt-logging", "--prefix", made.key.prefix, "--on", "--ttl", "12h")
        assert (doc["prompt_logging"], doc["prompt_log_ttl_seconds"]) == (True, 43200)
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="prompt-logging")

        await cli.ok("set-prompt-logging", "--prefix", f"nz_{made.key.prefix}", "--off")
        assert tuple(await db.fetchrow(sql.format("api_keys"), made.key.id) or ()) == (False, None)
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="prompt-logging")


async def test_set_templates(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """set-templates --on / --off flips the key's allow_templates column, shows it in the key
    table, and tells the sidecars; a key starts without it."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    sql = "SELECT allow_templates FROM api_keys WHERE id = $1"
    assert await db.fetchval(sql, made.key.id) is False
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok("set-templates", "--prefix", made.key.prefix, "--on")
        assert "templates changed" in out
        assert cells(out, f"nz_{made.key.prefix}")[-1] == "allowed"
        assert await db.fetchval(sql, made.key.id) is True
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="templates")
        [doc] = await cli.json("set-templates", "--prefix", f"nz_{made.key.prefix}", "--off")
        assert doc["allow_templates"] is False
        assert await db.fetchval(sql, made.key.id) is False
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="templates")


async def test_set_limits_sets_the_tenant_model_caps(
    cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """set-limits --max-num-ctx and --max-keep-alive (seconds or a duration) store the tenant's
    caps, show them in the tenant table and JSON, clear them with 'unlimited', and tell the
    sidecars; on a key they are refused, changing nothing."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    sql = "SELECT max_num_ctx, max_keep_alive_seconds FROM tenants WHERE id = $1"
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok(
            "set-limits", "--tenant", "acme", "--max-num-ctx", "8192", "--max-keep-alive", "30m"
        )
        assert cells(out, "acme")[-3:] == ["8,192", "1,800s", "off"]  # caps, prompt logs
        assert tuple(await db.fetchrow(sql, tenant.id) or ()) == (8192, 1800)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")

        [doc] = await cli.json("set-limits", "--tenant", "acme", "--max-keep-alive", "600", "--rpm", "5")
        _check_tenant_json(doc, keys_counted=False)
        assert (doc["max_num_ctx"], doc["max_keep_alive_seconds"], doc["limits"]["rpm"]) == (8192, 600, 5)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")

        [doc] = await cli.json("set-limits", "--tenant", "acme", "--max-num-ctx", "unlimited")
        assert (doc["max_num_ctx"], doc["max_keep_alive_seconds"]) == (None, 600)
        assert tuple(await db.fetchrow(sql, tenant.id) or ()) == (None, 600)
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")

        before = await snapshot(db)
        done = await cli("set-limits", "--prefix", made.key.prefix, "--max-num-ctx", "4096")
        assert done.code != 0
        assert done.stderr.startswith("error:")
        assert "only applies to a tenant" in done.stderr
        with pytest.raises(AdminError, match="only applies to a tenant"):
            await admin.set_limits(
                db,
                prefix=made.key.prefix,
                limits={"max_keep_alive_seconds": admin.parse_limit("max_keep_alive_seconds", "60")},
            )
        assert await snapshot(db) == before
        await notices.assert_nothing_published()


async def test_set_reload_options(
    cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """set-reload-options --on / --off flips the key's allow_reload_options column, shows it in the
    key table, reaches the key's cached context, and tells the sidecars; a key starts without it."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    sql = "SELECT allow_reload_options FROM api_keys WHERE id = $1"
    assert await db.fetchval(sql, made.key.id) is False
    assert made.key.allow_reload_options is False
    async with listen(redis_url, redis_prefix) as notices:
        out = await cli.ok("set-reload-options", "--prefix", made.key.prefix, "--on")
        assert "reload options changed" in out
        assert cells(out, f"nz_{made.key.prefix}")[-2:] == ["allowed", "no"]  # reload options, templates
        assert await db.fetchval(sql, made.key.id) is True
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="reload-options")
        verdict = await authenticate(db, made.token, pepper=PEPPER, now=dt.datetime.now(dt.UTC))
        assert verdict.context is not None
        assert verdict.context.allow_reload_options is True
        [doc] = await cli.json("set-reload-options", "--prefix", f"nz_{made.key.prefix}", "--off")
        _check_key_json(doc)
        assert doc["allow_reload_options"] is False
        assert await db.fetchval(sql, made.key.id) is False
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="reload-options")


async def _ledger(
    db: asyncpg.Connection,
    tenant_id: int,
    key_id: int,
    finished: dt.datetime,
    *,
    prompt: int,
    completion: int,
) -> None:
    await db.execute(
        "INSERT INTO usage_ledger (request_id, tenant_id, key_id, endpoint, prompt_tokens, "
        "completion_tokens, http_status, started_at, finished_at) "
        "VALUES ($1, $2, $3, '/api/chat', $4, $5, 200, $6, $6)",
        uuid.uuid4().hex,
        tenant_id,
        key_id,
        prompt,
        completion,
        finished,
    )


async def test_usage(cli: Cli, db: asyncpg.Connection) -> None:
    """usage sums prompt + completion tokens from the ledger for today, this month (UTC) and all
    time, for a tenant or one key (with or without nz_), as a table or JSON."""
    acme = await admin.create_tenant(db, name="acme")
    other = await admin.create_tenant(db, name="other")
    one = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    two = await admin.create_key(db, tenant="acme", name="two", pepper=PEPPER, params=CHEAP)
    foreign = await admin.create_key(db, tenant="other", name="one", pepper=PEPPER, params=CHEAP)
    now = dt.datetime.now(dt.UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    rows = [
        (one.key.id, now, 10, 5),
        (one.key.id, month_start, 100, 0),  # also "today" on the 1st of a month
        (one.key.id, month_start - dt.timedelta(days=1), 1000, 0),  # last month
        (two.key.id, now, 7, 0),
    ]
    for key_id, finished, prompt, completion in rows:
        await _ledger(db, acme.id, key_id, finished, prompt=prompt, completion=completion)
    await _ledger(db, other.id, foreign.key.id, now, prompt=50000, completion=1)

    def expected(key_ids: set[int]) -> dict[str, int]:
        mine = [(f, p + c) for k, f, p, c in rows if k in key_ids]
        return {
            "day": sum(t for f, t in mine if f >= day_start),
            "month": sum(t for f, t in mine if f >= month_start),
            "total": sum(t for _, t in mine),
            "requests": len(mine),
        }

    whole = await cli.json("usage", "--tenant", "acme")
    assert whole == {"scope": "tenant", "name": "acme", **expected({one.key.id, two.key.id})}
    assert whole["total"] == 1122
    single = await cli.json("usage", "--prefix", f"nz_{one.key.prefix}")
    assert single == {"scope": "key", "name": one.key.prefix, **expected({one.key.id})}
    assert single["total"] == 1115

    out = await cli.ok("usage", "--prefix", one.key.prefix)
    assert f"usage of key {one.key.prefix}" in out
    want = expected({one.key.id})
    assert cells(out, "1,115") == [f"{want['day']:,}", f"{want['month']:,}", "1,115", "3"]
    out = await cli.ok("usage", "--tenant", "other")
    assert cells(out, "50,001") == ["50,001", "50,001", "50,001", "1"]


async def test_set_limits_with_model(
    cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """set-limits --model stores a rule for the canonical pattern on a tenant or a key (a key's
    'unlimited' as -1), moves the owner's updated_at, shows the rule in the changed row's table
    ("model limits" column) and JSON, publishes the same invalidation as unscoped limits, and
    --remove deletes it; list-tenants and list-keys show and carry the rules."""
    tenant = await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    prefix = made.key.prefix
    rules_sql = "SELECT key_id, pattern, rpm, tpm, max_concurrent, daily_tokens FROM model_limits ORDER BY id"
    stamp = "SELECT updated_at FROM {} WHERE id = $1"
    async with listen(redis_url, redis_prefix) as notices:
        before = await db.fetchval(stamp.format("tenants"), tenant.id)
        out = await cli.ok(
            "set-limits", "--tenant", "acme", "--model", "Big:*", "--rpm", "5", "--tpm", "9000"
        )
        assert "model limits on big:* changed" in out
        assert cells(out, "acme")[11] == "big:* rpm 5 · tpm 9,000"
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")
        assert await db.fetchval(stamp.format("tenants"), tenant.id) > before
        assert await db.fetchval("SELECT rpm FROM tenants WHERE id = $1", tenant.id) is None  # unscoped

        before = await db.fetchval(stamp.format("api_keys"), made.key.id)
        [doc] = await cli.json(
            "set-limits", "--prefix", prefix, "--model", "big:*", "--rpm", "unlimited", "--concurrency", "2"
        )
        _check_key_json(doc, tenant="acme")
        assert doc["model_limits"] == [
            {"pattern": "big:*", "rpm": -1, "tpm": None, "max_concurrent": 2}
            | dict.fromkeys(("daily_tokens", "monthly_tokens", "total_tokens"))
        ]
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")
        assert await db.fetchval(stamp.format("api_keys"), made.key.id) > before
        out = await cli.ok("set-limits", "--prefix", prefix, "--model", "small", "--daily-tokens", "100")
        assert cells(out, f"nz_{prefix}")[14] == "big:* rpm unlimited · streams 2"
        assert "small:latest daily 100" in out
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")
        assert [tuple(r.values()) for r in await db.fetch(rules_sql)] == [
            (None, "big:*", 5, 9000, None, None),
            (made.key.id, "big:*", -1, None, 2, None),
            (made.key.id, "small:latest", None, None, None, 100),
        ]

        [listed] = await cli.json("list-tenants")
        _check_tenant_json(listed, keys_counted=True)
        assert [(r["pattern"], r["rpm"], r["tpm"]) for r in listed["model_limits"]] == [("big:*", 5, 9000)]
        [listed_key] = await cli.json("list-keys")
        _check_key_json(listed_key, tenant="acme")
        assert [r["pattern"] for r in listed_key["model_limits"]] == ["big:*", "small:latest"]
        assert cells(await cli.ok("list-tenants"), "acme")[11] == "big:* rpm 5 · tpm 9,000"
        assert cells(await cli.ok("list-keys"), f"nz_{prefix}")[14] == "big:* rpm unlimited · streams 2"

        out = await cli.ok("set-limits", "--prefix", prefix, "--model", "small", "--remove")
        assert "model limits on small:latest removed" in out
        assert "small:latest" not in out.split("removed", 1)[1]
        assert await notices.next() == Invalidation("key", tenant.id, made.key.id, reason="limits")
        [doc] = await cli.json("set-limits", "--tenant", "acme", "--model", "big:*", "--remove")
        assert doc["model_limits"] == []
        assert await notices.next() == Invalidation("tenant", tenant.id, reason="limits")
        assert [tuple(r.values()) for r in await db.fetch(rules_sql)] == [
            (made.key.id, "big:*", -1, None, 2, None)
        ]
        out = await cli.ok("list-tenants")
        assert cells(out, "acme")[11] == "—"


async def test_model_rule_leaving_nothing_is_deleted(cli: Cli, db: asyncpg.Connection) -> None:
    """A --model change after which the rule limits nothing ('unlimited' on a tenant, 'inherit' on a
    key) deletes its row."""
    await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    await cli.ok("set-limits", "--tenant", "acme", "--model", "big:*", "--rpm", "5")
    await cli.ok("set-limits", "--prefix", made.key.prefix, "--model", "big:*", "--tpm", "7")
    assert await db.fetchval("SELECT count(*) FROM model_limits") == 2
    [doc] = await cli.json("set-limits", "--tenant", "acme", "--model", "big:*", "--rpm", "unlimited")
    assert doc["model_limits"] == []
    [doc] = await cli.json("set-limits", "--prefix", made.key.prefix, "--model", "big:*", "--tpm", "inherit")
    assert doc["model_limits"] == []
    assert await db.fetchval("SELECT count(*) FROM model_limits") == 0


async def test_show_key(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """show-key prints the key's fields, its usage and streams in flight, its limits (own, in force,
    the tenant's, where the one in force comes from) and its model rules with inheritance from the
    tenant's rule on the same pattern, as tables or JSON; never the token or its hash."""
    await admin.create_tenant(db, name="acme")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    prefix = made.key.prefix
    await cli.ok("set-limits", "--tenant", "acme", "--rpm", "100", "--tpm", "5000")
    await cli.ok("set-limits", "--prefix", prefix, "--tpm", "unlimited", "--concurrency", "3")
    await cli.ok("set-limits", "--tenant", "acme", "--model", "big:*", "--rpm", "5", "--tpm", "9000")
    await cli.ok(
        "set-limits", "--prefix", prefix, "--model", "big:*", "--rpm", "unlimited", "--concurrency", "2"
    )
    await cli.ok("set-limits", "--prefix", prefix, "--model", "small:*", "--daily-tokens", "100")
    stored = await db.fetchval("SELECT hash FROM api_keys WHERE id = $1", made.key.id)
    await _ledger(db, made.tenant.id, made.key.id, dt.datetime.now(dt.UTC), prompt=1000, completion=234)
    # Two live leases and one expired: two streams in flight.
    leases = RedisKeys(redis_prefix).leases(made.tenant.id, f"k{made.key.id}")
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        await client.zadd(leases, {"r1": now_ms + 60_000, "r2": now_ms + 60_000, "old": now_ms - 1000})

    out = await cli.ok("show-key", "--prefix", f"nz_{prefix}")
    assert f"key nz_{prefix}" in out
    assert "acme (active)" in out
    limits, rules = out.split("model limits (", 1)
    assert cells(limits, "rpm  ") == ["rpm", "inherit", "100", "100", "tenant"]
    assert cells(limits, "tpm  ") == ["tpm", "unlimited", "—", "5,000", "key"]
    assert cells(limits, "│ streams │") == ["streams", "3", "3", "—", "key"]
    assert cells(limits, "│ daily ") == ["daily", "inherit", "—", "—", "none"]
    assert re.search(r"tokens today +1,234", out)
    assert re.search(r"in total +1,234 in 1 requests", out)
    assert re.search(r"streams now +2", out)
    assert re.search(r"prompt logs +off \(tenant's setting\)", out)
    # The positional form is the same command.
    assert (await cli.ok("show-key", prefix)) == out
    assert cells(rules, "big:*") == ["big:*", "rpm", "unlimited", "—", "5"]
    assert cells(rules, "9,000") == ["", "tpm", "inherit", "9,000", "9,000"]
    assert cells(rules, "streams") == ["", "streams", "2", "2", "—"]
    assert cells(rules, "small:*") == ["small:*", "daily", "100", "100", "—"]
    for text in (out, (await cli("show-key", "--prefix", prefix, "--json")).stdout):
        assert made.token not in text
        assert stored not in text
        assert not TOKEN_RE.search(text)

    doc = await cli.json("show-key", "--prefix", prefix)
    _check_key_json({k: v for k, v in doc.items() if k not in SHOW_KEY_EXTRA}, tenant="acme")
    assert set(doc) == KEY_FIELDS | SHOW_KEY_EXTRA
    assert doc["effective_limits"] == {**dict.fromkeys(LIMIT_FIELDS), "rpm": 100, "max_concurrent": 3}
    assert doc["tenant_limits"] == {**dict.fromkeys(LIMIT_FIELDS), "rpm": 100, "tpm": 5000}
    assert doc["limit_sources"] == {
        "rpm": "tenant",
        "tpm": "key",
        "max_concurrent": "key",
        "daily_tokens": "none",
        "monthly_tokens": "none",
        "total_tokens": "none",
    }
    assert doc["usage"] == {"today": 1234, "this_month": 1234, "total": 1234, "requests": 1}
    assert doc["streams_in_flight"] == 2
    assert doc["prompt_logging_in_force"] == {"on": False, "ttl_seconds": None, "from": "tenant"}
    nothing = dict.fromkeys(LIMIT_FIELDS)
    assert doc["model_rules"] == [
        {
            "pattern": "big:*",
            "own": {**nothing, "rpm": -1, "max_concurrent": 2},
            "effective": {**nothing, "tpm": 9000, "max_concurrent": 2},
            "tenant": {**nothing, "rpm": 5, "tpm": 9000},
        },
        {
            "pattern": "small:*",
            "own": {**nothing, "daily_tokens": 100},
            "effective": {**nothing, "daily_tokens": 100},
            "tenant": nothing,
        },
    ]
    await cli.ok("set-limits", "--prefix", prefix, "--model", "big:*", "--rpm", "inherit")
    doc = await cli.json("show-key", "--prefix", prefix)
    assert doc["model_rules"][0]["effective"] == {**nothing, "rpm": 5, "tpm": 9000, "max_concurrent": 2}


async def test_show_tenant(cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str) -> None:
    """show-tenant NAME prints the tenant's settings, usage, streams in flight, limits and model
    limits (table or JSON); an unknown tenant is one red line and exit 1."""
    made = await admin.create_tenant(db, name="acme")
    key = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    await cli.ok("set-limits", "--tenant", "acme", "--rpm", "100", "--daily-tokens", "1000000")
    await cli.ok("set-limits", "--tenant", "acme", "--model", "big:*", "--rpm", "5", "--tpm", "9000")
    await cli.ok("set-prompt-logging", "--tenant", "acme", "--on", "--ttl", "7d")
    await _ledger(db, made.id, key.key.id, dt.datetime.now(dt.UTC), prompt=40, completion=2)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        await client.zadd(RedisKeys(redis_prefix).leases(made.id, "t"), {"r1": now_ms + 60_000})

    out = await cli.ok("show-tenant", "acme")
    assert "tenant acme" in out
    assert re.search(r"active keys +1", out)
    assert re.search(r"tokens today +42", out)
    assert re.search(r"streams now +1", out)
    assert re.search(r"prompt logs +on, kept 7 d \(tenant's setting\)", out)
    assert cells(out, "│ rpm     │") == ["rpm", "100"]
    assert cells(out, "│ daily ") == ["daily", "1,000,000"]
    assert cells(out, "big:*") == ["big:*", "rpm 5 · tpm 9k"]
    assert await cli.ok("show-tenant", "--name", "acme") == out

    doc = await cli.json("show-tenant", "acme")
    assert doc["name"] == "acme"
    assert doc["active_keys"] == 1
    assert doc["usage"] == {"today": 42, "this_month": 42, "total": 42, "requests": 1}
    assert doc["streams_in_flight"] == 1
    assert doc["limits"]["rpm"] == 100

    missing = await cli("show-tenant", "nobody")
    assert missing.code == 1
    assert missing.stdout == ""
    assert "nobody" in missing.stderr


async def test_model_rule_cap_and_bad_pattern_messages(cli: Cli, db: asyncpg.Connection) -> None:
    """The 33rd rule of a tenant is refused (exit 1, one error line naming the cap) and changes
    nothing; a bad pattern is a usage error (exit 2) that names the pattern."""
    await admin.create_tenant(db, name="acme")
    one = admin.parse_limit("rpm", "1")
    for i in range(MAX_RULES_PER_SCOPE):
        await admin.set_limits(db, tenant="acme", model=f"m{i}:*", limits={"rpm": one})
    before = await snapshot(db)
    done = await cli("set-limits", "--tenant", "acme", "--model", "one-more:*", "--rpm", "1")
    assert (done.code, done.stdout) == (1, "")
    assert done.stderr.strip() == (
        "error: tenant 'acme' already has 32 model rules, the most allowed; remove one first (--model "
        "PATTERN --remove)"
    )
    done = await cli("set-limits", "--tenant", "acme", "--model", "big model", "--rpm", "1")
    assert (done.code, done.stdout) == (2, "")
    assert done.stderr.startswith("error: bad model pattern 'big model': ")
    assert await snapshot(db) == before
    await cli.ok(
        "set-limits", "--tenant", "acme", "--model", "m0:*", "--rpm", "2"
    )  # changing one still works


async def test_usage_by_model(cli: Cli, db: asyncpg.Connection) -> None:
    """usage --by model lists each model's tokens of today, this month and in total and its requests,
    from model_budget_periods of the tenant or the key only, sorted by model, as a table or JSON:
    yesterday's day row and another tenant's rows do not count."""
    acme = await admin.create_tenant(db, name="acme")
    other = await admin.create_tenant(db, name="other")
    made = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    periods = periods_at(dt.datetime.now(dt.UTC).timestamp(), ZoneInfo("UTC"))
    yesterday = periods.day - dt.timedelta(days=1)
    rows = [
        ("tenant", acme.id, "qwen3:8b", "day", periods.day, 10, 1),
        ("tenant", acme.id, "qwen3:8b", "day", yesterday, 1000, 3),
        (
            "tenant",
            acme.id,
            "qwen3:8b",
            "month",
            periods.month,
            1010,
            1,
        ),
        ("tenant", acme.id, "qwen3:8b", "total", dt.date(1970, 1, 1), 5010, 9),
        ("tenant", acme.id, "big/model:q4", "total", dt.date(1970, 1, 1), 7, 2),
        ("tenant", other.id, "qwen3:8b", "day", periods.day, 70000, 7),
        ("tenant", other.id, "other:latest", "total", dt.date(1970, 1, 1), 70000, 7),
        ("key", made.key.id, "qwen3:8b", "day", periods.day, 4, 1),
        ("key", made.key.id, "qwen3:8b", "total", dt.date(1970, 1, 1), 40, 4),
    ]
    await db.executemany(
        "INSERT INTO model_budget_periods (scope, scope_id, model, period, period_start, tokens, requests) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        rows,
    )
    doc = await cli.json("usage", "--tenant", "acme", "--by", "model")
    assert (doc["scope"], doc["name"]) == ("tenant", "acme")
    assert doc["models"] == [
        {"model": "big/model:q4", "day": 0, "month": 0, "total": 7, "requests": 2},
        {"model": "qwen3:8b", "day": 10, "month": 1010, "total": 5010, "requests": 9},
    ]
    doc = await cli.json("usage", "--prefix", f"nz_{made.key.prefix}", "--by", "model")
    assert doc["models"] == [{"model": "qwen3:8b", "day": 4, "month": 0, "total": 40, "requests": 4}]
    out = await cli.ok("usage", "--tenant", "acme", "--by", "model")
    assert "usage of tenant acme by model" in out
    assert cells(out, "qwen3:8b") == ["qwen3:8b", "10", "1,010", "5,010", "9"]
    assert cells(out, "big/model:q4") == ["big/model:q4", "0", "0", "7", "2"]
    assert "other:latest" not in out
    await admin.create_tenant(db, name="quiet")
    assert "no usage by model recorded for tenant quiet" in await cli.ok(
        "usage", "--tenant", "quiet", "--by", "model"
    )
    assert (await cli.json("usage", "--tenant", "quiet", "--by", "model"))["models"] == []


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


async def test_migrate(cli: Cli, empty_database_url: str) -> None:
    """migrate applies every migration to an empty database, and running it again is a no-op."""
    env = {"GATEWAY_DATABASE_URL": empty_database_url}
    first = await cli("migrate", env=env)
    assert first.code == 0, first.stderr
    assert "20261127000001_tenants_and_keys" in first.stdout
    assert set(TABLES) <= await _tables(empty_database_url)
    again = await cli("migrate", env=env)
    assert again.code == 0, again.stderr
    assert "20261127000001_tenants_and_keys" not in again.stdout
    assert set(TABLES) <= await _tables(empty_database_url)


async def test_migrate_json(cli: Cli, empty_database_url: str) -> None:
    """migrate --json prints {"applied": [...]}: every migration file on an empty database, then none."""
    migrations = sorted(p.name for p in (Path(__file__).parents[2] / "sql" / "migrations").glob("*.sql"))
    assert len(migrations) >= 3
    env = {"GATEWAY_DATABASE_URL": empty_database_url}
    first = await cli("migrate", "--json", env=env)
    assert first.code == 0, first.stderr
    assert orjson.loads(first.stdout) == {"applied": migrations}
    assert set(TABLES) <= await _tables(empty_database_url)
    again = await cli("migrate", "--json", env=env)
    assert again.code == 0, again.stderr
    assert orjson.loads(again.stdout) == {"applied": []}


def test_console_script_is_installed() -> None:
    """`neuronetz-gateway` is installed as a console script next to the venv's python."""
    assert SCRIPT.is_file(), f"{SCRIPT} missing: no [project.scripts] entry in pyproject.toml?"


BAD_INPUTS: dict[str, list[str]] = {
    "unknown-tenant": ["create-key", "--tenant", "nosuch", "--name", "k"],
    "unknown-tenant-suspend": ["suspend-tenant", "--name", "nosuch"],
    "bad-tenant-name": ["create-tenant", "--name", "bad name!"],
    "duplicate-tenant": ["create-tenant", "--name", "acme"],
    "duplicate-key-name": ["create-key", "--tenant", "acme", "--name", "k1"],
    "rpm-not-a-number": ["set-limits", "--tenant", "acme", "--rpm", "abc"],
    "rpm-negative": ["set-limits", "--tenant", "acme", "--rpm", "-5"],
    "rpm-superscript-digit": ["set-limits", "--tenant", "acme", "--rpm", "²"],
    "rpm-beyond-integer-column": ["set-limits", "--tenant", "acme", "--rpm", "3000000000"],
    "nothing-to-change": ["set-limits", "--tenant", "acme"],
    "bad-model-name": ["set-limits", "--tenant", "acme", "--models", "no such/model/at/all"],
    "inherit-on-tenant": ["set-limits", "--tenant", "acme", "--rpm", "inherit"],
    "num-ctx-cap-on-key": ["set-limits", "--prefix", "{prefix}", "--max-num-ctx", "4096"],
    "num-ctx-cap-zero": ["set-limits", "--tenant", "acme", "--max-num-ctx", "0"],
    "num-ctx-cap-inherit": ["set-limits", "--tenant", "acme", "--max-num-ctx", "inherit"],
    "keep-alive-cap-bad": ["set-limits", "--tenant", "acme", "--max-keep-alive", "5 minutes"],
    "keep-alive-cap-beyond-column": ["set-limits", "--tenant", "acme", "--max-keep-alive", "100000d"],
    "reload-options-without-switch": ["set-reload-options", "--prefix", "{prefix}"],
    "reload-options-unknown-prefix": ["set-reload-options", "--prefix", "nz_ZZZZZZZZ", "--on"],
    "bad-prefix": ["revoke-key", "--prefix", "xyz"],
    "unknown-prefix": ["revoke-key", "--prefix", "nz_ZZZZZZZZ"],
    "already-revoked": ["revoke-key", "--prefix", "{revoked}"],
    "on-without-ttl": ["set-prompt-logging", "--tenant", "acme", "--on"],
    "off-with-ttl": ["set-prompt-logging", "--prefix", "{prefix}", "--off", "--ttl", "7d"],
    "ttl-beyond-integer-column": ["set-prompt-logging", "--tenant", "acme", "--on", "--ttl", "100000d"],
    "bad-duration": ["create-key", "--tenant", "acme", "--name", "k2", "--expires-in", "7x"],
    "duration-overflow": ["create-key", "--tenant", "acme", "--name", "k2", "--expires-in", "999999999w"],
    "expiry-after-year-9999": ["create-key", "--tenant", "acme", "--name", "k2", "--expires-in", "3000000d"],
    "model-bad-pattern": ["set-limits", "--tenant", "acme", "--model", "no such/model", "--rpm", "5"],
    "model-with-models": ["set-limits", "--tenant", "acme", "--model", "big:*", "--models", "big"],
    "model-with-cap": ["set-limits", "--tenant", "acme", "--model", "big:*", "--max-num-ctx", "4096"],
    "model-nothing-to-change": ["set-limits", "--prefix", "{prefix}", "--model", "big:*"],
    "model-inherit-on-tenant": ["set-limits", "--tenant", "acme", "--model", "big:*", "--rpm", "inherit"],
    "remove-without-model": ["set-limits", "--tenant", "acme", "--remove"],
    "remove-with-limits": ["set-limits", "--tenant", "acme", "--model", "big:*", "--remove", "--rpm", "5"],
    "remove-missing-rule": ["set-limits", "--tenant", "acme", "--model", "big:*", "--remove"],
    "model-unknown-prefix": ["set-limits", "--prefix", "nz_ZZZZZZZZ", "--model", "big:*", "--rpm", "5"],
    "show-key-unknown-prefix": ["show-key", "--prefix", "nz_ZZZZZZZZ"],
    "show-key-without-prefix": ["show-key"],
    "usage-by-unknown": ["usage", "--tenant", "acme", "--by", "tenant"],
}


@pytest.mark.parametrize("argv", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_input_fails_cleanly_and_changes_nothing(
    argv: list[str], cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """Every kind of bad input exits non-zero with one `error: …` line on stderr (no traceback,
    nothing on stdout), leaves every table exactly as it was and publishes no invalidation."""
    world = await populate(db)
    before = await snapshot(db)
    args = [a.format(prefix=world.prefix, revoked=world.revoked) for a in argv]
    async with listen(redis_url, redis_prefix) as notices:
        done = await cli(*args)
        assert done.code != 0
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("error:"), done.stderr
        assert done.stdout == ""
        await notices.assert_nothing_published()
    assert await snapshot(db) == before


async def _wide_world(db: asyncpg.Connection) -> dict[str, str]:
    """A tenant with every limit and a model rule, a key setting one limit, a key setting none, both
    with long names; audit rows with a long model name and a latency of four digits."""
    tenant = "acme-research-eu-west"
    await admin.create_tenant(db, name=tenant)
    every = {
        "rpm": admin.LimitChange(60),
        "tpm": admin.LimitChange(40_000),
        "max_concurrent": admin.LimitChange(5),
        "daily_tokens": admin.LimitChange(1_000_000),
        "monthly_tokens": admin.LimitChange(30_000_000),
        "total_tokens": admin.LimitChange(250_000_000),
    }
    await admin.set_limits(db, tenant=tenant, limits=every)
    await admin.set_limits(db, tenant=tenant, limits={"rpm": admin.LimitChange(5)}, model="big:*")
    one = await admin.create_key(
        db, tenant=tenant, name="ci-nightly-builds-prod", pepper=PEPPER, params=CHEAP
    )
    await admin.set_limits(db, prefix=one.key.prefix, limits={"rpm": admin.LimitChange(120)})
    bare = await admin.create_key(
        db, tenant=tenant, name="laptop-of-someone-long", pepper=PEPPER, params=CHEAP
    )
    await db.execute(
        "UPDATE api_keys SET last_used_at = now() - interval '3 minutes' WHERE id = $1", one.key.id
    )
    for status, reason, model, tokens, latency in (
        (200, None, "llama3.2:latest", 123_456, 2193.4),
        (429, "key_rpm", "qwen2.5-coder:14b", 0, 3.2),
    ):
        await db.execute(
            "INSERT INTO audit_log (at, request_id, tenant_id, key_id, key_prefix, client_addr, method, "
            "path, model, status, reason, tokens, latency_ms) "
            "VALUES (now() - interval '2 hours', $1, $2, $3, $4, '203.0.113.77', 'POST', "
            "'/v1/chat/completions', $5, $6, $7, $8, $9)",
            uuid.uuid4().hex,
            one.tenant.id,
            one.key.id,
            one.key.prefix,
            model,
            status,
            reason,
            tokens,
            latency,
        )
    return {"tenant": tenant, "one": one.key.prefix, "bare": bare.key.prefix}


def _whole(stdout: str, *words: str) -> None:
    """Nothing is cut (no ellipsis), and each word is printed whole on one line."""
    assert "…" not in stdout, stdout
    lines = stdout.splitlines()
    for word in words:
        assert any(word in line for line in lines), f"{word!r} not whole in:\n{stdout}"


@pytest.mark.parametrize("columns", [80, 120])
async def test_tables_fit_the_terminal_without_cutting_what_matters(
    cli: Cli, db: asyncpg.Connection, columns: int
) -> None:
    """Every command that prints a table or panel (list-tenants, list-keys, audit, usage in its three
    forms, show-key, show-tenant, create-key with its key, set-limits and the other setters, the
    tenant and key status changes, purge-prompts, top) at 80 and 120 columns (no --wide): every line fits,
    nothing is cut, identifiers, statuses and numbers are whole; limits read as one column of what is
    set (numbers with k / M, a key's inherited rest once), times relative unless --utc."""
    world = await _wide_world(db)
    env = {"COLUMNS": str(columns)}

    async def run(*args: str, headers: tuple[str, ...] = ()) -> str:
        done = await cli(*args, env=env, wide=False)
        assert done.code == 0, done.stderr
        assert all(len(line) <= columns for line in done.stdout.splitlines()), done.stdout
        # A table wider than the terminal is cropped on the right: its last headings would be gone.
        for heading in headers:
            assert re.search(rf"(^|  ){re.escape(heading)}(  |$)", done.stdout, re.M), done.stdout
        return done.stdout

    out = await run("list-tenants", headers=("name", "status", "keys", "limits", "models"))
    _whole(out, world["tenant"], "active", "rpm 60", "40k", "5 streams", "1M/day", "30M/month", "250M")
    _whole(out, "1 model rule")
    assert out.count("inherit") == 0

    out = await run("list-keys", headers=("prefix", "name", "status", "limits", "last used"))
    _whole(out, f"nz_{world['one']}", f"nz_{world['bare']}", world["tenant"])
    _whole(out, "ci-nightly-builds-prod", "laptop-of-someone-long", "active", "rpm 120", "rest inherit")
    _whole(out, "3 min ago")
    bare_row = next(line for line in out.splitlines() if f"nz_{world['bare']}" in line)
    assert re.search(r"  inherit  ", bare_row), out  # once, not six times
    assert out.count("inherit") == 2  # the bare key's, and the other key's rest
    out = await run("list-keys", "--utc")
    _whole(out, "Z")
    assert "ago" not in out

    out = await run("audit", headers=("at", "prefix", "path", "status", "model", "tokens", "ms"))
    _whole(out, f"nz_{world['one']}", "llama3.2:latest", "qwen2.5-coder:14b", "2193", "123k", "2 h ago")
    _whole(out, "429")

    out = await run("usage", "--tenant", world["tenant"])
    _whole(out, "today", "requests")
    out = await run("show-key", world["one"])
    _whole(out, f"nz_{world['one']}", "ci-nightly-builds-prod", world["tenant"], "3 min ago", "120")
    out = await run("show-tenant", world["tenant"])
    _whole(out, world["tenant"], "active", "250,000,000", "big:*", "rpm 5")

    # Every other command that prints a table or a panel, at the same width.
    out = await run("create-key", "--tenant", world["tenant"], "--name", "a-third-key-with-a-long-name")
    [token] = TOKEN_RE.findall(out)  # the key, whole on one line
    _whole(out, token, "a-third-key-with-a-long-name", "active", "inherit")
    out = await run("set-limits", "--prefix", world["bare"], "--tpm", "25000")
    _whole(out, f"nz_{world['bare']}", "tpm 25k", "rest inherit")
    out = await run("set-prompt-logging", "--tenant", world["tenant"], "--on", "--ttl", "7d")
    _whole(out, world["tenant"], "active", "250M total")
    out = await run("create-tenant", "--name", "another-tenant-of-length")
    _whole(out, "another-tenant-of-length", "active", "none")
    out = await run("suspend-tenant", "--name", "another-tenant-of-length")
    _whole(out, "another-tenant-of-length", "suspended")
    out = await run("revoke-key", "--prefix", world["bare"])
    _whole(out, f"nz_{world['bare']}", "revoked")
    for flag in ("--on", "--off"):
        out = await run("set-templates", "--prefix", world["one"], flag)
        _whole(out, f"nz_{world['one']}", "ci-nightly-builds-prod")
        out = await run("set-reload-options", "--prefix", world["one"], flag)
        _whole(out, f"nz_{world['one']}", "ci-nightly-builds-prod")
    out = await run("usage", "--prefix", world["one"], "--by", "day", "--since", "3d")
    _whole(out, "tokens", "requests")
    out = await run("usage", "--tenant", world["tenant"], "--by", "model")
    assert "…" not in out
    out = await run("purge-prompts")
    _whole(out, "deleted 0 expired prompt log rows")
    out = await run("top", "--once", headers=("tenant", "req/min", "tok/min", "streams", "429s", "today"))
    assert "…" not in out


async def test_usage_over_time_by_day_and_hour(cli: Cli, db: asyncpg.Connection) -> None:
    """usage --by day / --by hour: one row per day or hour of the budget time zone (Asia/Tokyo here:
    a request at 20:00 UTC belongs to the next day), every bucket listed, with a bar; --json and
    --csv carry the same numbers; --since narrows; --since and --csv without --by day|hour and a
    range of over 10,000 buckets are refused."""
    made = await admin.create_tenant(db, name="acme")
    key = await admin.create_key(db, tenant="acme", name="one", pepper=PEPPER, params=CHEAP)
    tokyo = ZoneInfo("Asia/Tokyo")
    now = dt.datetime.now(dt.UTC)
    at = [now - dt.timedelta(days=2, hours=1), now - dt.timedelta(minutes=5), now - dt.timedelta(minutes=2)]
    for when, tokens in zip(at, (500, 1000, 234), strict=True):
        await _ledger(db, made.id, key.key.id, when, prompt=tokens, completion=0)
    env = {"GATEWAY_BUDGET_TIMEZONE": "Asia/Tokyo"}

    async def run(*args: str) -> str:
        done = await cli("usage", "--tenant", "acme", *args, env=env)
        assert done.code == 0, done.stderr
        return done.stdout

    days = orjson.loads(await run("--by", "day", "--json"))
    assert len(days) == 31  # 30 days back and today
    expected: dict[str, int] = {}
    for when, tokens in zip(at, (500, 1000, 234), strict=True):
        day = when.astimezone(tokyo).date().isoformat()
        expected[day] = expected.get(day, 0) + tokens
    got = {d["start"][:10]: d["tokens"] for d in days if d["tokens"]}
    assert got == expected
    assert days[-1]["start"][:10] == now.astimezone(tokyo).date().isoformat()
    assert days[-1]["start"].endswith("+09:00")
    assert sum(d["requests"] for d in days) == 3

    table = await run("--by", "day")
    assert "1,234" in table
    assert "█" in table
    assert "1,734 in all" in table

    rows = list(csv.reader(io.StringIO(await run("--by", "day", "--csv"))))
    assert rows[0] == ["day", "tokens", "requests"]
    assert [(r[0], int(r[1]), int(r[2])) for r in rows[1:]] == [
        (d["start"], d["tokens"], d["requests"]) for d in days
    ]

    hours = orjson.loads(await run("--by", "hour", "--since", "3h", "--json"))
    assert len(hours) in (4, 5)  # the hour 3 h ago, the ones between, this one
    assert sum(h["tokens"] for h in hours) == 1234

    for bad, message in (
        (("--since", "7d"), "--since and --csv go with --by day or --by hour"),
        (("--by", "model", "--csv"), "--since and --csv go with --by day or --by hour"),
        (("--by", "hour", "--since", "2000d"), "more than 10,000 hours"),
    ):
        done = await cli("usage", "--tenant", "acme", *bad, env=env)
        assert done.code != 0
        assert message in done.stderr
        assert done.stdout == ""


def _on_a_terminal(argv: list[str], env: Mapping[str, str], columns: int = 100) -> str:
    """Run a command with its stdout and stderr on a pseudo-terminal; everything it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=follower, stdout=follower, stderr=follower, env={**env, "COLUMNS": str(columns)}
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(30) == 0
    return b"".join(chunks).decode(errors="replace")


async def test_long_operations_show_progress_on_a_terminal_only(cli: Cli, db: asyncpg.Connection) -> None:
    """purge-prompts and rebuild-counters draw a progress bar on a terminal; into a pipe they print
    only their result (and --json only the document)."""
    made = await admin.create_key(
        db, tenant=(await admin.create_tenant(db, name="acme")).name, name="k", pepper=PEPPER, params=CHEAP
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    await db.executemany(
        "INSERT INTO prompt_logs (request_id, tenant_id, key_id, request_text, response_text, expires_at) "
        "VALUES ($1, $2, $3, 'q', 'a', $4)",
        [(uuid.uuid4().hex, made.tenant.id, made.key.id, past) for _ in range(25)],
    )
    shown = await asyncio.to_thread(_on_a_terminal, [*COMMAND, "purge-prompts"], cli.env)
    assert "deleting expired prompt logs" in shown
    assert "deleted 25 expired prompt log rows" in shown
    assert await db.fetchval("SELECT count(*) FROM prompt_logs") == 0
    assert await cli.ok("purge-prompts") == "deleted 0 expired prompt log rows\n"

    shown = await asyncio.to_thread(_on_a_terminal, [*COMMAND, "rebuild-counters"], cli.env)
    assert "rebuilding counters (tenants)" in shown
    assert "for 1 tenants" in shown
    piped = await cli.ok("rebuild-counters")
    assert "rebuilding" not in piped
    assert piped.startswith("rebuilt ")
    assert set(orjson.loads(await cli.ok("rebuild-counters", "--json"))) == {
        "tenants",
        "budget_counters",
        "tpm_windows",
    }


def _interactive(argv: list[str], env: Mapping[str, str], wanted: list[str], seconds: float = 20.0) -> str:
    """Run a command on a pseudo-terminal until everything `wanted` was printed, then type `q`;
    what it printed (it must exit 0 within 5 s of the `q`)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=follower, stdout=follower, stderr=follower, env={**env, "COLUMNS": "120", "TERM": "xterm"}
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + seconds
    try:
        while not all(w.encode() in seen for w in wanted):
            assert time.monotonic() < deadline, seen.decode(errors="replace")[-3000:]
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                seen += os.read(leader, 65536)
        os.write(leader, b"q")
        assert proc.wait(5) == 0
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return seen.decode(errors="replace")


async def test_top_shows_a_tenants_live_streams_and_quits_on_q(
    cli: Cli, db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """top, driven through a pseudo-terminal: the busy tenant and its key appear with their streams
    in flight (from the leases in Redis), requests, tokens and 429s of the last minute (from the audit
    log); `q` ends it with exit 0. --once and --json print one snapshot."""
    made = await admin.create_key(
        db,
        tenant=(await admin.create_tenant(db, name="busy-corp")).name,
        name="k",
        pepper=PEPPER,
        params=CHEAP,
    )
    await admin.create_tenant(db, name="idle-corp")
    now = dt.datetime.now(dt.UTC)
    # What the accountant writes: an audit row per served request, a bucket row of 3 denials.
    for _ in range(7):
        await db.execute(
            "INSERT INTO audit_log (at, request_id, tenant_id, key_id, key_prefix, status, tokens) "
            "VALUES (now(), $1, $2, $3, $4, 200, 120)",
            uuid.uuid4().hex,
            made.tenant.id,
            made.key.id,
            made.key.prefix,
        )
    await db.execute(
        "INSERT INTO audit_log (at, tenant_id, key_id, key_prefix, status, reason, count) "
        "VALUES (now(), $1, $2, $3, 429, 'key_rpm', 3)",
        made.tenant.id,
        made.key.id,
        made.key.prefix,
    )
    keys = RedisKeys(redis_prefix)
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with client:
        later = int(now.timestamp() * 1000) + 600_000
        await client.zadd(keys.reserving_tenants, {str(made.tenant.id): later})
        await client.zadd(keys.leases(made.tenant.id, "t"), {f"r{i}": later for i in range(4)})
        await client.zadd(keys.leases(made.tenant.id, f"k{made.key.id}"), {f"r{i}": later for i in range(4)})

    shot = await cli.json("top")
    [tenant] = shot["tenants"]
    assert (tenant["name"], tenant["requests"], tenant["tokens"], tenant["refused"], tenant["streams"]) == (
        "busy-corp",
        10,
        840,
        3,
        4,
    )
    [key] = shot["keys"]
    assert (key["name"], key["tenant"], key["streams"]) == (f"nz_{made.key.prefix}", "busy-corp", 4)

    once = await cli.ok("top", "--once")
    assert "busy-corp" in once
    assert "idle-corp" not in once  # nothing in its last minute

    shown = await asyncio.to_thread(
        _interactive, [*COMMAND, "top", "--interval", "0.5"], cli.env, ["busy-corp", f"nz_{made.key.prefix}"]
    )
    row = next(line for line in shown.splitlines() if "busy-corp" in line and "nz_" not in line)
    assert re.search(r"busy-corp\s+10\s+840\s+4\s+3\b", row), row


async def test_hourly_usage_counts_real_hours_across_a_daylight_saving_change(db: asyncpg.Connection) -> None:
    """New York falls back on 2026-11-01 at 02:00 EDT: 01:00-02:00 happens twice. Hourly buckets are
    real hours (the two 01:00 hours are two rows, with their offsets, each holding its own request),
    and a day bucket is the calendar day, 25 hours long, holding both."""
    made = await admin.create_tenant(db, name="acme")
    key = await admin.create_key(db, tenant="acme", name="k", pepper=PEPPER, params=CHEAP)
    york = ZoneInfo("America/New_York")
    first = dt.datetime(2026, 11, 1, 5, 30, tzinfo=dt.UTC)  # 01:30 EDT
    second = dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.UTC)  # 01:30 EST, an hour later
    for when, tokens in ((first, 11), (second, 22)):
        await _ledger(db, made.id, key.key.id, when, prompt=tokens, completion=0)
    now = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)
    hours = await admin.usage_series(
        db, tenant="acme", by="hour", since=dt.datetime(2026, 11, 1, 4, 0, tzinfo=dt.UTC), now=now, zone=york
    )
    assert [(b.start.isoformat(), b.tokens) for b in hours] == [
        ("2026-11-01T00:00:00-04:00", 0),
        ("2026-11-01T01:00:00-04:00", 11),
        ("2026-11-01T01:00:00-05:00", 22),
        ("2026-11-01T02:00:00-05:00", 0),
        ("2026-11-01T03:00:00-05:00", 0),
        ("2026-11-01T04:00:00-05:00", 0),
    ]
    days = await admin.usage_series(db, tenant="acme", by="day", since=first, now=now, zone=york)
    assert [(b.start.isoformat(), b.tokens, b.requests) for b in days] == [
        ("2026-11-01T00:00:00-04:00", 33, 2)
    ]
    # A bare date is the budget zone's midnight, and the first bucket is whole.
    since = admin.parse_since("2026-11-01", now, york)
    assert since == dt.datetime(2026, 11, 1, 4, 0, tzinfo=dt.UTC)


async def test_text_a_client_controls_prints_as_itself(cli: Cli, db: asyncpg.Connection) -> None:
    """A path, a model and a key name holding rich markup (`[/]` closes nothing, `[link=…]` would
    make a link) are printed literally by audit and list-keys, compact and wide, never crashing them."""
    await admin.create_tenant(db, name="acme")
    made = await admin.create_key(
        db, tenant="acme", name="[link=http://evil.example]click[/]", pepper=PEPPER, params=CHEAP
    )
    await db.execute(
        "INSERT INTO audit_log (at, request_id, tenant_id, key_id, key_prefix, method, path, model, status) "
        "VALUES (now(), $1, $2, $3, $4, 'POST', '/v1/[/x]', 'llama[/]', 404)",
        uuid.uuid4().hex,
        made.tenant.id,
        made.key.id,
        made.key.prefix,
    )
    for wide in (False, True):
        done = await cli("audit", wide=wide)
        assert done.code == 0, done.stderr
        assert "[/x]" in done.stdout
        assert "llama[/]" in done.stdout
        done = await cli("list-keys", wide=wide)
        assert done.code == 0, done.stderr
        assert "[link=http://evil.example]click[/]" in done.stdout


async def test_doctor_with_no_configuration_reports_it_instead_of_failing_first(tmp_path: Path) -> None:
    """With no GATEWAY_* variable at all, doctor still runs every check it can: each component's
    configuration is a red line naming what is missing, exit 1, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_STACK_FILE"] = str(tmp_path / "none.json")
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, "doctor", "--json", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"Traceback" not in err
    checks = {c["part"]: c for c in orjson.loads(out)}
    for part in ("config: authz_sidecar", "config: stream_proxy", "config: accountant", "config: admin"):
        assert not checks[part]["ok"]
        assert "GATEWAY_DATABASE_URL" in checks[part]["detail"] or "GATEWAY_" in checks[part]["detail"]
    assert not checks["authz_sidecar"]["ok"]
