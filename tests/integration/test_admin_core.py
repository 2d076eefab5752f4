"""The admin core functions and key authentication, called directly on a real Postgres connection:
the edge cases the CLI tests do not reach."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from shared import admin, keys
from shared.exceptions import AdminError, ConflictError, KeyFormatError, NotFoundError
from shared.hashing import Argon2Params
from shared.invalidation import Invalidation
from shared.keystore import Verdict, authenticate
from shared.models import UNLIMITED, Limits

pytestmark = pytest.mark.integration

PEPPER = "core-test-pepper-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=64, time_cost=1)
T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
TABLES = ("tenants", "api_keys", "usage_ledger", "budget_periods", "audit_log", "prompt_logs")


async def snapshot(db: asyncpg.Connection) -> dict[str, list[str]]:
    """Every row of every table, as JSON text."""
    dump: dict[str, list[str]] = {}
    for table in TABLES:
        rows = await db.fetch(f"SELECT row_to_json(t)::text AS j FROM {table} t")  # noqa: S608 - fixed names
        dump[table] = sorted(r["j"] for r in rows)
    return dump


async def new_key(
    db: asyncpg.Connection,
    tenant: str = "acme",
    name: str = "k1",
    *,
    expires_in: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> admin.CreatedKey:
    """A key hashed with cheap Argon2 parameters (verification reads them from the PHC string)."""
    return await admin.create_key(
        db, tenant=tenant, name=name, expires_in=expires_in, now=now, pepper=PEPPER, params=CHEAP
    )


def with_other_secret(token: str) -> str:
    """Same prefix, a different random part, a correct checksum: passes parse_key, wrong secret."""
    prefix, random_part = token[3:11], token[11:43]
    other = random_part[::-1] if random_part[::-1] != random_part else "0" * 32
    body = prefix + other
    return "nz_" + body + keys.checksum(body)


async def test_revoking_twice_fails_and_changes_nothing(db: asyncpg.Connection) -> None:
    """A second revoke of the same key raises AdminError, keeps the first revoked_at and changes no
    row; a prefix nobody has is NotFoundError."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    key, notices = await admin.revoke_key(db, prefix=created.key.prefix)
    assert key.status == "revoked"
    assert notices == [Invalidation("key", created.key.tenant_id, created.key.id, reason="revoked")]
    before = await snapshot(db)
    with pytest.raises(AdminError, match="already revoked"):
        await admin.revoke_key(db, prefix="nz_" + created.key.prefix)
    assert await snapshot(db) == before
    with pytest.raises(NotFoundError):
        await admin.revoke_key(db, prefix="ZZZZZZZZ" if created.key.prefix != "ZZZZZZZZ" else "YYYYYYYY")
    with pytest.raises(KeyFormatError):
        await admin.revoke_key(db, prefix="xyz")
    assert await snapshot(db) == before


async def test_authenticate_ok_then_expired(db: asyncpg.Connection) -> None:
    """A key created with an expiry authenticates until then and is "expired" from that instant on."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db, expires_in=dt.timedelta(hours=1), now=T0)
    assert created.key.expires_at == T0 + dt.timedelta(hours=1)
    just_before = T0 + dt.timedelta(minutes=59, seconds=59)
    ok = await authenticate(db, created.token, pepper=PEPPER, now=just_before)
    assert ok.reason == "ok"
    assert ok.context is not None
    assert ok.context.key_id == created.key.id
    for now in (T0 + dt.timedelta(hours=1), T0 + dt.timedelta(days=30)):
        assert await authenticate(db, created.token, pepper=PEPPER, now=now) == Verdict(None, "expired")


async def test_authenticate_suspended_tenant(db: asyncpg.Connection) -> None:
    """Suspending a tenant makes its keys "suspended"; resuming makes them work again."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    changed, notices = await admin.set_tenant_status(db, name="acme", status="suspended")
    assert changed.status == "suspended"
    assert notices == [Invalidation("tenant", tenant.id, reason="suspended")]
    assert await authenticate(db, created.token, pepper=PEPPER, now=T0) == Verdict(None, "suspended")
    await admin.set_tenant_status(db, name="acme", status="active")
    assert (await authenticate(db, created.token, pepper=PEPPER, now=T0)).reason == "ok"


async def test_authenticate_revoked(db: asyncpg.Connection) -> None:
    """A revoked key is "revoked" (even if it has also expired); its sibling still works."""
    await admin.create_tenant(db, name="acme")
    gone = await new_key(db, name="gone", expires_in=dt.timedelta(minutes=1), now=T0)
    kept = await new_key(db, name="kept")
    await admin.revoke_key(db, prefix=gone.key.prefix)
    later = T0 + dt.timedelta(days=1)
    assert await authenticate(db, gone.token, pepper=PEPPER, now=later) == Verdict(None, "revoked")
    assert (await authenticate(db, kept.token, pepper=PEPPER, now=later)).reason == "ok"


async def test_authenticate_mismatch_and_unknown(db: asyncpg.Connection) -> None:
    """A token with a known prefix and a valid checksum but another secret is "mismatch", also for a
    revoked key (no status is revealed without the secret); the right token with the wrong pepper is
    "mismatch"; a well-formed token with an unknown prefix is "unknown"; garbage is "malformed"."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    forged = with_other_secret(created.token)
    assert forged != created.token
    assert keys.parse_key(forged).prefix == created.key.prefix
    assert await authenticate(db, forged, pepper=PEPPER, now=T0) == Verdict(None, "mismatch")
    assert await authenticate(db, created.token, pepper="wrong", now=T0) == Verdict(None, "mismatch")
    stranger = keys.generate_key().token
    assert await authenticate(db, stranger, pepper=PEPPER, now=T0) == Verdict(None, "unknown")
    for garbage in ("", "nz_", created.token + "x", created.token.upper(), created.token[:-1] + "!"):
        assert await authenticate(db, garbage, pepper=PEPPER, now=T0) == Verdict(None, "malformed")
    await admin.revoke_key(db, prefix=created.key.prefix)
    assert await authenticate(db, forged, pepper=PEPPER, now=T0) == Verdict(None, "mismatch")


async def test_inheritance_in_the_verdict_context(db: asyncpg.Connection) -> None:
    """The context of an authenticated key carries its effective limits (own value, the tenant's
    where it inherits, none where it is unlimited), the tenant's own limits, the narrowed model
    allowlist and the inherited prompt-logging policy; changes show on the next authentication."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    change = admin.parse_limit
    await admin.set_limits(
        db,
        tenant="acme",
        limits={"rpm": change("rpm", "100"), "tpm": change("tpm", "1000"), "daily_tokens": change("d", "50")},
        models=admin.parse_models("llama3.2,qwen3:8b"),
    )
    await admin.set_limits(
        db,
        prefix=created.key.prefix,
        limits={"tpm": change("tpm", "unlimited"), "max_concurrent": change("c", "2")},
        models=admin.parse_models("qwen3:8b,gemma3:4b"),
    )
    await admin.set_prompt_logging(db, tenant="acme", on=True, ttl=admin.parse_duration("7d"))
    verdict = await authenticate(db, created.token, pepper=PEPPER, now=T0)
    assert verdict.reason == "ok"
    context = verdict.context
    assert context is not None
    assert (context.tenant_id, context.tenant_name, context.prefix) == (tenant.id, "acme", created.key.prefix)
    assert context.tenant_limits == Limits(rpm=100, tpm=1000, daily_tokens=50)
    assert context.key_limits == Limits(rpm=100, tpm=None, max_concurrent=2, daily_tokens=50)
    assert context.allowed_models == ("qwen3:8b",)
    assert (context.prompt_logging, context.prompt_log_ttl_seconds) == (True, 7 * 86400)

    await admin.set_limits(db, prefix=created.key.prefix, models="all", limits={"rpm": change("rpm", "5")})
    await admin.set_prompt_logging(db, prefix=created.key.prefix, on=False)
    context = (await authenticate(db, created.token, pepper=PEPPER, now=T0)).context
    assert context is not None
    assert context.allowed_models == ("llama3.2:latest", "qwen3:8b")
    assert context.key_limits.rpm == 5
    assert (context.prompt_logging, context.prompt_log_ttl_seconds) == (False, None)


async def test_set_limits_stores_unlimited_and_inherit(db: asyncpg.Connection) -> None:
    """On a key, 'unlimited' is stored as -1 and 'inherit' as NULL; on a tenant 'unlimited' is NULL;
    each call returns one invalidation for the changed scope."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    unlimited, inherit = admin.parse_limit("rpm", "unlimited"), admin.parse_limit("rpm", "inherit")
    key, notices = await admin.set_limits(db, prefix=created.key.prefix, limits={"rpm": unlimited})
    assert key.limits.rpm == UNLIMITED
    assert notices == [Invalidation("key", tenant.id, created.key.id, reason="limits")]
    key, _ = await admin.set_limits(db, prefix=created.key.prefix, limits={"rpm": inherit})
    assert key.limits.rpm is None
    await admin.set_limits(db, tenant="acme", limits={"rpm": admin.parse_limit("rpm", "7")})
    changed, notices = await admin.set_limits(db, tenant="acme", limits={"rpm": unlimited})
    assert changed.limits.rpm is None
    assert notices == [Invalidation("tenant", tenant.id, reason="limits")]


async def test_rejected_changes_touch_nothing(db: asyncpg.Connection) -> None:
    """Core-level validation (inherit on a tenant, unknown limit names, both or neither target,
    nothing to change, logging on without TTL or off with one, duplicates, unknown names) raises
    AdminError and leaves every row as it was."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    prefix = created.key.prefix
    before = await snapshot(db)
    inherit = admin.parse_limit("rpm", "inherit")
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: admin.set_limits(db, tenant="acme", limits={"rpm": inherit}),
        lambda: admin.set_limits(db, tenant="acme", models="inherit"),
        lambda: admin.set_limits(db, tenant="acme", limits={"bogus": admin.parse_limit("x", "1")}),
        lambda: admin.set_limits(
            db, tenant="acme", prefix=prefix, limits={"rpm": admin.parse_limit("r", "1")}
        ),
        lambda: admin.set_limits(db),
        lambda: admin.set_limits(db, prefix=prefix),
        lambda: admin.set_prompt_logging(db, tenant="acme", on=True),
        lambda: admin.set_prompt_logging(db, prefix=prefix, on=False, ttl=dt.timedelta(days=1)),
        lambda: admin.set_prompt_logging(db, on=False),
        lambda: admin.usage(db),
        lambda: admin.create_tenant(db, name="acme"),
        lambda: admin.create_tenant(db, name="-starts-with-dash"),
        lambda: new_key(db, name="k1"),
        lambda: new_key(db, name=""),
        lambda: new_key(db, name="x" * 101),
        lambda: new_key(db, tenant="nosuch"),
        lambda: admin.set_tenant_status(db, name="nosuch", status="suspended"),
        lambda: admin.list_keys(db, tenant="nosuch"),
    ]
    for attempt in attempts:
        with pytest.raises(AdminError):
            await attempt()
    assert await snapshot(db) == before


async def test_duplicates_are_conflicts_but_names_are_per_tenant(db: asyncpg.Connection) -> None:
    """Tenant names are unique; key names are unique per tenant only."""
    await admin.create_tenant(db, name="acme")
    await admin.create_tenant(db, name="other")
    await new_key(db, tenant="acme", name="ci")
    await new_key(db, tenant="other", name="ci")
    with pytest.raises(ConflictError):
        await new_key(db, tenant="acme", name="ci")
    with pytest.raises(ConflictError):
        await admin.create_tenant(db, name="other")
    listed = await admin.list_keys(db)
    assert sorted((tenant, key.name) for key, tenant in listed) == [("acme", "ci"), ("other", "ci")]


async def test_list_tenants_counts_active_keys_only(db: asyncpg.Connection) -> None:
    """list_tenants reports each tenant with its number of active (not revoked) keys, by name."""
    await admin.create_tenant(db, name="zeta")
    await admin.create_tenant(db, name="acme")
    await new_key(db, name="a")
    gone = await new_key(db, name="b")
    await admin.revoke_key(db, prefix=gone.key.prefix)
    rows = await admin.list_tenants(db)
    assert [(tenant.name, count) for tenant, count in rows] == [("acme", 1), ("zeta", 0)]


async def test_usage_period_boundaries(db: asyncpg.Connection) -> None:
    """usage counts a row finished exactly at UTC midnight as today and one a microsecond earlier as
    yesterday; months start on the 1st at 00:00 UTC."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    now = dt.datetime(2026, 11, 15, 9, 30, tzinfo=dt.UTC)
    midnight = dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
    month = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    tick = dt.timedelta(microseconds=1)
    for finished, tokens in ((midnight, 1), (midnight - tick, 10), (month, 100), (month - tick, 1000)):
        await db.execute(
            "INSERT INTO usage_ledger (request_id, tenant_id, key_id, endpoint, prompt_tokens, "
            "http_status, started_at, finished_at) VALUES ($1, $2, $3, '/api/generate', $4, 200, $5, $5)",
            uuid.uuid4().hex,
            tenant.id,
            created.key.id,
            tokens,
            finished,
        )
    expected = (1, 111, 1111, 4)
    by_tenant = await admin.usage(db, tenant="acme", now=now)
    by_key = await admin.usage(db, prefix=created.key.prefix, now=now)
    assert (by_tenant.day, by_tenant.month, by_tenant.total, by_tenant.requests) == expected
    assert (by_key.day, by_key.month, by_key.total, by_key.requests) == expected
    local = now.astimezone(dt.timezone(dt.timedelta(hours=-12)))  # 21:30 the day before, locally
    assert (await admin.usage(db, tenant="acme", now=local)).day == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), (" 1d ", 86400)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    """Durations are a positive number with one unit of s, m, h, d or w."""
    assert admin.parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "7", "d", "0d", "-1d", "1.5h", "7x", "1d2h", "7 d"])
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is an AdminError."""
    with pytest.raises(AdminError):
        admin.parse_duration(text)


def test_parse_limit_and_models() -> None:
    """Limits are non-negative integers, 'inherit' or 'unlimited'; model lists are normalised and
    de-duplicated, or 'all' / 'inherit'."""
    assert admin.parse_limit("rpm", " 60 ").value == 60
    assert admin.parse_limit("rpm", "Unlimited").value == "unlimited"
    assert admin.parse_limit("rpm", "INHERIT").value == "inherit"
    for bad in ("", "-1", "1.5", "abc", "1e3", str(2**62 + 1)):
        with pytest.raises(AdminError):
            admin.parse_limit("rpm", bad)
    assert admin.parse_models("Llama3.2, qwen3:8b,llama3.2:latest") == ("llama3.2:latest", "qwen3:8b")
    assert admin.parse_models("ALL") == "all"
    assert admin.parse_models("inherit") == "inherit"
    for bad in ("", " , ", "a/b/c/d"):
        with pytest.raises(AdminError):
            admin.parse_models(bad)
