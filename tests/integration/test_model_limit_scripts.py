"""Model rules in the limit scripts, on a real Valkey with the scripts' clock pinned: the reservation
decides every rule whose pattern covers the request's model (requests, streams, tokens per minute,
budgets) in its one call, all or nothing, and a refusal gives back what the admission counted; settle,
lease renewal and release touch the model counters the reservation names; the admission asks for
missing model budget counters; and the pattern match Lua runs agrees with Python's."""

from __future__ import annotations

import attrs
import pytest

from shared.limits import Admitted, NeedsHydration, Refused, Reserved, Scope
from shared.model_limits import lua_pattern, matches
from shared.model_names import normalise, normalise_pattern, qualified
from shared.models import Limits, ModelRule
from tests.integration.test_limit_scripts import KEY_ID, LEASE_MS, SECOND, T0, TENANT_ID, Lab, lab_on, scope

pytestmark = pytest.mark.integration


@pytest.fixture
def lab_args(redis_url: str, redis_prefix: str) -> tuple[str, str]:
    """The session's Valkey and this test's own key prefix."""
    return redis_url, redis_prefix


def ruled(
    *rules: ModelRule, model: str | None, key: Limits | None = None, tenant: Limits | None = None
) -> Scope:
    """A scope with model rules, for a request naming `model` (canonicalised here)."""
    return attrs.evolve(scope(key, tenant), rules=rules, model=None if model is None else normalise(model))


def rule(pattern: str, key: Limits | None = None, tenant: Limits | None = None) -> ModelRule:
    """A rule as resolve_context makes it (key limits already the effective ones)."""
    return ModelRule(normalise_pattern(pattern), key or Limits(), tenant or Limits())


async def reserve(
    lab: Lab,
    who: Scope,
    rid: str,
    now: int = T0,
    *,
    prompt: int = 10,
    completion: int | None = 10,
    admitted: int | None = None,
) -> Reserved | Refused | NeedsHydration:
    outcome = await lab.scripts.reserve(
        who,
        rid,
        metered=True,
        prompt_bound=prompt,
        requested_completion=completion,
        default_completion=None,
        lease_ttl_ms=LEASE_MS,
        admitted_second=admitted,
        now_ms=now,
    )
    assert not isinstance(outcome, NeedsHydration) or outcome.missing, outcome
    return outcome  # type: ignore[return-value]


async def test_a_model_rpm_limits_the_models_its_pattern_covers_and_nothing_else(
    lab_args: tuple[str, str],
) -> None:
    """5 requests per minute on big:* for the tenant: exactly 5 of 8 big:70b reservations pass, every
    small:1b one passes, and the refusal names the pattern, the scope and the limit."""
    big = rule("big:*", tenant=Limits(rpm=5))
    async with lab_on(*lab_args) as lab:
        outcomes = [await reserve(lab, ruled(big, model="big:70b"), f"b{i}") for i in range(8)]
        assert [isinstance(o, Reserved) for o in outcomes] == [True] * 5 + [False] * 3
        refused = outcomes[5]
        assert refused == Refused("rpm", 60 * SECOND + 750, "tenant", model="big:*", limit=5, used=5)
        smalls = [await reserve(lab, ruled(big, model="small:1b"), f"s{i}") for i in range(8)]
        assert all(isinstance(o, Reserved) for o in smalls)
        # Another tag of the same model falls under the pattern and shares its window.
        assert isinstance(await reserve(lab, ruled(big, model="BIG:8B"), "other-tag"), Refused)
        # The window frees one second after the bucket leaves it.
        assert isinstance(
            await reserve(lab, ruled(big, model="big:70b"), "later", T0 + 61 * SECOND), Reserved
        )


async def test_a_key_and_its_tenant_each_hold_a_model_rule_and_both_apply(lab_args: tuple[str, str]) -> None:
    """Key limit 2 and tenant limit 3 on big:*: the key's third request is refused at the key scope;
    another key of the tenant gets one more before the tenant's is full."""
    shared = rule("big:*", key=Limits(rpm=2), tenant=Limits(rpm=3))
    async with lab_on(*lab_args) as lab:
        first = ruled(shared, model="big:70b")
        other = attrs.evolve(first, key_id=KEY_ID + 1)
        assert isinstance(await reserve(lab, first, "a1"), Reserved)
        assert isinstance(await reserve(lab, first, "a2"), Reserved)
        refused = await reserve(lab, first, "a3")
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.scope, refused.limit) == ("rpm", "key", 2)
        assert isinstance(await reserve(lab, other, "b1"), Reserved)
        refused = await reserve(lab, other, "b2")
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.scope, refused.limit) == ("rpm", "tenant", 3)


async def test_one_stream_per_model_refuses_the_second_on_that_model_only_until_the_first_ends(
    lab_args: tuple[str, str],
) -> None:
    """Concurrency 1 on every model (`*` in the name and the tag): a second stream on big:70b is
    refused, one on small:1b is not; settling the first frees its slot, and so does a release."""
    each = rule("big:*", key=Limits(max_concurrent=1))
    tiny = rule("small:*", key=Limits(max_concurrent=1))
    async with lab_on(*lab_args) as lab:
        big, small = ruled(each, tiny, model="big:70b"), ruled(each, tiny, model="small:1b")
        assert isinstance(await reserve(lab, big, "one"), Reserved)
        refused = await reserve(lab, big, "two")
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.model, refused.limit, refused.used) == ("concurrency", "big:*", 1, 1)
        assert refused.retry_after_ms == LEASE_MS
        assert isinstance(await reserve(lab, small, "three"), Reserved)
        assert await lab.scripts.settle(big, "one", 15) is True
        assert isinstance(await reserve(lab, big, "four"), Reserved)
        # A release (the usage event written without a settle) frees it too.
        released = await lab.scripts.lease(big, "four", action="release", ttl_ms=LEASE_MS, now_ms=T0)
        assert released == 1  # no admission took an unscoped lease here; the model set had one
        assert isinstance(await reserve(lab, big, "five"), Reserved)


async def test_a_renewed_model_lease_outlives_its_first_ttl(lab_args: tuple[str, str]) -> None:
    each = rule("big:*", key=Limits(max_concurrent=1))
    async with lab_on(*lab_args) as lab:
        big = ruled(each, model="big:70b")
        assert isinstance(await reserve(lab, big, "one"), Reserved)
        await lab.scripts.lease(big, "one", action="renew", ttl_ms=LEASE_MS, now_ms=T0 + LEASE_MS - 1)
        assert isinstance(await reserve(lab, big, "two", T0 + LEASE_MS + 1), Refused)
        assert isinstance(
            await reserve(lab, big, "three", T0 + 2 * LEASE_MS), Reserved
        )  # renewed lease expired


async def test_model_tokens_per_minute_clamp_the_completion_and_refuse_what_does_not_fit(
    lab_args: tuple[str, str],
) -> None:
    """TPM 100 on big:*: a request asking 60 + 80 is forwarded with 40; the next, 20 + 1 against no
    room, is refused with the window's wait; settling the first at 30 gives back 70."""
    tpm = rule("big:*", key=Limits(tpm=100))
    async with lab_on(*lab_args) as lab:
        big = ruled(tpm, model="big:70b")
        assert await reserve(lab, big, "one", prompt=60, completion=80) == Reserved(40, 100)
        refused = await reserve(lab, big, "two", prompt=20, completion=None)
        assert refused == Refused("tpm", 60 * SECOND + 750, "key", model="big:*", limit=100, used=100)
        assert isinstance(await reserve(lab, ruled(tpm, model="small:1b"), "small", prompt=500), Reserved)
        assert await lab.scripts.settle(big, "one", 30) is True
        assert await reserve(lab, big, "three", prompt=20, completion=None) == Reserved(50, 70)


async def test_a_model_budget_is_hydrated_first_then_never_overshot_and_settled_exactly(
    lab_args: tuple[str, str],
) -> None:
    day = rule("big:*", tenant=Limits(daily_tokens=300))
    async with lab_on(*lab_args) as lab:
        big = ruled(day, model="big:70b")
        need = await reserve(lab, big, "one")
        assert need == NeedsHydration((("tenant", "day", "big:*"),))
        # The admission asks for it too, whatever the model (it does not know it).
        assert await lab.admit(attrs.evolve(big, model=None), "adm", T0) == need
        await lab.hydrate(big, {("tenant", "day", "big:*"): 250})
        assert await reserve(lab, big, "one", prompt=20, completion=100) == Reserved(30, 50)
        refused = await reserve(lab, big, "two", prompt=1, completion=None)
        assert refused == Refused("budget_day", -1, "tenant", model="big:*", limit=300, used=300)
        counter = lab.scripts.model_budget_key(big, "big:*", "tenant", "day")
        assert await lab.counter(counter) == 300
        assert await lab.scripts.settle(big, "one", 35) is True
        assert await lab.counter(counter) == 285
        assert await lab.scripts.settle(big, "one", 35) is False  # once per request id
        assert await lab.counter(counter) == 285
        # Settling without a count charges the reservation as it stands.
        assert await reserve(lab, big, "three", prompt=5, completion=5) == Reserved(5, 10)
        assert await lab.scripts.settle(big, "three", None) is True
        assert await lab.counter(counter) == 295


async def test_a_refused_reservation_gives_back_the_request_the_admission_counted(
    lab_args: tuple[str, str],
) -> None:
    """All or nothing across the two calls: the unscoped RPM bucket the admission counted the
    request in is decremented when a model rule refuses it, and not when it is reserved."""
    big = rule("big:*", tenant=Limits(rpm=1))
    async with lab_on(*lab_args) as lab:
        who = ruled(big, model="big:70b", key=Limits(rpm=10), tenant=Limits(rpm=10))
        rpm_key = lab.keys.rpm(TENANT_ID, f"k{KEY_ID}")
        rpm_tenant = lab.keys.rpm(TENANT_ID, "t")
        first = await lab.admit(who, "one", T0, metered=False)
        assert isinstance(first, Admitted)
        assert first.second == T0 // SECOND
        assert isinstance(await reserve(lab, who, "one", admitted=first.second), Reserved)
        second = await lab.admit(who, "two", T0, metered=False)
        assert isinstance(second, Admitted)
        assert await lab.window(rpm_key) == await lab.window(rpm_tenant) == {T0 // SECOND: 2}
        assert isinstance(await reserve(lab, who, "two", admitted=second.second), Refused)
        assert await lab.window(rpm_key) == await lab.window(rpm_tenant) == {T0 // SECOND: 1}


async def test_what_a_refusal_leaves_behind_is_nothing_but_the_spent_grant(lab_args: tuple[str, str]) -> None:
    """A model rule refusing after the unscoped ones would have passed: no unscoped TPM or budget
    charge, no model window or lease, no reservation record."""
    strict = rule("big:*", key=Limits(tpm=5))
    async with lab_on(*lab_args) as lab:
        who = ruled(strict, model="big:70b", key=Limits(tpm=1000, total_tokens=1000))
        await lab.hydrate(who, {("key", "total"): 0})
        assert isinstance(await reserve(lab, who, "r", prompt=10), Refused)
        assert await lab.window(lab.keys.tpm(TENANT_ID, f"k{KEY_ID}")) == {}
        assert await lab.budget(who, "key", "total") == 0
        assert await lab.window(lab.scripts.model_key(who, "big:*", "key", "tpm")) == {}
        assert not await lab.exists(lab.scripts.model_key(who, "big:*", "key", "leases"))
        assert not await lab.exists(lab.keys.reservation(TENANT_ID, "r"))
        assert await lab.exists(lab.keys.grant_spent(TENANT_ID, "r"))


PATTERNS = [
    "big:*",
    "big",
    "*:*",
    "*",
    "llama3.3:*",
    "ns/*:*",
    "*/*:*",
    "b*g:7*b",
    "host.io/ns/m:*",
    "LLAMA3.3:70B",
    "my-model.v2:q4_K_M",
    "*/big:*",
]
NAMES = [
    "big:70b",
    "big",
    "big:latest",
    "BIG:8B",
    "bigger:70b",
    "llama3.3:70b",
    "llama3.3",
    "ns/big:1",
    "other/big:1",
    "host.io/ns/m:t",
    "localhost:5000/ns/m:t",
    "bag:70b",
    "b-g:7b",
    "b.g:7xb",
    "my-model.v2:q4_k_m",
    "mymodel.v2:q4_k_m",
    "llama3x3:70b",
]


async def test_lua_matches_exactly_what_python_matches(lab_args: tuple[str, str]) -> None:
    """Every pattern against every name: the rebuild's Lua match and the reservation's Python match
    agree (a disagreement would count a request in a counter its reservation did not charge)."""
    async with lab_on(*lab_args) as lab:
        verdicts = {}
        for pattern_text in PATTERNS:
            pattern = normalise_pattern(pattern_text)
            for name_text in NAMES:
                name = normalise(name_text)
                lua = await lab.redis.eval(
                    "return string.find(ARGV[1], ARGV[2]) ~= nil and 1 or 0",
                    keys=[],
                    args=[qualified(name), lua_pattern(pattern)],
                )
                verdicts[(pattern, name)] = (lua == 1, matches(pattern, name))
        assert all(lua == python for lua, python in verdicts.values()), [
            k for k, (a, b) in verdicts.items() if a != b
        ]
        # The table is not trivially all-false or all-true.
        assert 20 < sum(python for _, python in verdicts.values()) < len(verdicts) - 20
