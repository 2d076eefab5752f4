"""The admin core functions and key authentication, called directly on a real Postgres connection:
the edge cases the CLI tests do not reach."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from shared import admin, keys
from shared.db import asyncpg_dsn
from shared.exceptions import AdminError, ConflictError, KeyFormatError, NotFoundError
from shared.hashing import Argon2Params
from shared.invalidation import Invalidation
from shared.keystore import Verdict, authenticate
from shared.model_limits import MAX_RULES_PER_SCOPE
from shared.models import UNLIMITED, ApiKey, Limits, ModelLimit, ModelRule, Tenant

pytestmark = pytest.mark.integration

PEPPER = "core-test-pepper-0123456789abcdef0123456789"
CHEAP = Argon2Params(memory_kib=64, time_cost=1)
T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
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


def lim(**values: str) -> dict[str, admin.LimitChange]:
    """Limit changes as the CLI parses them: lim(rpm="5", tpm="unlimited")."""
    return {name: admin.parse_limit(name, text) for name, text in values.items()}


async def rule_rows(db: asyncpg.Connection) -> list[tuple[object, ...]]:
    """Every model_limits row as (key_id, pattern, six limits), ordered."""
    rows = await db.fetch(
        "SELECT key_id, pattern, rpm, tpm, max_concurrent, daily_tokens, monthly_tokens, total_tokens "
        "FROM model_limits ORDER BY key_id NULLS FIRST, pattern"
    )
    return [tuple(r.values()) for r in rows]


async def updated_at(db: asyncpg.Connection, table: str, ident: int) -> dt.datetime:
    """The updated_at of a tenant or key row."""
    value = await db.fetchval(f"SELECT updated_at FROM {table} WHERE id = $1", ident)  # noqa: S608 - fixed names
    assert isinstance(value, dt.datetime)
    return value


async def test_model_rules_on_a_tenant_and_a_key(db: asyncpg.Connection) -> None:
    """set_limits with `model` stores a rule for the canonical pattern on the tenant (key_id NULL) or
    on the key, bumps that row's updated_at, returns the same invalidation as an unscoped change and
    the changed tenant or key with its rules; list_tenants, list_keys and show_key carry them, and the
    key's unset values inherit the tenant's on the same pattern."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    prefix = created.key.prefix
    tenant_before = await updated_at(db, "tenants", tenant.id)
    changed, notices = await admin.set_limits(
        db, tenant="acme", model="Big:*", limits=lim(rpm="5", tpm="9000")
    )
    assert isinstance(changed, Tenant)
    assert changed.model_limits == (ModelLimit("big:*", Limits(rpm=5, tpm=9000)),)
    assert notices == [Invalidation("tenant", tenant.id, reason="limits")]
    assert await updated_at(db, "tenants", tenant.id) > tenant_before

    key_before = await updated_at(db, "api_keys", created.key.id)
    changed, notices = await admin.set_limits(
        db, prefix=prefix, model="big:*", limits=lim(rpm="unlimited", max_concurrent="2")
    )
    assert isinstance(changed, ApiKey)
    assert changed.model_limits == (ModelLimit("big:*", Limits(rpm=UNLIMITED, max_concurrent=2)),)
    assert notices == [Invalidation("key", tenant.id, created.key.id, reason="limits")]
    assert await updated_at(db, "api_keys", created.key.id) > key_before
    await admin.set_limits(db, prefix=prefix, model="small", limits=lim(daily_tokens="100"))
    assert await rule_rows(db) == [
        (None, "big:*", 5, 9000, None, None, None, None),
        (created.key.id, "big:*", -1, None, 2, None, None, None),
        (created.key.id, "small:latest", None, None, None, 100, None, None),
    ]

    [(listed_tenant, _)] = await admin.list_tenants(db)
    assert listed_tenant.model_limits == (ModelLimit("big:*", Limits(rpm=5, tpm=9000)),)
    [(listed_key, _)] = await admin.list_keys(db)
    assert [m.pattern for m in listed_key.model_limits] == ["big:*", "small:latest"]

    view = await admin.show_key(db, prefix=prefix)
    assert (view.key.id, view.tenant_name) == (created.key.id, "acme")
    assert view.model_rules == (
        ModelRule("big:*", Limits(tpm=9000, max_concurrent=2), Limits(rpm=5, tpm=9000)),
        ModelRule("small:latest", Limits(daily_tokens=100), Limits()),
    )
    await admin.set_limits(db, prefix=prefix, model="big:*", limits=lim(rpm="inherit"))
    view = await admin.show_key(db, prefix="nz_" + prefix)
    assert view.model_rules[0] == ModelRule(
        "big:*", Limits(rpm=5, tpm=9000, max_concurrent=2), Limits(rpm=5, tpm=9000)
    )
    verdict = await authenticate(db, created.token, pepper=PEPPER, now=T0)
    assert verdict.context is not None
    assert verdict.context.model_rules == view.model_rules


async def test_show_key_reports_effective_unscoped_limits(db: asyncpg.Connection) -> None:
    """show_key's limits are the key's own value, else the tenant's, none where the key says unlimited;
    its models are the narrowed allowlist."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    await admin.set_limits(
        db, tenant="acme", limits=lim(rpm="100", tpm="1000"), models=admin.parse_models("a,b")
    )
    await admin.set_limits(
        db,
        prefix=created.key.prefix,
        limits=lim(tpm="unlimited", max_concurrent="3"),
        models=admin.parse_models("b,c"),
    )
    view = await admin.show_key(db, prefix=created.key.prefix)
    assert view.limits == Limits(rpm=100, max_concurrent=3)
    assert view.tenant.limits == Limits(rpm=100, tpm=1000)
    assert view.allowed_models == ("b:latest",)
    assert view.model_rules == ()
    with pytest.raises(NotFoundError):
        await admin.show_key(db, prefix="ZZZZZZZZ" if created.key.prefix != "ZZZZZZZZ" else "YYYYYYYY")


async def test_model_rule_that_limits_nothing_is_deleted(db: asyncpg.Connection) -> None:
    """A change leaving every value of a rule NULL deletes its row (a tenant's 'unlimited', a key's
    'inherit'); a key's 'unlimited' is -1 and keeps the row; 'unlimited' on a pattern with no tenant
    rule creates none; each change still returns its invalidation."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    prefix = created.key.prefix
    await admin.set_limits(db, tenant="acme", model="big:*", limits=lim(rpm="5", tpm="10"))
    await admin.set_limits(db, tenant="acme", model="big:*", limits=lim(rpm="unlimited"))
    assert await rule_rows(db) == [(None, "big:*", None, 10, None, None, None, None)]
    changed, notices = await admin.set_limits(db, tenant="acme", model="big:*", limits=lim(tpm="unlimited"))
    assert await rule_rows(db) == []
    assert changed.model_limits == ()
    assert notices == [Invalidation("tenant", tenant.id, reason="limits")]
    await admin.set_limits(db, tenant="acme", model="never:*", limits=lim(rpm="unlimited"))
    assert await rule_rows(db) == []

    await admin.set_limits(db, prefix=prefix, model="big:*", limits=lim(rpm="unlimited", tpm="7"))
    await admin.set_limits(db, prefix=prefix, model="big:*", limits=lim(tpm="inherit"))
    assert await rule_rows(db) == [(created.key.id, "big:*", -1, None, None, None, None, None)]
    changed, notices = await admin.set_limits(db, prefix=prefix, model="big:*", limits=lim(rpm="inherit"))
    assert await rule_rows(db) == []
    assert changed.model_limits == ()
    assert notices == [Invalidation("key", tenant.id, created.key.id, reason="limits")]


async def test_removing_a_model_rule(db: asyncpg.Connection) -> None:
    """remove=True deletes the tenant's or the key's rule on the pattern only (the other scope's rule
    on the same pattern stays) and bumps updated_at; removing a rule that does not exist is an
    AdminError that changes nothing."""
    tenant = await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    prefix = created.key.prefix
    await admin.set_limits(db, tenant="acme", model="big:*", limits=lim(rpm="5"))
    await admin.set_limits(db, prefix=prefix, model="big:*", limits=lim(rpm="2"))
    key_before = await updated_at(db, "api_keys", created.key.id)
    changed, notices = await admin.set_limits(db, prefix=prefix, model="BIG:*", remove=True)
    assert changed.model_limits == ()
    assert notices == [Invalidation("key", tenant.id, created.key.id, reason="limits")]
    assert await updated_at(db, "api_keys", created.key.id) > key_before
    assert await rule_rows(db) == [(None, "big:*", 5, None, None, None, None, None)]
    before = await snapshot(db)
    with pytest.raises(NotFoundError, match="no model rule for 'big:\\*'"):
        await admin.set_limits(db, prefix=prefix, model="big:*", remove=True)
    assert await snapshot(db) == before
    changed, notices = await admin.set_limits(db, tenant="acme", model="big:*", remove=True)
    assert (changed.model_limits, notices) == ((), [Invalidation("tenant", tenant.id, reason="limits")])
    assert await rule_rows(db) == []


async def test_model_rules_are_capped_per_scope(db: asyncpg.Connection) -> None:
    """A tenant and a key each hold at most MAX_RULES_PER_SCOPE rules: the 33rd is refused and changes
    nothing, while changing or removing an existing rule at the cap works, and the key's rules count
    apart from the tenant's."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    assert MAX_RULES_PER_SCOPE == 32
    for i in range(MAX_RULES_PER_SCOPE):
        await admin.set_limits(db, tenant="acme", model=f"m{i}:*", limits=lim(rpm="1"))
    before = await snapshot(db)
    with pytest.raises(AdminError, match="already has 32 model rules"):
        await admin.set_limits(db, tenant="acme", model="one-more:*", limits=lim(rpm="1"))
    assert await snapshot(db) == before
    await admin.set_limits(db, tenant="acme", model="m0:*", limits=lim(rpm="2"))
    await admin.set_limits(db, prefix=created.key.prefix, model="one-more:*", limits=lim(rpm="1"))
    await admin.set_limits(db, tenant="acme", model="m1:*", remove=True)
    await admin.set_limits(db, tenant="acme", model="one-more:*", limits=lim(rpm="1"))
    assert await db.fetchval("SELECT count(*) FROM model_limits WHERE key_id IS NULL") == 32


async def test_concurrent_admins_cannot_pass_the_rule_cap(db: asyncpg.Connection, database_url: str) -> None:
    """With 31 rules, two admins adding a rule at once on two connections: the tenant row's lock
    queues them, so exactly one gets the 32nd rule and the other is refused."""
    await admin.create_tenant(db, name="acme")
    for i in range(MAX_RULES_PER_SCOPE - 1):
        await admin.set_limits(db, tenant="acme", model=f"m{i}:*", limits=lim(rpm="1"))
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        results = await asyncio.gather(
            admin.set_limits(db, tenant="acme", model="first:*", limits=lim(rpm="1")),
            admin.set_limits(other, tenant="acme", model="second:*", limits=lim(rpm="1")),
            return_exceptions=True,
        )
    finally:
        await other.close()
    refused = [r for r in results if isinstance(r, AdminError)]
    assert len(refused) == 1, results
    assert await db.fetchval("SELECT count(*) FROM model_limits") == MAX_RULES_PER_SCOPE


async def test_rejected_model_rule_changes_touch_nothing(db: asyncpg.Connection) -> None:
    """A bad pattern (named in the message), --models or a cap with a pattern, --remove without a
    pattern or with limits, a pattern with nothing to change, 'inherit' on a tenant's rule and an
    unknown key are AdminErrors; no row changes."""
    await admin.create_tenant(db, name="acme")
    created = await new_key(db)
    prefix = created.key.prefix
    stranger = "ZZZZZZZZ" if prefix != "ZZZZZZZZ" else "YYYYYYYY"
    await admin.set_limits(db, tenant="acme", model="big:*", limits=lim(rpm="5"))
    before = await snapshot(db)
    attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("bad model pattern 'no such/model'", lambda: admin.set_limits(
            db, tenant="acme", model="no such/model", limits=lim(rpm="1"))),
        ("bad model pattern 'a/b/c/d'", lambda: admin.set_limits(
            db, prefix=prefix, model="a/b/c/d", limits=lim(rpm="1"))),
        ("--models does not combine with --model", lambda: admin.set_limits(
            db, tenant="acme", model="big:*", models="all")),
        ("--max-num-ctx does not combine with --model", lambda: admin.set_limits(
            db, tenant="acme", model="big:*", limits={"max_num_ctx": admin.parse_limit("max_num_ctx", "8")})),
        ("--max-keep-alive does not combine", lambda: admin.set_limits(
            db, prefix=prefix, model="big:*",
            limits={"max_keep_alive_seconds": admin.parse_limit("max_keep_alive_seconds", "60")})),
        ("--remove needs --model", lambda: admin.set_limits(db, tenant="acme", remove=True)),
        ("--remove takes no limits", lambda: admin.set_limits(
            db, tenant="acme", model="big:*", remove=True, limits=lim(rpm="1"))),
        ("nothing to change", lambda: admin.set_limits(db, tenant="acme", model="big:*")),
        ("inherit only applies to a key", lambda: admin.set_limits(
            db, tenant="acme", model="big:*", limits=lim(rpm="inherit"))),
        ("no key with prefix", lambda: admin.set_limits(
            db, prefix=stranger, model="big:*", limits=lim(rpm="1"))),
        ("no tenant named", lambda: admin.set_limits(
            db, tenant="nosuch", model="big:*", limits=lim(rpm="1"))),
    ]  # fmt: skip
    for message, attempt in attempts:
        with pytest.raises(AdminError) as refused:
            await attempt()
        assert message in str(refused.value)
    assert await snapshot(db) == before


ModelUsageRow = tuple[str, int, str, str, dt.date, int]  # scope, scope_id, model, period, start, tokens


async def _model_usage(db: asyncpg.Connection, row: ModelUsageRow) -> None:
    """One model_budget_periods row, with a tenth of its tokens as requests."""
    scope, scope_id, model, period, start, tokens = row
    await db.execute(
        "INSERT INTO model_budget_periods (scope, scope_id, model, period, period_start, tokens, requests) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        scope,
        scope_id,
        model,
        period,
        start,
        tokens,
        tokens // 10,
    )


async def test_usage_by_model(db: asyncpg.Connection) -> None:
    """usage(by_model=True) gives, per canonical model sorted by name, the tokens of the current day
    and month period and of the total, and the total's requests, from model_budget_periods of that
    scope only: yesterday's day row, last month's row, another tenant's and a key's rows do not count;
    the current periods follow the budget time zone."""
    acme = await admin.create_tenant(db, name="acme")
    other = await admin.create_tenant(db, name="other")
    await new_key(db, name="k0")  # the created key is then not the one whose id is acme's
    created = await new_key(db)
    assert created.key.id != acme.id  # so a key row with the tenant's id is another scope's
    now = dt.datetime(2026, 11, 15, 9, 30, tzinfo=dt.UTC)
    today, yesterday = dt.date(2026, 11, 15), dt.date(2026, 11, 14)
    month, last_month, total = dt.date(2026, 11, 1), dt.date(2026, 10, 1), dt.date(1970, 1, 1)
    rows: list[ModelUsageRow] = [
        ("tenant", acme.id, "big:latest", "day", today, 10),
        ("tenant", acme.id, "big:latest", "day", yesterday, 1000),
        ("tenant", acme.id, "big:latest", "month", month, 1010),
        ("tenant", acme.id, "big:latest", "month", last_month, 50000),
        ("tenant", acme.id, "big:latest", "total", total, 51010),
        ("tenant", acme.id, "alpha:1b", "total", total, 30),
        ("tenant", other.id, "big:latest", "day", today, 7000),
        ("tenant", other.id, "other:latest", "total", total, 7000),
        ("key", acme.id, "keyonly:latest", "total", total, 90),  # a key scope with the tenant's id
        ("key", created.key.id, "big:latest", "day", today, 4),
        ("key", created.key.id, "big:latest", "total", total, 40),
    ]
    for row in rows:
        await _model_usage(db, row)
    result = await admin.usage(db, tenant="acme", now=now, by_model=True)
    assert result.models == (
        admin.ModelUsage("alpha:1b", day=0, month=0, total=30, requests=3),
        admin.ModelUsage("big:latest", day=10, month=1010, total=51010, requests=5101),
    )
    assert (await admin.usage(db, tenant="acme", now=now)).models is None
    by_key = await admin.usage(db, prefix=created.key.prefix, now=now, by_model=True)
    assert by_key.models == (admin.ModelUsage("big:latest", day=4, month=0, total=40, requests=4),)
    honolulu = await admin.usage(db, tenant="acme", now=now, zone=ZoneInfo("Pacific/Honolulu"), by_model=True)
    assert honolulu.models is not None
    assert honolulu.models[1].day == 1000  # 23:30 on the 14th there
