"""Policy resolution of a key under its tenant: limit inheritance, model allowlists, prompt logging."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from shared.models import (
    ALL_MODELS,
    LIMIT_NAMES,
    UNLIMITED,
    ApiKey,
    Limits,
    Tenant,
    UsageEvent,
    effective_models,
    resolve_context,
)

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)

amounts = st.integers(min_value=0, max_value=2**62)
tenant_values = st.one_of(st.none(), amounts)
key_values = st.one_of(st.none(), st.just(UNLIMITED), amounts)
tenant_limits = st.builds(Limits, **dict.fromkeys(LIMIT_NAMES, tenant_values))
key_limits = st.builds(Limits, **dict.fromkeys(LIMIT_NAMES, key_values))
model_names = st.sampled_from(["llama3.2:latest", "qwen3:8b", "gemma3:4b", "mistral:latest", "ns/x:1"])
model_lists = st.one_of(st.none(), st.lists(model_names, unique=True).map(tuple))


def make_tenant(**changes: Any) -> Tenant:
    """A tenant with no limits and prompt logging off, changed as asked."""
    tenant = Tenant(
        id=7,
        name="acme",
        status="active",
        limits=Limits(),
        allowed_models=None,
        max_body_bytes=1000,
        max_num_ctx=4096,
        max_keep_alive_seconds=300,
        prompt_logging=False,
        prompt_log_ttl_seconds=None,
        created_at=NOW,
    )
    return attrs.evolve(tenant, **changes)


def make_key(**changes: Any) -> ApiKey:
    """An active key that inherits everything, changed as asked."""
    key = ApiKey(
        id=42,
        tenant_id=7,
        name="ci",
        prefix="AbCd1234",
        status="active",
        created_at=NOW,
        expires_at=None,
        revoked_at=None,
        last_used_at=None,
        limits=Limits(),
        allowed_models=None,
        prompt_logging=None,
        prompt_log_ttl_seconds=None,
    )
    return attrs.evolve(key, **changes)


@given(key_limits, tenant_limits)
def test_inherit_from_rules(key: Limits, tenant: Limits) -> None:
    """Per limit: a key's None takes the tenant's value, -1 means no key-level limit (None), and any
    number is the key's own limit."""
    effective = key.inherit_from(tenant)
    for name in LIMIT_NAMES:
        own, inherited, got = getattr(key, name), getattr(tenant, name), getattr(effective, name)
        if own is None:
            assert got == inherited
        elif own == UNLIMITED:
            assert got is None
        else:
            assert got == own
        assert got is None or got >= 0


@given(tenant_limits)
def test_key_without_own_limits_gets_exactly_the_tenants(tenant: Limits) -> None:
    """A key that sets nothing has the tenant's limits."""
    assert Limits().inherit_from(tenant) == tenant


@given(key_limits, tenant_limits, tenant_limits)
def test_own_key_limits_do_not_depend_on_the_tenant(key: Limits, one: Limits, other: Limits) -> None:
    """Where the key sets a value (a number or unlimited), the tenant's value is irrelevant."""
    first, second = key.inherit_from(one), key.inherit_from(other)
    for name in LIMIT_NAMES:
        if getattr(key, name) is not None:
            assert getattr(first, name) == getattr(second, name)


def test_inherit_from_example() -> None:
    """A worked example of all three cases side by side."""
    tenant = Limits(rpm=60, tpm=1000, max_concurrent=4, daily_tokens=None, monthly_tokens=5, total_tokens=9)
    key = Limits(rpm=None, tpm=UNLIMITED, max_concurrent=1, daily_tokens=50, monthly_tokens=0)
    assert key.inherit_from(tenant) == Limits(
        rpm=60, tpm=None, max_concurrent=1, daily_tokens=50, monthly_tokens=0, total_tokens=9
    )


@given(model_lists, model_lists)
def test_effective_models_never_widen_the_tenant(
    tenant: tuple[str, ...] | None, key: tuple[str, ...] | None
) -> None:
    """The key narrows the tenant's allowlist and never widens it; None is "every model"."""
    result = effective_models(tenant, key)
    if key is None:
        assert result == tenant
    elif tenant is None:
        assert result == key
    else:
        assert result is not None
        assert set(result) == set(tenant) & set(key)
        assert list(result) == [m for m in key if m in tenant]  # the key's order


@given(model_lists, st.lists(model_names, unique=True).map(tuple))
def test_all_models_on_a_key_means_the_tenants_list(
    tenant: tuple[str, ...] | None, extra: tuple[str, ...]
) -> None:
    """A key allowlist containing "*" allows exactly what the tenant allows."""
    assert effective_models(tenant, (ALL_MODELS,)) == tenant
    assert effective_models(tenant, (*extra, ALL_MODELS)) == tenant


def test_disjoint_allowlists_allow_nothing() -> None:
    """A key listing only models its tenant does not allow gets an empty allowlist, not "every model"."""
    assert effective_models(("qwen3:8b",), ("llama3.2:latest",)) == ()


@given(key_limits, tenant_limits, model_lists, model_lists)
def test_resolve_context_combines_key_and_tenant(
    own: Limits, shared: Limits, tenant_models: tuple[str, ...] | None, key_models: tuple[str, ...] | None
) -> None:
    """The context carries the key's identity, inherited key limits, the tenant's limits and
    caps, and the effective allowlist."""
    tenant = make_tenant(limits=shared, allowed_models=tenant_models)
    key = make_key(limits=own, allowed_models=key_models)
    context = resolve_context(tenant, key)
    assert (context.key_id, context.prefix) == (42, "AbCd1234")
    assert (context.tenant_id, context.tenant_name) == (7, "acme")
    assert context.key_limits == own.inherit_from(shared)
    assert context.tenant_limits == shared
    assert context.allowed_models == effective_models(tenant_models, key_models)
    assert (context.max_body_bytes, context.max_num_ctx, context.max_keep_alive_seconds) == (1000, 4096, 300)


def test_prompt_logging_inherits_from_the_tenant() -> None:
    """A key with no logging setting follows its tenant, with the tenant's TTL."""
    tenant = make_tenant(prompt_logging=True, prompt_log_ttl_seconds=3600)
    context = resolve_context(tenant, make_key())
    assert (context.prompt_logging, context.prompt_log_ttl_seconds) == (True, 3600)
    context = resolve_context(make_tenant(), make_key())
    assert (context.prompt_logging, context.prompt_log_ttl_seconds) == (False, None)


def test_prompt_logging_key_overrides() -> None:
    """A key can opt out of its tenant's logging, or opt in with its own TTL (which wins)."""
    logging_tenant = make_tenant(prompt_logging=True, prompt_log_ttl_seconds=3600)
    off = resolve_context(logging_tenant, make_key(prompt_logging=False))
    assert (off.prompt_logging, off.prompt_log_ttl_seconds) == (False, None)
    own_ttl = resolve_context(make_tenant(), make_key(prompt_logging=True, prompt_log_ttl_seconds=60))
    assert (own_ttl.prompt_logging, own_ttl.prompt_log_ttl_seconds) == (True, 60)
    shorter = resolve_context(logging_tenant, make_key(prompt_logging=True, prompt_log_ttl_seconds=60))
    assert (shorter.prompt_logging, shorter.prompt_log_ttl_seconds) == (True, 60)


def test_prompt_logging_never_on_without_a_ttl() -> None:
    """Logging switched on with no TTL anywhere stays off: nothing is kept without an expiry."""
    context = resolve_context(make_tenant(), make_key(prompt_logging=True))
    assert context.prompt_logging is False


def test_key_usable_until_it_expires() -> None:
    """An active key is usable strictly before expires_at; a revoked key never."""
    expiring = make_key(expires_at=NOW)
    assert expiring.is_usable(NOW - dt.timedelta(microseconds=1))
    assert not expiring.is_usable(NOW)
    assert make_key().is_usable(NOW)
    assert not make_key(status="revoked", revoked_at=NOW).is_usable(NOW - dt.timedelta(days=1))


@given(st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=2**40))
def test_usage_event_total_is_prompt_plus_completion(prompt: int, completion: int) -> None:
    """The Tokens contract: total = prompt tokens + completion tokens."""
    event = UsageEvent(
        request_id="r1",
        tenant_id=7,
        key_id=42,
        key_prefix="AbCd1234",
        endpoint="/api/chat",
        model="qwen3:8b",
        prompt_tokens=prompt,
        completion_tokens=completion,
        reserved_tokens=0,
        estimated=False,
        estimate_reason=None,
        http_status=200,
        upstream_status=200,
        started_at=0.0,
        first_byte_at=None,
        finished_at=1.0,
        bytes_relayed=0,
        client_disconnected=False,
    )
    assert event.total_tokens == prompt + completion
