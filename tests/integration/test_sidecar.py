"""The authz_sidecar in process, against real Postgres and Valkey: grants for allowed requests, the
key cache, cheap refusal of bad keys, key denials in both dialects, the failed-auth limiter, the
denial audit stream, the operations endpoints and the container probe."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import random
import secrets
import string
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import attrs
import coredis
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from asyncpg.connection import LoggedQuery
from prometheus_client.parser import text_string_to_metric_families

import localstack
from authz_sidecar import invalidations
from authz_sidecar.app import AUTHENTICATOR, DRAINING, POOL, create_app
from authz_sidecar.keys import Authenticator
from shared import admin, keys
from shared import grant as grants
from shared.config import SidecarConfig, load_config
from shared.hashing import Argon2Params
from shared.models import Limits
from shared.redis_keys import RedisKeys
from tests.integration.serving import serving

pytestmark = pytest.mark.integration

PEPPER = "sidecar-test-pepper-0123456789abcdef0123456789"
GRANT_SECRET = "sidecar-test-grant-secret-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=1024, time_cost=1, parallelism=1)
CLIENT = "198.51.100.7"
# A fixed wall clock half a minute into a minute: every request of a test falls into one
# failed-auth window and one audit minute, and Retry-After is exact.
MINUTE = 60.0
WAIT_SECONDS = 5.0


@attrs.define
class FixedClock:
    """The wall clock the app sees; tests move it by hand."""

    now: float

    def __call__(self) -> float:
        return self.now


def fixed_clock() -> FixedClock:
    """Real time (so key expiry dates in Postgres make sense), pinned 10.5 s into its minute."""
    now = dt.datetime.now(dt.UTC).timestamp()
    return FixedClock(now - now % MINUTE + 10.5)


@attrs.frozen
class Reply:
    """A finished HTTP exchange."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


@attrs.frozen
class Sidecar:
    """A running sidecar app and a client session for it."""

    app: web.Application
    server: TestServer
    session: aiohttp.ClientSession
    clock: FixedClock

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        """GET one of the sidecar's own routes."""
        async with self.session.get(self.server.make_url(path), headers=headers) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def authz(
        self,
        token: str | None,
        *,
        uri: str = "/api/chat",
        method: str = "POST",
        addr: str = CLIENT,
        request_id: str | None = None,
        authorization: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Reply:
        """What Caddy's forward_auth sends for one client request (the client address in
        X-Gw-Client-Ip, Caddy's {client_ip}), plus any `extra` headers the client sent."""
        headers = {
            **(extra or {}),
            "X-Forwarded-Method": method,
            "X-Forwarded-Uri": uri,
            "X-Gw-Client-Ip": addr,
            "X-Request-Id": request_id or secrets.token_hex(16),
        }
        if authorization is not None:
            headers["Authorization"] = authorization
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.get("/authz", headers)

    @property
    def authenticator(self) -> Authenticator:
        """The app's Authenticator (counters: argon2_calls, db_lookups, cache hits/misses)."""
        return self.app[AUTHENTICATOR]


@pytest.fixture
def sidecar_env(database_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """GATEWAY_* for a sidecar on this test's database and Redis prefix."""
    return {
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "GATEWAY_GRANT_SECRET": GRANT_SECRET,
        "GATEWAY_KEY_PEPPER": PEPPER,
    }


@contextlib.asynccontextmanager
async def running(env: Mapping[str, str], clock: FixedClock | None = None) -> AsyncIterator[Sidecar]:
    """create_app(config, clock=…) served in process (tests/integration/serving.py)."""
    clock = clock or fixed_clock()
    app = create_app(load_config(SidecarConfig, env), clock=clock)
    async with serving(app) as (server, session):
        yield Sidecar(app, server, session, clock)


@pytest.fixture
async def sidecar(sidecar_env: dict[str, str]) -> AsyncIterator[Sidecar]:
    """A sidecar with the default options."""
    async with running(sidecar_env) as running_sidecar:
        yield running_sidecar


async def new_key(
    db: asyncpg.Connection, tenant: str, *, name: str = "k", create_tenant: bool = True, **kwargs: Any
) -> admin.CreatedKey:
    """A key (cheap Argon2) in a tenant, creating the tenant first unless told otherwise."""
    if create_tenant:
        await admin.create_tenant(db, name=tenant)
    return await admin.create_key(db, tenant=tenant, name=name, pepper=PEPPER, params=CHEAP, **kwargs)


def unknown_token() -> str:
    """Well formed, valid checksum, but a prefix no key has."""
    body = "".join(secrets.choice(keys.ALPHABET) for _ in range(keys.PREFIX_LEN + keys.RANDOM_LEN))
    return keys.KEY_SCHEME + body + keys.checksum(body)


def bad_checksum_token(rng: random.Random) -> str:
    """`nz_`-shaped, right length and alphabet, wrong checksum."""
    body = "".join(rng.choice(keys.ALPHABET) for _ in range(keys.PREFIX_LEN + keys.RANDOM_LEN))
    while (given := "".join(rng.choice(keys.ALPHABET) for _ in range(keys.CHECKSUM_LEN))) == keys.checksum(
        body
    ):
        pass  # pragma: no cover - one chance in 62^6
    return keys.KEY_SCHEME + body + given


def random_authorization(rng: random.Random, i: int) -> str:
    """An Authorization value no key can match: random text, or `nz_` keys with bad checksums."""
    printable = string.ascii_letters + string.digits + string.punctuation
    kind = i % 4
    if kind == 0:
        return "Bearer " + "".join(rng.choice(printable) for _ in range(rng.randint(1, 120)))
    if kind == 1:
        return "".join(rng.choice(printable) for _ in range(rng.randint(1, 120)))
    if kind == 2:
        return "Bearer " + bad_checksum_token(rng)
    # nz_ with a wrong length (one character short or long) and otherwise plausible
    token = bad_checksum_token(rng)
    return "Bearer " + (token[:-1] if rng.random() < 0.5 else token + rng.choice(keys.ALPHABET))


# --- grants and the key cache -----------------------------------------------------------------


async def test_allowed_request_gets_a_signed_grant_for_exactly_that_request(
    sidecar: Sidecar, db: asyncpg.Connection
) -> None:
    """An allowed request gets 200 with X-Gw-Request-Id (the X-Request-Id sent) and an X-Gw-Grant that
    verifies with the grant secret and binds tenant, key, prefix, method, the path without its query,
    an expiry at most 60 s ahead, the tenant's models, inherited limits, the prompt-logging policy and
    the client address Caddy passed in X-Gw-Client-Ip (not the left-most X-Forwarded-For entry, which
    a client writes when Caddy trusts a proxy in front of it)."""
    await admin.create_tenant(db, name="acme")
    await admin.set_limits(
        db,
        tenant="acme",
        limits={"rpm": admin.LimitChange(100), "tpm": admin.LimitChange(5000)},
        models=admin.parse_models("llama3.2,qwen3:8b"),
    )
    await admin.set_prompt_logging(db, tenant="acme", on=True, ttl=dt.timedelta(days=7))
    created = await new_key(db, "acme", create_tenant=False)

    reply = await sidecar.authz(
        created.token,
        uri="/api/chat?stream=true&x=1",
        request_id="req-123",
        extra={"X-Forwarded-For": "203.0.113.66, 10.0.0.1"},
    )

    assert reply.status == 200, reply.body
    assert reply.headers["X-Gw-Request-Id"] == "req-123"
    now = sidecar.clock()
    grant = grants.verify(
        reply.headers["X-Gw-Grant"], secrets=(GRANT_SECRET,), method="POST", path="/api/chat", now=now
    )
    assert grant.request_id == "req-123"
    assert grant.tenant_id == created.tenant.id
    assert grant.key_id == created.key.id
    assert grant.key_prefix == created.key.prefix
    assert grant.method == "POST"
    assert grant.path == "/api/chat"
    assert 0 < grant.expires_at - now <= 60
    assert grant.allowed_models == admin.parse_models("llama3.2,qwen3:8b")
    assert grant.key_limits == Limits(rpm=100, tpm=5000)
    assert grant.tenant_limits == Limits(rpm=100, tpm=5000)
    assert grant.prompt_logging is True
    assert grant.prompt_log_ttl_seconds == 7 * 86400
    assert grant.client_addr == CLIENT
    with pytest.raises(grants.GrantError):
        grants.verify(
            reply.headers["X-Gw-Grant"], secrets=("another secret",), method="POST", path="/api/chat", now=now
        )


async def test_second_request_with_a_key_is_a_cache_hit(sidecar: Sidecar, db: asyncpg.Connection) -> None:
    """The first request with a key costs one Postgres lookup and one Argon2 verification; the second
    is served from the in-process cache with neither."""
    created = await new_key(db, "acme")
    auth = sidecar.authenticator

    first = await sidecar.authz(created.token)
    assert first.status == 200
    assert (auth.argon2_calls, auth.db_lookups) == (1, 1)
    hits = auth.cache.hits

    second = await sidecar.authz(created.token, uri="/v1/chat/completions")
    assert second.status == 200
    assert (auth.argon2_calls, auth.db_lookups) == (1, 1)
    assert auth.cache.hits == hits + 1


async def test_a_thousand_invalid_keys_cost_no_argon2_and_no_postgres_query(
    sidecar_env: dict[str, str],
) -> None:
    """1,000 requests with random garbage or bad-checksum `nz_` keys from 1,000 client addresses are all
    refused with 401 while the app's Postgres pool runs not a single query for them (a query logger
    on every pooled connection) and Argon2 never runs."""
    size = 3
    async with running({**sidecar_env, "GATEWAY_DATABASE_POOL_MAX": str(size)}) as sidecar:
        pool = sidecar.app[POOL]
        logged: list[str] = []

        def log_query(record: LoggedQuery) -> None:
            logged.append(record.query)

        async with contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(pool.acquire()) for _ in range(size)]
            reset_query = held[0].get_reset_query()
            for conn in held:
                conn.add_query_logger(log_query)
        assert pool.get_size() == size
        # The logger works: a query through the pool is seen (then forget it).
        await pool.fetchval("SELECT 42")
        await asyncio.sleep(0)
        assert "SELECT 42" in logged
        logged.clear()
        auth = sidecar.authenticator
        before = (auth.argon2_calls, auth.db_lookups)

        rng = random.Random(20261127)  # noqa: S311 - reproducible garbage, not secrets
        limit = asyncio.Semaphore(32)

        async def one(i: int) -> Reply:
            async with limit:
                return await sidecar.authz(
                    None, authorization=random_authorization(rng, i), addr=f"203.0.{i // 250}.{i % 250 + 1}"
                )

        replies = await asyncio.gather(*(one(i) for i in range(1000)))
        for _ in range(3):
            await asyncio.sleep(0)

        assert sorted({r.status for r in replies}) == [401]
        assert all(r.headers.get("WWW-Authenticate", "").startswith("Bearer") for r in replies)
        # The invalidation listener polls Postgres in the background (and the pool resets a
        # connection after it); nothing else may have run.
        background = {"SELECT now()", invalidations._CHANGED_SQL, reset_query}
        assert [q for q in logged if q not in background] == []
        assert (auth.argon2_calls, auth.db_lookups) == before


async def test_unknown_prefix_is_looked_up_once_then_negatively_cached(
    sidecar: Sidecar, db: asyncpg.Connection
) -> None:
    """A token with a valid checksum but an unknown prefix costs one Postgres lookup (and no Argon2);
    the same token again is refused from the negative cache without a second lookup."""
    await new_key(db, "acme")  # a real key exists, just not this one
    token = unknown_token()
    auth = sidecar.authenticator

    first = await sidecar.authz(token)
    assert first.status == 401
    assert first.json() == {"error": "invalid API key"}
    assert (auth.argon2_calls, auth.db_lookups) == (0, 1)
    hits = auth.cache.hits

    second = await sidecar.authz(token, addr="192.0.2.99")
    assert second.status == 401
    assert second.json() == {"error": "invalid API key"}
    assert (auth.argon2_calls, auth.db_lookups) == (0, 1)
    assert auth.cache.hits == hits + 1


# --- key denials in both dialects --------------------------------------------------------------

OLLAMA_PATH = "/api/chat"
OPENAI_PATH = "/v1/chat/completions"


def assert_denied(reply: Reply, *, status: int, message: str, dialect: str, code: str) -> None:
    """Status, dialect-shaped body, and WWW-Authenticate exactly on 401."""
    assert reply.status == status, reply.body
    if dialect == "ollama":
        assert reply.json() == {"error": message}
    else:
        err_type = {401: "authentication_error", 403: "permission_error"}[status]
        assert reply.json() == {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    if status == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert "WWW-Authenticate" not in reply.headers


@pytest.mark.parametrize(("uri", "dialect"), [(OLLAMA_PATH, "ollama"), (OPENAI_PATH, "openai")])
async def test_revoked_expired_and_suspended_keys_are_refused_in_the_callers_dialect(
    sidecar: Sidecar, db: asyncpg.Connection, uri: str, dialect: str
) -> None:
    """A revoked key gets 401 "API key revoked", an expired key 401 "API key expired" (both with
    WWW-Authenticate: Bearer), a key of a suspended tenant 403 "tenant suspended"; Ollama-shaped under
    /api, OpenAI-shaped under /v1."""
    revoked = await new_key(db, "revoking")
    await admin.revoke_key(db, prefix=revoked.key.prefix)
    expired = await new_key(
        db,
        "expiring",
        expires_in=dt.timedelta(hours=1),
        now=dt.datetime.fromtimestamp(sidecar.clock(), dt.UTC) - dt.timedelta(hours=2),
    )
    suspended = await new_key(db, "suspending")
    await admin.set_tenant_status(db, name="suspending", status="suspended")

    assert_denied(
        await sidecar.authz(revoked.token, uri=uri),
        status=401,
        message="API key revoked",
        dialect=dialect,
        code="invalid_api_key",
    )
    assert_denied(
        await sidecar.authz(expired.token, uri=uri),
        status=401,
        message="API key expired",
        dialect=dialect,
        code="invalid_api_key",
    )
    assert_denied(
        await sidecar.authz(suspended.token, uri=uri),
        status=403,
        message="tenant suspended",
        dialect=dialect,
        code="tenant_suspended",
    )


async def test_a_cached_key_is_refused_once_the_clock_passes_its_expiry(
    sidecar: Sidecar, db: asyncpg.Connection
) -> None:
    """A key cached as valid stops working when the injected clock passes its expiry, without waiting
    for the cache entry to age out."""
    created = await new_key(
        db,
        "acme",
        expires_in=dt.timedelta(minutes=10),
        now=dt.datetime.fromtimestamp(sidecar.clock(), dt.UTC),
    )
    assert (await sidecar.authz(created.token)).status == 200
    sidecar.clock.now += 11 * 60
    assert_denied(
        await sidecar.authz(created.token, uri=OPENAI_PATH),
        status=401,
        message="API key expired",
        dialect="openai",
        code="invalid_api_key",
    )
    assert sidecar.authenticator.db_lookups == 1


# --- failed-auth limiter ------------------------------------------------------------------------


async def test_failed_auth_limiter_blocks_one_address_for_the_rest_of_its_minute(
    sidecar_env: dict[str, str], db: asyncpg.Connection
) -> None:
    """With 5 failures per minute allowed, the 6th unknown key from one address gets 429 with an exact
    Retry-After and no Postgres lookup; another address still gets its 401, a key already cached as
    valid still works from the blocked address, and the next minute unblocks it."""
    env = {**sidecar_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "5"}
    async with running(env) as sidecar:
        created = await new_key(db, "acme")
        auth = sidecar.authenticator
        assert (await sidecar.authz(created.token)).status == 200

        for _ in range(5):
            assert (await sidecar.authz(unknown_token())).status == 401
        lookups = auth.db_lookups

        blocked = await sidecar.authz(unknown_token())
        assert blocked.status == 429
        assert blocked.headers["Retry-After"] == str(math.ceil(MINUTE - sidecar.clock() % MINUTE))
        assert blocked.json() == {"error": "too many failed authentications from this address"}
        blocked_openai = await sidecar.authz(unknown_token(), uri=OPENAI_PATH)
        assert blocked_openai.status == 429
        assert blocked_openai.json()["error"]["code"] == "rate_limit_exceeded"
        assert blocked_openai.json()["error"]["type"] == "rate_limit_error"
        assert auth.db_lookups == lookups

        other = await sidecar.authz(unknown_token(), addr="192.0.2.1")
        assert other.status == 401
        assert auth.db_lookups == lookups + 1

        assert (await sidecar.authz(created.token)).status == 200

        sidecar.clock.now += MINUTE
        assert (await sidecar.authz(unknown_token())).status == 401
        assert auth.db_lookups == lookups + 2


def same_prefix_guess(token: str, rng: random.Random) -> str:
    """A key with `token`'s prefix, another random part and a valid checksum: it reaches Argon2."""
    prefix = keys.parse_key(token).prefix
    while True:
        body = prefix + "".join(rng.choice(keys.ALPHABET) for _ in range(keys.RANDOM_LEN))
        guess = keys.KEY_SCHEME + body + keys.checksum(body)
        if guess != token:
            return guess


def metric(text: str, name: str) -> float:
    """One unlabelled sample of a /metrics answer."""
    (value,) = [
        s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]
    return value


async def test_wrong_secrets_for_one_prefix_are_refused_without_argon2_after_ten(
    sidecar_env: dict[str, str], db: asyncpg.Connection, redis_url: str, redis_prefix: str
) -> None:
    """With the defaults, 10 wrong secrets for one real prefix (each from another address, so the
    per-address limiter is not what stops them) cost 10 Argon2 verifications and get 401; the next
    40 get 429 with a Retry-After within the minute window and cost neither Argon2 nor Postgres
    (authz_argon2_verifications_total stays put). The holder's key, verified before the flood, still
    gets 200 once its cache entry is gone, without Argon2; so does it on a second replica that never
    saw it, where a guess is refused too: the count lives in Redis. The count expires with its
    window."""
    rng = random.Random(7)  # noqa: S311 - reproducible guesses, not secrets
    async with running(sidecar_env) as sidecar:
        created = await new_key(db, "acme")
        auth = sidecar.authenticator
        assert (await sidecar.authz(created.token)).status == 200
        assert auth.argon2_calls == 1

        for i in range(10):
            guess = await sidecar.authz(same_prefix_guess(created.token, rng), addr=f"198.51.100.{i + 10}")
            assert guess.status == 401, guess.body
        assert auth.argon2_calls == 11
        lookups = auth.db_lookups

        for i in range(40):
            refused = await sidecar.authz(same_prefix_guess(created.token, rng), addr=f"192.0.2.{i + 10}")
            assert refused.status == 429, refused.body
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            assert refused.json() == {"error": "too many failed authentications for this API key"}
        assert (auth.argon2_calls, auth.db_lookups) == (11, lookups)
        text = (await sidecar.get("/metrics")).body.decode()
        assert metric(text, "authz_argon2_verifications_total") == 11
        assert metric(text, "authz_key_guess_refusals_total") == 40
        assert created.key.prefix not in text

        auth.cache.clear()
        assert (await sidecar.authz(created.token)).status == 200
        assert (auth.argon2_calls, auth.db_lookups) == (11, lookups + 1)

        async with running(sidecar_env) as replica:
            assert (await replica.authz(same_prefix_guess(created.token, rng))).status == 429
            assert (await replica.authz(created.token)).status == 200
            assert replica.authenticator.argon2_calls == 0

    async with coredis.Redis.from_url(redis_url) as redis:
        left = await redis.pttl(RedisKeys(redis_prefix).key_mismatches(created.key.prefix))
    assert 0 < left <= 60_000


async def test_a_concurrent_guessing_burst_overshoots_by_at_most_the_argon2_slots(
    sidecar_env: dict[str, str], db: asyncpg.Connection
) -> None:
    """50 wrong secrets for one prefix sent at once (the limit is checked again under the Argon2
    slot, not only before queueing for it) run Argon2 at most limit + slots - 1 times; the rest get
    429."""
    rng = random.Random(11)  # noqa: S311 - reproducible guesses, not secrets
    env = {**sidecar_env, "GATEWAY_KEY_MISMATCHES_PER_WINDOW": "5"}
    async with running(env) as sidecar:
        created = await new_key(db, "acme")
        guesses = [same_prefix_guess(created.token, rng) for _ in range(50)]
        replies = await asyncio.gather(
            *(sidecar.authz(g, addr=f"198.51.100.{i}") for i, g in enumerate(guesses))
        )
        statuses = sorted(r.status for r in replies)
        argon2 = sidecar.authenticator.argon2_calls
        assert 5 <= argon2 <= 5 + 2 - 1
        assert statuses == [401] * argon2 + [429] * (50 - argon2)


async def test_the_per_prefix_limit_can_be_turned_off(
    sidecar_env: dict[str, str], db: asyncpg.Connection
) -> None:
    """GATEWAY_KEY_MISMATCHES_PER_WINDOW=0: every wrong secret is verified (and 401)."""
    rng = random.Random(13)  # noqa: S311 - reproducible guesses, not secrets
    env = {**sidecar_env, "GATEWAY_KEY_MISMATCHES_PER_WINDOW": "0"}
    async with running(env) as sidecar:
        created = await new_key(db, "acme")
        for i in range(12):
            assert (
                await sidecar.authz(same_prefix_guess(created.token, rng), addr=f"198.51.100.{i}")
            ).status == 401
        assert sidecar.authenticator.argon2_calls == 12


async def test_failed_auth_limiter_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4(
    sidecar_env: dict[str, str],
) -> None:
    """With 3 failures a minute allowed: 3 unknown keys from three addresses of one IPv6 /64 block a
    fourth address of that /64 (429) but not one of the neighbouring /64 (401); 3 from
    ::ffff:192.0.2.5 block 192.0.2.5 itself."""
    env = {**sidecar_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "3"}
    async with running(env) as sidecar:
        for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"):
            assert (await sidecar.authz(unknown_token(), addr=host)).status == 401
        assert (await sidecar.authz(unknown_token(), addr="2001:db8:1:2:abcd::99")).status == 429
        assert (await sidecar.authz(unknown_token(), addr="2001:db8:1:3::1")).status == 401

        for _ in range(3):
            assert (await sidecar.authz(unknown_token(), addr="::ffff:192.0.2.5")).status == 401
        assert (await sidecar.authz(unknown_token(), addr="192.0.2.5")).status == 429
        assert (await sidecar.authz(unknown_token(), addr="192.0.2.6")).status == 401


# --- denial audit --------------------------------------------------------------------------------


async def audit_entries(redis: coredis.Redis[bytes], stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the audit stream."""
    entries = await redis.xrange(stream)
    return [
        (as_bytes(entry.identifier), {as_bytes(k): as_bytes(v) for k, v in entry.field_values.items()})
        for entry in entries
    ]


def as_bytes(value: str | bytes) -> bytes:
    """coredis types stream fields as str or bytes; a bytes client returns bytes."""
    assert isinstance(value, bytes)
    return value


def audit_rows(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The denial rows of every batch."""
    rows: list[dict[str, Any]] = []
    for _, fields in entries:
        assert fields[b"kind"] == b"denials"
        batch = orjson.loads(fields[b"rows"])
        assert isinstance(batch, list)
        rows.extend(batch)
    return rows


async def wait_for_rows(
    redis: coredis.Redis[bytes], stream: str, done: Any
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Poll the audit stream every 20 ms until `done(rows)`, at most WAIT_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        entries = await audit_entries(redis, stream)
        if done(audit_rows(entries)):
            return entries
        if loop.time() > deadline:
            raise AssertionError(f"audit stream incomplete after {WAIT_SECONDS} s: {audit_rows(entries)}")
        await asyncio.sleep(0.02)


async def test_denials_reach_the_audit_stream_in_batches_aggregated_and_without_keys(
    sidecar_env: dict[str, str], redis_url: str, redis_prefix: str, db: asyncpg.Connection
) -> None:
    """Denials are XADDed to `<prefix>audit` in batches; every unauthenticated denial (a revoked
    key, a blocked route, unknown and malformed keys) is aggregated per address, reason and minute
    with no request id: 200 unknown-key denials from one address in one minute become ONE row with
    count 200; and no byte of the stream carries a presented token or any part of one."""
    env = {**sidecar_env, "GATEWAY_AUTH_FAILURES_PER_MINUTE": "0"}
    stream = RedisKeys(redis_prefix).audit_stream
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    async with running(env) as sidecar, client:
        revoked = await new_key(db, "acme")
        await admin.revoke_key(db, prefix=revoked.key.prefix)
        sent = [revoked.token]

        # Individual denials; seeing them in the stream also tells us a batch was just shipped,
        # so the flood below falls into the next batch.
        revoked_reply = await sidecar.authz(revoked.token, request_id="rid-revoked", addr="192.0.2.60")
        assert revoked_reply.status == 401
        pull_reply = await sidecar.authz(
            revoked.token, uri="/api/pull", request_id="rid-pull", addr="192.0.2.61"
        )
        assert pull_reply.status == 403
        firsts = {"192.0.2.60", "192.0.2.61"}
        await wait_for_rows(client, stream, lambda rows: firsts <= {r["client_addr"] for r in rows})
        shipped = len(await audit_entries(client, stream))

        flood = [unknown_token() for _ in range(200)]
        sent += flood
        limit = asyncio.Semaphore(50)

        async def one(token: str) -> int:
            async with limit:
                reply = await sidecar.authz(
                    token, uri=f"/v1/chat/completions?api_key={token}", addr="192.0.2.50"
                )
                return reply.status

        assert set(await asyncio.gather(*(one(t) for t in flood))) == {401}
        malformed = bad_checksum_token(random.Random(7))  # noqa: S311 - not a secret
        sent.append(malformed)
        assert (await sidecar.authz(malformed, addr="192.0.2.51")).status == 401

        def flood_seen(rows: list[dict[str, Any]]) -> bool:
            return any(r["client_addr"] == "192.0.2.51" for r in rows) and (
                sum(r["count"] for r in rows if r["client_addr"] == "192.0.2.50") >= 200
            )

        entries = await wait_for_rows(client, stream, flood_seen)
        rows = audit_rows(entries)

        assert len(entries) > shipped  # the flood came in a later batch than the first denials
        by_address = {r["client_addr"]: r for r in rows}
        assert by_address["192.0.2.60"]["reason"] == "key_revoked"
        assert by_address["192.0.2.60"]["status"] == 401
        assert by_address["192.0.2.60"]["count"] == 1
        assert by_address["192.0.2.61"]["reason"] == "policy_403"
        assert by_address["192.0.2.61"]["path"] == "/api/pull"
        assert {r["request_id"] for r in rows} == {None}
        flood_rows = [r for r in rows if r["client_addr"] == "192.0.2.50"]
        assert len(flood_rows) == 1, flood_rows
        (row,) = flood_rows
        assert row["count"] == 200
        assert row["reason"] == "key_unknown"
        assert row["status"] == 401
        assert row["path"] == "/v1/chat/completions"
        assert row["at"] == sidecar.clock() - sidecar.clock() % MINUTE
        assert row["request_id"] is None
        assert row["key_prefix"] is None
        (malformed_row,) = [r for r in rows if r["client_addr"] == "192.0.2.51"]
        assert (malformed_row["reason"], malformed_row["count"]) == ("key_malformed", 1)

        raw = b"".join(
            [ident for ident, _ in entries] + [k + v for _, fields in entries for k, v in fields.items()]
        )
        for token in sent:
            prefix_len = len(keys.KEY_SCHEME) + keys.PREFIX_LEN
            for part in (token, token[len(keys.KEY_SCHEME) :], token[:prefix_len], token[prefix_len:]):
                assert part.encode() not in raw
            assert token[3:11].encode() not in raw  # the prefix alone


# --- operations endpoints and the probe -----------------------------------------------------------


async def test_healthz_and_readyz_answer_and_draining_makes_readyz_fail(sidecar: Sidecar) -> None:
    """/healthz is 200; /readyz is 200 with postgres and redis true, and 503 once the app is draining."""
    health = await sidecar.get("/healthz")
    assert health.status == 200
    assert health.json() == {"status": "ok"}

    ready = await sidecar.get("/readyz")
    assert ready.status == 200
    assert ready.json() == {"ready": True, "draining": False, "postgres": True, "redis": True}

    sidecar.app[DRAINING].set()
    draining = await sidecar.get("/readyz")
    assert draining.status == 503
    assert draining.json() == {"ready": False, "draining": True, "postgres": True, "redis": True}
    assert (await sidecar.get("/healthz")).status == 200


async def test_metrics_count_decisions_by_outcome_and_reason_and_never_name_a_key(
    sidecar: Sidecar, db: asyncpg.Connection
) -> None:
    """/metrics has authz_decisions_total with outcome and reason labels and the authz_decision_seconds
    histogram, and no sample, label or line mentions a key prefix or a presented token."""
    created = await new_key(db, "acme")
    unknown = unknown_token()
    assert (await sidecar.authz(created.token)).status == 200
    assert (await sidecar.authz(created.token)).status == 200
    assert (await sidecar.authz(unknown)).status == 401

    reply = await sidecar.get("/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("authz_decisions_total", (("outcome", "allow"), ("reason", "allowed")))] == 2
    assert samples[("authz_decisions_total", (("outcome", "deny"), ("reason", "key_unknown")))] == 1
    assert samples[("authz_decision_seconds_count", ())] == 3
    assert any(name == "authz_decision_seconds_bucket" for name, _ in samples)
    assert {label for _, labels in samples for label, _ in labels} <= {"outcome", "reason", "le"}
    for secret in (created.token, created.key.prefix, unknown, unknown[3:11], unknown[11:]):
        assert secret not in text


async def run_probe(*args: str) -> tuple[int, str]:
    """`python -m authz_sidecar.probe …` as a real process (without blocking the served loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authz_sidecar.probe",
        *args,
        cwd=localstack.ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_probe_exits_0_against_a_ready_sidecar_and_1_against_a_closed_port(sidecar: Sidecar) -> None:
    """The container healthcheck exits 0 when /readyz answers 200, and 1 when nothing listens."""
    url = str(sidecar.server.make_url("/readyz"))
    code, out = await run_probe(url)
    assert (code, out.strip()) == (0, f"ready: {url}")

    closed = f"http://127.0.0.1:{localstack.free_port()}/readyz"
    code, out = await run_probe(closed)
    assert (code, out.strip()) == (1, f"not ready: {closed}")

    sidecar.app[DRAINING].set()
    code, _ = await run_probe(url)
    assert code == 1
