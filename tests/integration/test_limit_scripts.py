"""The four limit scripts (admit, reserve, settle, lease) called through LimitScripts on a real Valkey,
with the scripts' clock pinned by `now_ms`: RPM and TPM windows of 61 one-second buckets, request-id
idempotency, key and tenant scopes, stream leases, reservations and their settlement, budget
hydration signals, budget periods, the tenant hash tag, and zero overshoot as a property."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal
from zoneinfo import ZoneInfo

import attrs
import coredis
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import grant
from shared.limits import (
    GRANT_MARKER_TTL_MS,
    MARKER_TTL_MS,
    Admitted,
    LimitScripts,
    NeedsHydration,
    Refused,
    Reserved,
    Scope,
    Spent,
)
from shared.models import UNLIMITED, Limits
from shared.periods import Periods, periods_at
from shared.redis_keys import RedisKeys

pytestmark = pytest.mark.integration

TENANT_ID = 7
KEY_ID = 11
SECOND = 1000
WINDOW_BUCKETS = 61  # one-second buckets kept in a window (README: a slot frees 60-61 s after use)
# A pinned script clock, 250 ms into a second.
S0 = 1_790_000_000
T0 = S0 * SECOND + 250
LEASE_MS = 600_000
JAN31 = Periods(day=dt.date(2026, 1, 31), month=dt.date(2026, 1, 1))
FEB01 = Periods(day=dt.date(2026, 2, 1), month=dt.date(2026, 2, 1))
BERLIN = ZoneInfo("Europe/Berlin")
UTC = ZoneInfo("UTC")

Who = Literal["key", "tenant"]
PeriodName = Literal["day", "month", "total"]


def scope(
    key: Limits | None = None,
    tenant: Limits | None = None,
    *,
    periods: Periods = JAN31,
    tenant_id: int = TENANT_ID,
    key_id: int = KEY_ID,
) -> Scope:
    """A Scope whose key limits are taken as given (already the effective, inherited ones)."""
    return Scope(
        tenant_id=tenant_id,
        key_id=key_id,
        key_limits=key or Limits(),
        tenant_limits=tenant or Limits(),
        periods=periods,
    )


@attrs.frozen
class Lab:
    """LimitScripts on a coredis client with a key prefix of the test's own."""

    redis: coredis.Redis[bytes]
    keys: RedisKeys
    scripts: LimitScripts

    async def admit(
        self, who: Scope, request_id: str, now: int, *, metered: bool = True, lease_ms: int = LEASE_MS
    ) -> Admitted | Refused | NeedsHydration:
        """One admission at a pinned time."""
        return await self.scripts.admit(who, request_id, metered=metered, lease_ttl_ms=lease_ms, now_ms=now)

    async def reserve(
        self,
        who: Scope,
        request_id: str,
        now: int,
        *,
        prompt: int,
        completion: int | None = None,
        default: int | None = None,
        metered: bool = True,
    ) -> Reserved | Spent | Refused | NeedsHydration:
        """One reservation at a pinned time."""
        return await self.scripts.reserve(
            who,
            request_id,
            metered=metered,
            prompt_bound=prompt,
            requested_completion=completion,
            default_completion=default,
            lease_ttl_ms=LEASE_MS,
            now_ms=now,
        )

    async def hydrate(
        self, who: Scope, values: Mapping[tuple[Who, str] | tuple[Who, str, str | None], int]
    ) -> None:
        """What BudgetHydrator does after Postgres: set the named counters (only where missing);
        (scope, period) or (scope, period, model pattern or None)."""
        for spec, tokens in values.items():
            whom, period = spec[0], spec[1]
            pattern = spec[2] if len(spec) > 2 else None
            if pattern is None:
                key = self.scripts.budget_key(who, whom, period)
            else:
                key = self.scripts.model_budget_key(who, pattern, whom, period)
            await self.redis.set(key, str(tokens), condition=coredis.PureToken.NX)

    async def admitted(self, who: Scope, request_id: str, now: int, *, lease_ms: int = LEASE_MS) -> Admitted:
        """A metered admission that must succeed once missing counters are set to 0."""
        outcome = await self.admit(who, request_id, now, lease_ms=lease_ms)
        if isinstance(outcome, NeedsHydration):
            await self.hydrate(who, dict.fromkeys(outcome.missing, 0))
            outcome = await self.admit(who, request_id, now, lease_ms=lease_ms)
        assert isinstance(outcome, Admitted), outcome
        return outcome

    async def counter(self, key: str) -> int | None:
        """A budget counter's value (None: missing)."""
        raw = await self.redis.get(key)
        return None if raw is None else int(raw)

    async def budget(self, who: Scope, whom: Who, period: PeriodName) -> int | None:
        """The budget counter of one scope and period."""
        return await self.counter(self.scripts.budget_key(who, whom, period))

    async def window(self, key: str) -> dict[int, int]:
        """A rate window's buckets (second -> amount)."""
        raw = await self.redis.hgetall(key)
        return {int(k): int(v) for k, v in raw.items()}

    async def exists(self, key: str) -> bool:
        """Whether a key exists."""
        return await self.redis.exists([key]) == 1


@contextlib.asynccontextmanager
async def lab_on(redis_url: str, prefix: str) -> AsyncIterator[Lab]:
    """A Lab whose client is entered and left in the calling task (coredis requires it)."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
    keys = RedisKeys(prefix)
    async with client:
        yield Lab(client, keys, LimitScripts(client, keys))


@pytest.fixture
def lab_args(redis_url: str, redis_prefix: str) -> tuple[str, str]:
    """The session's Valkey and this test's own key prefix."""
    return redis_url, redis_prefix


# --- RPM -----------------------------------------------------------------------------------------


async def test_rpm_admits_exactly_the_limit_and_frees_slots_when_their_bucket_leaves_the_window(
    lab_args: tuple[str, str],
) -> None:
    """With rpm 5: five requests (three in second S0, two ten seconds later) are admitted with
    remaining 4..0; the sixth is refused with retry_after = the time until S0's bucket leaves the
    61-bucket window; 1 ms before that it is still refused, at that instant three slots are free
    (S0's three requests) and the next refusal waits for the S0+10 bucket."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(rpm=5))
        remaining = []
        for i, now in enumerate([T0, T0 + 100, T0 + 700, T0 + 10_000, T0 + 10_500]):
            outcome = await lab.admit(who, f"r{i}", now, metered=False)
            assert isinstance(outcome, Admitted), outcome
            assert outcome.rate.limit_requests == 5
            remaining.append(outcome.rate.remaining_requests)
        assert remaining == [4, 3, 2, 1, 0]

        frees_at = (S0 + WINDOW_BUCKETS) * SECOND  # S0's bucket is dropped from this instant on
        now = T0 + 30_000
        assert await lab.admit(who, "r5", now, metered=False) == Refused("rpm", frees_at - now, "key")
        assert await lab.admit(who, "r6", frees_at - 1, metered=False) == Refused("rpm", 1, "key")

        for i in range(3):
            assert isinstance(await lab.admit(who, f"again{i}", frees_at, metered=False), Admitted)
        refused = await lab.admit(who, "again3", frees_at, metered=False)
        assert refused == Refused("rpm", (S0 + 10 + WINDOW_BUCKETS) * SECOND - frees_at, "key")
        window = await lab.window(lab.keys.rpm(TENANT_ID, f"k{KEY_ID}"))
        assert window == {S0 + 10: 2, S0 + 61: 3}


async def test_the_same_request_id_admitted_twice_counts_once(lab_args: tuple[str, str]) -> None:
    """A retried auth call (same request id) gets the same answer and is counted once: with rpm 2,
    `a` twice then `b` are admitted, `c` is refused, and `a` asked again still gets its admission
    while the refusal of `c` is remembered too."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(rpm=2))
        first = await lab.admit(who, "a", T0)
        again = await lab.admit(who, "a", T0 + 5)
        assert isinstance(first, Admitted)
        assert again == first
        assert await lab.window(lab.keys.rpm(TENANT_ID, f"k{KEY_ID}")) == {S0: 1}
        assert await lab.redis.zcard(lab.keys.leases(TENANT_ID, f"k{KEY_ID}")) == 1

        assert isinstance(await lab.admit(who, "b", T0 + 10), Admitted)
        refused = await lab.admit(who, "c", T0 + 20)
        assert isinstance(refused, Refused)
        assert refused.reason == "rpm"
        assert await lab.admit(who, "a", T0 + 30) == first
        assert await lab.window(lab.keys.rpm(TENANT_ID, f"k{KEY_ID}")) == {S0: 2}
        # The refusal is an answer too: the same id later gets the same refusal.
        assert await lab.admit(who, "c", T0 + 40) == refused


async def test_key_and_tenant_limits_both_apply_and_the_tenant_limit_is_shared(
    lab_args: tuple[str, str],
) -> None:
    """Tenant rpm 3 with key A (rpm 2 of its own) and key B (none): A's third request is refused by
    the key scope without using a tenant slot; B's first fills the tenant's third slot and B's
    second is refused by the tenant scope."""
    async with lab_on(*lab_args) as lab:
        tenant = Limits(rpm=3)
        key_a = scope(Limits(rpm=2), tenant, key_id=1)
        key_b = scope(Limits(), tenant, key_id=2)
        assert isinstance(await lab.admit(key_a, "a1", T0), Admitted)
        assert isinstance(await lab.admit(key_a, "a2", T0), Admitted)
        assert await lab.admit(key_a, "a3", T0) == Refused("rpm", 61_000 - 250, "key")
        assert isinstance(await lab.admit(key_b, "b1", T0 + 1000), Admitted)
        assert await lab.admit(key_b, "b2", T0 + 1000) == Refused("rpm", 60_000 - 250, "tenant")
        assert await lab.window(lab.keys.rpm(TENANT_ID, "t")) == {S0: 2, S0 + 1: 1}
        assert await lab.window(lab.keys.rpm(TENANT_ID, "k1")) == {S0: 2}
        assert await lab.window(lab.keys.rpm(TENANT_ID, "k2")) == {S0 + 1: 1}


async def test_a_refusal_by_any_limit_counts_nothing_anywhere(lab_args: tuple[str, str]) -> None:
    """All or nothing: key rpm 5 with a tenant concurrency of 1; the second request passes the RPM
    check but is refused for concurrency (tenant scope), and neither RPM window nor lease set counts
    it; once the lease is released the next request is admitted, and the windows hold exactly the
    two admitted requests."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(rpm=5), Limits(max_concurrent=1))
        rpm_key, rpm_tenant = lab.keys.rpm(TENANT_ID, f"k{KEY_ID}"), lab.keys.rpm(TENANT_ID, "t")
        await lab.admitted(who, "first", T0)
        assert await lab.admit(who, "second", T0 + 1) == Refused("concurrency", LEASE_MS - 1, "tenant")
        assert await lab.window(rpm_key) == {S0: 1}
        assert await lab.window(rpm_tenant) == {S0: 1}
        assert await lab.redis.zcard(lab.keys.leases(TENANT_ID, f"k{KEY_ID}")) == 1

        assert await lab.scripts.lease(who, "first", action="release", ttl_ms=LEASE_MS, now_ms=T0 + 2) == 2
        admitted = await lab.admitted(who, "third", T0 + 3)
        assert admitted.rate.remaining_requests == 3
        assert await lab.window(rpm_key) == {S0: 2}
        assert await lab.window(rpm_tenant) == {S0: 2}


async def test_a_key_without_its_own_limit_is_held_to_the_tenants(lab_args: tuple[str, str]) -> None:
    """Inheritance is decided in Python: a key with no own rpm under a tenant rpm of 2 gets rpm 2
    itself (refused in the key scope at its third request); a key whose own rpm is "unlimited" has
    none, so only the tenant's applies (refused in the tenant scope). A key's missing budget
    inherits the tenant's too, so both counters must be hydrated."""
    inherited = Limits(total_tokens=None).inherit_from(Limits(rpm=2, total_tokens=100))
    assert inherited == Limits(rpm=2, total_tokens=100)
    unlimited = Limits(rpm=UNLIMITED).inherit_from(Limits(rpm=2))
    assert unlimited.rpm is None
    async with lab_on(*lab_args) as lab:
        first = scope(inherited, Limits(rpm=2, total_tokens=100), tenant_id=21)
        for i in range(2):
            assert isinstance(await lab.admit(first, f"i{i}", T0, metered=False), Admitted)
        refused = await lab.admit(first, "i2", T0, metered=False)
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.scope) == ("rpm", "key")
        need = await lab.admit(first, "i3", T0)
        assert need == NeedsHydration((("key", "total", None), ("tenant", "total", None)))

        second = scope(unlimited, Limits(rpm=2), tenant_id=22)
        for i in range(2):
            assert isinstance(await lab.admit(second, f"u{i}", T0, metered=False), Admitted)
        refused = await lab.admit(second, "u2", T0, metered=False)
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.scope) == ("rpm", "tenant")


# --- concurrency -------------------------------------------------------------------------------


async def test_leases_never_exceed_the_limit_and_expire_after_their_ttl(lab_args: tuple[str, str]) -> None:
    """max_concurrent 3, lease TTL 10 s: three metered admissions one second apart hold three leases
    (in both scopes); a fourth is refused with retry_after = the first lease's expiry; 1 ms before it
    still refused; at the expiry the first lease is gone and a new admission takes its place."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(max_concurrent=3))
        leases_key, leases_tenant = lab.keys.leases(TENANT_ID, f"k{KEY_ID}"), lab.keys.leases(TENANT_ID, "t")
        for i in range(3):
            await lab.admitted(who, f"l{i}", T0 + i * 1000, lease_ms=10_000)
        assert await lab.admit(who, "l3", T0 + 3000, lease_ms=10_000) == Refused("concurrency", 7000, "key")
        assert await lab.admit(who, "l4", T0 + 9_999, lease_ms=10_000) == Refused("concurrency", 1, "key")
        assert await lab.redis.zcard(leases_key) == 3
        assert await lab.redis.zcard(leases_tenant) == 3

        await lab.admitted(who, "l5", T0 + 10_000, lease_ms=10_000)
        assert await lab.redis.zcard(leases_key) == 3
        assert await lab.redis.zscore(leases_key, "l0") is None
        assert await lab.redis.zscore(leases_key, "l5") == T0 + 20_000
        assert await lab.admit(who, "l6", T0 + 10_000, lease_ms=10_000) == Refused("concurrency", 1000, "key")


async def test_a_renewed_lease_outlives_its_first_ttl_and_a_released_one_frees_its_slot(
    lab_args: tuple[str, str],
) -> None:
    """max_concurrent 1 in the tenant scope, TTL 1 s: a lease renewed at +600 ms holds its slot
    past +1 s (refusal waits for the renewed expiry) and expires at +1.6 s; a released lease frees
    the slot at once; renewing a lease that is not held touches nothing."""
    async with lab_on(*lab_args) as lab:
        who = scope(tenant=Limits(max_concurrent=1))
        await lab.admitted(who, "a", T0, lease_ms=1000)
        touched = await lab.scripts.lease(who, "a", action="renew", ttl_ms=1000, now_ms=T0 + 600)
        assert touched == 2  # the key's and the tenant's lease sets
        assert await lab.admit(who, "b", T0 + 1000, lease_ms=1000) == Refused("concurrency", 600, "tenant")
        await lab.admitted(who, "c", T0 + 1600, lease_ms=1000)

        assert await lab.scripts.lease(who, "c", action="release", ttl_ms=1000, now_ms=T0 + 1700) == 2
        await lab.admitted(who, "d", T0 + 1700, lease_ms=1000)
        assert await lab.scripts.lease(who, "gone", action="renew", ttl_ms=1000, now_ms=T0 + 1700) == 0
        assert await lab.redis.zcard(lab.keys.leases(TENANT_ID, "t")) == 1


async def test_renewals_keep_the_lease_sets_alive_as_long_as_a_lease_lives(lab_args: tuple[str, str]) -> None:
    """A stream that outlives its first lease TTL + 60 s renews its lease: the key's and the tenant's
    lease sets must not expire under it (else the whole set vanishes and the scope admits past its
    limit). The set's expiry is aged by hand to what it would be after that long; a renewal pushes it
    back to at least the lease TTL + 60 s, a later admission never shortens it, and a renewal of a
    lease in a set that is gone creates nothing."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(max_concurrent=1), Limits(max_concurrent=1))
        sets = [lab.keys.leases(TENANT_ID, f"k{KEY_ID}"), lab.keys.leases(TENANT_ID, "t")]
        await lab.admitted(who, "long", T0, lease_ms=30_000)
        for key in sets:
            await lab.redis.pexpire(key, 50)  # what is left of the set's TTL 90 s later, unrenewed
        await lab.scripts.lease(who, "long", action="renew", ttl_ms=30_000, now_ms=T0 + 90_000)
        for key in sets:
            assert await lab.redis.pttl(key) > 89_000, key
        await asyncio.sleep(0.1)
        assert await lab.admit(who, "second", T0 + 90_001, lease_ms=30_000) == Refused(
            "concurrency", 29_999, "key"
        )

        for key in sets:
            await lab.redis.pexpire(key, 600_000)
        await lab.scripts.lease(who, "long", action="renew", ttl_ms=30_000, now_ms=T0 + 91_000)
        for key in sets:
            assert await lab.redis.pttl(key) > 590_000, key  # a longer expiry is kept

        for key in sets:
            await lab.redis.delete([key])
        await lab.scripts.lease(who, "long", action="renew", ttl_ms=30_000, now_ms=T0 + 92_000)
        for key in sets:
            assert not await lab.exists(key)


# --- TPM, reservation and settlement -------------------------------------------------------------


async def test_a_window_full_of_reserved_tokens_refuses_the_next_admission_and_reservation(
    lab_args: tuple[str, str],
) -> None:
    """tpm 100: r1 and r2 are admitted on an empty window; r1 reserves 60 + 40 = 100 tokens; then
    r2's reservation is refused (tpm, key scope, retry until the bucket leaves the window) with
    nothing reserved and its grant spent for good, and r3's admission is refused."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(tpm=100))
        tpm_key = lab.keys.tpm(TENANT_ID, f"k{KEY_ID}")
        assert isinstance(await lab.admit(who, "r1", T0), Admitted)
        assert isinstance(await lab.admit(who, "r2", T0), Admitted)
        assert await lab.reserve(who, "r1", T0, prompt=60, completion=40) == Reserved(40, 100)
        assert await lab.window(tpm_key) == {S0: 100}

        retry = (S0 + WINDOW_BUCKETS) * SECOND - (T0 + 500)
        assert await lab.reserve(who, "r2", T0 + 500, prompt=10) == Refused("tpm", retry, "key")
        assert await lab.window(tpm_key) == {S0: 100}
        assert not await lab.exists(lab.keys.reservation(TENANT_ID, "r2"))
        assert await lab.redis.zscore(lab.keys.reservation_index(TENANT_ID), "r2") is None
        # A refused grant stays spent: it cannot be presented again once the window frees.
        assert await lab.exists(lab.keys.grant_spent(TENANT_ID, "r2"))
        assert await lab.reserve(who, "r2", T0 + 62 * SECOND, prompt=10) == Spent()

        assert await lab.admit(who, "r3", T0 + 500) == Refused("tpm", retry, "key")


async def test_settling_fewer_tokens_frees_the_difference_once(lab_args: tuple[str, str]) -> None:
    """tpm 100 and a key total of 1000: a reservation of 100 fills the window; settling 30 actual
    tokens leaves 30 in the window and in the budget, drops the reservation, its index entry and
    its leases, and admits again (70 tokens remaining); settling the same request id again is a
    no-op."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(tpm=100, total_tokens=1000))
        tpm_key = lab.keys.tpm(TENANT_ID, f"k{KEY_ID}")
        await lab.admitted(who, "r1", T0)
        assert await lab.reserve(who, "r1", T0, prompt=60, completion=40) == Reserved(40, 100)
        assert isinstance(await lab.admit(who, "r2", T0 + 100), Refused)

        assert await lab.scripts.settle(who, "r1", 30) is True
        assert await lab.window(tpm_key) == {S0: 30}
        assert await lab.budget(who, "key", "total") == 30
        assert not await lab.exists(lab.keys.reservation(TENANT_ID, "r1"))
        assert await lab.redis.zscore(lab.keys.reservation_index(TENANT_ID), "r1") is None
        assert await lab.redis.zscore(lab.keys.leases(TENANT_ID, f"k{KEY_ID}"), "r1") is None
        assert await lab.redis.zscore(lab.keys.leases(TENANT_ID, "t"), "r1") is None

        assert await lab.scripts.settle(who, "r1", 10) is False
        assert await lab.window(tpm_key) == {S0: 30}
        assert await lab.budget(who, "key", "total") == 30

        admitted = await lab.admit(who, "r3", T0 + 200)
        assert isinstance(admitted, Admitted)
        assert admitted.rate.remaining_tokens == 70


async def test_an_actual_count_above_the_reservation_is_recorded_and_refuses_the_next(
    lab_args: tuple[str, str],
) -> None:
    """A request that used more than it reserved (a prompt bound that was not one) is settled at
    its actual count: reserved 50 (20 + 30) of a 100-token total budget, actual 130; the budget
    counter and the TPM window say 130, not 50 and not 100, and the next admission and reservation
    are refused: the overshoot is visible and never compounds."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=100, tpm=1000))
        await lab.admitted(who, "r1", T0)
        assert await lab.reserve(who, "r1", T0, prompt=20, completion=30) == Reserved(30, 50)
        assert await lab.budget(who, "key", "total") == 50
        assert await lab.scripts.settle(who, "r1", 130) is True
        assert await lab.budget(who, "key", "total") == 130
        assert await lab.window(lab.keys.tpm(TENANT_ID, f"k{KEY_ID}")) == {S0: 130}
        refused = await lab.admit(who, "r2", T0 + 100)
        assert isinstance(refused, Refused)
        assert (refused.reason, refused.scope) == ("budget_total", "key")
        assert isinstance(await lab.reserve(who, "r2", T0 + 100, prompt=1, completion=1), Refused)
        assert await lab.budget(who, "key", "total") == 130


async def test_settling_without_a_count_charges_the_reservation_as_it_stands(
    lab_args: tuple[str, str],
) -> None:
    """Settle with '' (no actual count) keeps the reserved 20 + 30 tokens charged, removes the
    reservation and is applied once."""
    async with lab_on(*lab_args) as lab:
        who = scope(tenant=Limits(total_tokens=1000, tpm=500))
        await lab.admitted(who, "r1", T0)
        assert await lab.reserve(who, "r1", T0, prompt=20, completion=30) == Reserved(30, 50)
        assert await lab.scripts.settle(who, "r1", None) is True
        assert await lab.budget(who, "tenant", "total") == 50
        assert await lab.window(lab.keys.tpm(TENANT_ID, "t")) == {S0: 50}
        assert not await lab.exists(lab.keys.reservation(TENANT_ID, "r1"))
        assert await lab.scripts.settle(who, "r1", 5) is False
        assert await lab.budget(who, "tenant", "total") == 50


async def test_counters_that_exist_without_a_limit_are_charged_and_settled_too(
    lab_args: tuple[str, str],
) -> None:
    """rebuild-counters writes every counter, limited or not; one without a limit must stay exact
    (a limit set later trusts it): the reservation charges it and the settle corrects it."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000))  # no day limit on the key, no TPM limit
        day = lab.scripts.budget_key(who, "key", "day")
        tpm_key = lab.keys.tpm(TENANT_ID, f"k{KEY_ID}")
        await lab.redis.set(day, "7")
        await lab.redis.hset(tpm_key, {str(S0 - 1): "3"})
        await lab.admitted(who, "r1", T0)
        assert await lab.reserve(who, "r1", T0, prompt=60, completion=40) == Reserved(40, 100)
        assert await lab.budget(who, "key", "day") == 7 + 100
        assert await lab.window(tpm_key) == {S0 - 1: 3, S0: 100}
        assert await lab.scripts.settle(who, "r1", 30) is True
        assert await lab.budget(who, "key", "day") == 7 + 30
        assert await lab.window(tpm_key) == {S0 - 1: 3, S0: 30}
        assert await lab.budget(who, "key", "month") is None  # what does not exist is not made


async def test_a_settle_by_stream_proxy_is_noted_until_the_accountant_settles_it_even_an_hour_later(
    lab_args: tuple[str, str],
) -> None:
    """stream_proxy's settle (ledgered=False) counts the tokens and notes the request as unledgered;
    the accountant's settle after its commit removes the note and counts nothing again, also after
    the settled marker expired; while the tenant's counter lock is held it answers -1 and changes
    nothing; stream_proxy's own settle is never held."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000))
        unledgered = lab.keys.unledgered(TENANT_ID)
        for request_id in ("r1", "r2"):
            await lab.admitted(who, request_id, T0)
            assert await lab.reserve(who, request_id, T0, prompt=60, completion=40) == Reserved(40, 100)
        await lab.redis.set(lab.keys.hydrate_lock(TENANT_ID), "someone")
        assert await lab.scripts.settle(who, "r1", 30, ledgered=False) is True
        entry = (await lab.redis.hget(unledgered, "r1") or b"").decode().split(",")
        assert entry[:5] == [str(KEY_ID), "30", str(S0), "2026-01-31", "2026-01-01"]
        keys, args = lab.scripts._settle_call(who, "r1", 30, True)
        assert await lab.scripts._settle(keys=keys, args=args) == -1
        assert await lab.redis.hexists(unledgered, "r1")
        await lab.redis.delete([lab.keys.hydrate_lock(TENANT_ID)])
        await lab.redis.delete([lab.keys.settled(TENANT_ID, "r1")])  # an hour went by
        assert await lab.scripts.settle(who, "r1", 30) is False
        assert not await lab.redis.hexists(unledgered, "r1")
        assert await lab.budget(who, "key", "total") == 30 + 100
        assert await lab.scripts.settle(who, "r2", 20) is True  # the accountant first: no note
        assert not await lab.redis.exists([unledgered])
        assert await lab.budget(who, "key", "total") == 50


async def test_a_settle_queued_on_a_pipeline_applies_once_even_after_redis_lost_its_scripts(
    lab_args: tuple[str, str],
) -> None:
    """settle_in (stream_proxy's settle beside the usage event) sends EVALSHA on the pipeline; with
    the script cache flushed (a restarted Redis) the outcome loads the script again and applies the
    settle; a second settle of the same request id is a no-op."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000))
        for request_id in ("r1", "r2"):
            await lab.admitted(who, request_id, T0)
            assert await lab.reserve(who, request_id, T0, prompt=60, completion=40) == Reserved(40, 100)
        async with lab.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
            first = lab.scripts.settle_in(pipe, who, "r1", 30, ledgered=False)
        assert await first() == 1
        assert await lab.budget(who, "key", "total") == 30 + 100
        await lab.redis.script_flush()
        async with lab.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
            second = lab.scripts.settle_in(pipe, who, "r2", 25, ledgered=False)
        assert await second() == 1
        assert await lab.budget(who, "key", "total") == 30 + 25
        async with lab.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
            again = lab.scripts.settle_in(pipe, who, "r2", 99, ledgered=False)
        assert await again() == 0
        assert await lab.budget(who, "key", "total") == 55


async def test_per_request_markers_expire_but_outlive_what_they_guard(lab_args: tuple[str, str]) -> None:
    """Every request leaves a grant-spent and a settled marker, so both expire (Valkey's memory stays
    bounded): the grant marker outlives any grant's validity (MAX_TTL + clock slack), the settled
    marker lives an hour."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000))
        await lab.admitted(who, "m1", T0)
        assert isinstance(await lab.reserve(who, "m1", T0, prompt=10, completion=10), Reserved)
        assert await lab.scripts.settle(who, "m1", 5) is True
        grant_ttl = await lab.redis.pttl(lab.keys.grant_spent(TENANT_ID, "m1"))
        settled_ttl = await lab.redis.pttl(lab.keys.settled(TENANT_ID, "m1"))
        assert (grant.MAX_TTL + grant.CLOCK_SLACK) * 1000 < grant_ttl <= GRANT_MARKER_TTL_MS
        assert MARKER_TTL_MS - 60_000 < settled_ttl <= MARKER_TTL_MS == 3_600_000


async def test_a_grant_is_spent_by_its_first_reservation(lab_args: tuple[str, str]) -> None:
    """The reservation call spends the grant: a second call with the same request id gets Spent
    and charges nothing more, metered or not."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000))
        await lab.admitted(who, "m", T0)
        assert await lab.reserve(who, "m", T0, prompt=10, completion=5) == Reserved(5, 15)
        assert await lab.reserve(who, "m", T0, prompt=10, completion=5) == Spent()
        assert await lab.budget(who, "key", "total") == 15

        assert await lab.reserve(who, "plain", T0, prompt=0, metered=False) == Reserved(None, 0)
        assert await lab.reserve(who, "plain", T0, prompt=0, metered=False) == Spent()


async def test_the_forwarded_completion_is_the_request_clamped_to_the_headroom_after_the_prompt(
    lab_args: tuple[str, str],
) -> None:
    """Completion = min(requested (or the default cap), headroom - prompt), the headroom being the
    least room of every budget and TPM window of key and tenant: tenant total 700 with 100 already
    used and key total 1000 give 600; 100 + 50 fits as asked; then 150 + 1000 is clamped to 300; a
    request without its own limit gets the default cap, or the whole headroom without one."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(total_tokens=1000), Limits(total_tokens=700))
        await lab.hydrate(who, {("key", "total"): 0, ("tenant", "total"): 100})
        assert await lab.reserve(who, "a", T0, prompt=100, completion=50) == Reserved(50, 150)
        assert await lab.reserve(who, "b", T0, prompt=150, completion=1000) == Reserved(300, 450)
        assert await lab.budget(who, "key", "total") == 600
        assert await lab.budget(who, "tenant", "total") == 700

        roomy = scope(Limits(total_tokens=1000), tenant_id=31)
        await lab.hydrate(roomy, {("key", "total"): 0})
        assert await lab.reserve(roomy, "c", T0, prompt=10, default=64) == Reserved(64, 74)
        assert await lab.reserve(roomy, "d", T0, prompt=10, completion=5, default=64) == Reserved(5, 15)
        assert await lab.reserve(roomy, "e", T0, prompt=11) == Reserved(900, 911)
        assert await lab.budget(roomy, "key", "total") == 1000

        tpm_bound = scope(Limits(tpm=80), tenant_id=32)
        assert await lab.reserve(tpm_bound, "f", T0, prompt=30, completion=100) == Reserved(50, 80)


async def test_a_prompt_that_leaves_no_room_for_one_token_is_refused_and_reserves_nothing(
    lab_args: tuple[str, str],
) -> None:
    """Tenant total 500 with 400 used: a prompt bound of 100 (100 + 1 > 100 left) is refused
    (budget, tenant scope, no useful retry), reserves nothing and spends its grant; a bound of 99 gets
    exactly one completion token; the counter then stands at the limit and admission is refused."""
    async with lab_on(*lab_args) as lab:
        who = scope(tenant=Limits(total_tokens=500))
        await lab.hydrate(who, {("tenant", "total"): 400})
        assert await lab.reserve(who, "big", T0, prompt=100, completion=10) == Refused("budget", -1, "tenant")
        assert await lab.budget(who, "tenant", "total") == 400
        assert not await lab.exists(lab.keys.reservation(TENANT_ID, "big"))
        assert await lab.redis.zscore(lab.keys.reservation_index(TENANT_ID), "big") is None
        assert await lab.exists(lab.keys.grant_spent(TENANT_ID, "big"))

        assert await lab.reserve(who, "fits", T0, prompt=99, completion=10) == Reserved(1, 100)
        assert await lab.budget(who, "tenant", "total") == 500
        assert await lab.admit(who, "next", T0) == Refused("budget_total", -1, "tenant")


# --- budgets and periods -------------------------------------------------------------------------


async def test_missing_budget_counters_ask_for_hydration_only_for_configured_budgets(
    lab_args: tuple[str, str],
) -> None:
    """A key daily budget and a tenant total budget without counters: a metered admission and a
    reservation answer NeedsHydration naming exactly those two and count nothing (no RPM slot, no
    lease, grant unspent); once one is set only the other is named; once both are set the request
    is admitted. A non-metered admission never asks."""
    async with lab_on(*lab_args) as lab:
        who = scope(Limits(daily_tokens=100, rpm=10), Limits(total_tokens=1000))
        need = NeedsHydration((("key", "day", None), ("tenant", "total", None)))
        assert await lab.admit(who, "r", T0) == need
        assert await lab.reserve(who, "r", T0, prompt=5) == need
        assert not await lab.exists(lab.keys.rpm(TENANT_ID, f"k{KEY_ID}"))
        assert not await lab.exists(lab.keys.leases(TENANT_ID, f"k{KEY_ID}"))
        assert not await lab.exists(lab.keys.grant_spent(TENANT_ID, "r"))

        assert isinstance(await lab.admit(who, "plain", T0, metered=False), Admitted)

        await lab.hydrate(who, {("key", "day"): 0})
        assert await lab.admit(who, "r", T0) == NeedsHydration((("tenant", "total", None),))
        await lab.hydrate(who, {("tenant", "total"): 0})
        assert isinstance(await lab.admit(who, "r", T0), Admitted)


def last_ms(day: dt.date) -> dt.datetime:
    """23:59:59.999 (naive, local) on a day."""
    return dt.datetime.combine(day, dt.time(23, 59, 59, 999_000))


@pytest.mark.parametrize(
    ("zone", "last", "first"),
    [
        (UTC, last_ms(dt.date(2026, 1, 31)), FEB01),
        (BERLIN, last_ms(dt.date(2026, 1, 31)), FEB01),
        (BERLIN, last_ms(dt.date(2026, 12, 31)), Periods(dt.date(2027, 1, 1), dt.date(2027, 1, 1))),
        (BERLIN, last_ms(dt.date(2028, 2, 29)), Periods(dt.date(2028, 3, 1), dt.date(2028, 3, 1))),
        (BERLIN, last_ms(dt.date(2026, 3, 28)), Periods(dt.date(2026, 3, 29), dt.date(2026, 3, 1))),
    ],
)
def test_periods_roll_over_at_local_midnight(zone: ZoneInfo, last: dt.datetime, first: Periods) -> None:
    """periods_at with a pinned time: 23:59:59.999 local is still the old day (and month), 1 ms later
    is the new one, in UTC and in Europe/Berlin (where midnight is 23:00 or 22:00 UTC), at a month
    end, a year end, a leap day and the night before a DST switch; seconds_left of the day is 1 ms."""
    before = last.replace(tzinfo=zone).timestamp()
    after = dt.datetime.combine(first.day, dt.time(), tzinfo=zone).timestamp()
    assert after - before == pytest.approx(0.001, abs=1e-6)
    old = periods_at(before, zone)
    assert old == Periods(last.date(), last.date().replace(day=1))
    assert periods_at(after, zone) == first
    assert old.seconds_left("day", before, zone) == pytest.approx(0.001, abs=1e-6)
    assert old.seconds_left("total", before, zone) is None
    if first.month != old.month:
        assert old.seconds_left("month", before, zone) == pytest.approx(0.001, abs=1e-6)
    # Berlin's midnight is not UTC's: the UTC date of the instant is the day before.
    if zone is BERLIN:
        assert dt.datetime.fromtimestamp(after, UTC).date() == last.date()


async def test_a_new_period_uses_new_counters_and_the_total_carries_over(lab_args: tuple[str, str]) -> None:
    """In Europe/Berlin at 2026-01-31 23:59:59.999, 100 tokens are charged to the key's January 31
    day, January month and total counters; 1 ms later (February 1) the day and month counters are
    other keys that must be hydrated, the total is the same key (not asked for), and 50 more tokens
    leave January's counters alone and bring the total to 150."""
    async with lab_on(*lab_args) as lab:
        instant = dt.datetime(2026, 1, 31, 23, 59, 59, 999_000, tzinfo=BERLIN).timestamp()
        before_ms = round(instant * 1000)
        budgets = Limits(daily_tokens=1000, monthly_tokens=5000, total_tokens=10_000)
        jan = scope(budgets, periods=periods_at(before_ms / 1000, BERLIN))
        feb = attrs.evolve(jan, periods=periods_at((before_ms + 1) / 1000, BERLIN))
        assert jan.periods == JAN31
        assert feb.periods == FEB01
        tag = f"{lab.keys.prefix}{{t:{TENANT_ID}}}:budget:k{KEY_ID}"
        assert lab.scripts.budget_key(jan, "key", "day") == f"{tag}:day:2026-01-31"
        assert lab.scripts.budget_key(jan, "key", "month") == f"{tag}:month:2026-01-01"
        assert lab.scripts.budget_key(feb, "key", "day") == f"{tag}:day:2026-02-01"
        assert lab.scripts.budget_key(feb, "key", "month") == f"{tag}:month:2026-02-01"
        assert lab.scripts.budget_key(jan, "key", "total") == f"{tag}:total:1970-01-01"
        assert lab.scripts.budget_key(feb, "key", "total") == f"{tag}:total:1970-01-01"

        await lab.admitted(jan, "jan", before_ms)
        assert await lab.reserve(jan, "jan", before_ms, prompt=60, completion=40) == Reserved(40, 100)
        assert await lab.scripts.settle(jan, "jan", None) is True

        assert await lab.admit(feb, "feb", before_ms + 1) == NeedsHydration(
            (("key", "day", None), ("key", "month", None))
        )
        await lab.admitted(feb, "feb", before_ms + 1)
        assert await lab.reserve(feb, "feb", before_ms + 1, prompt=30, completion=20) == Reserved(20, 50)
        assert await lab.scripts.settle(feb, "feb", None) is True

        assert [await lab.budget(jan, "key", p) for p in ("day", "month", "total")] == [100, 100, 150]
        assert [await lab.budget(feb, "key", p) for p in ("day", "month", "total")] == [50, 50, 150]


# --- Redis Cluster safety ------------------------------------------------------------------------


def keyslot(key: str) -> int:
    """Redis Cluster's slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key, mod 16384."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


@attrs.define
class KeySpy:
    """Records the KEYS of every script call and passes the call on unchanged."""

    calls: list[tuple[str, list[str]]] = attrs.field(factory=list)

    def wrap(self, name: str, script: Any) -> Any:
        """A stand-in for a registered script that records its keys."""

        def call(*, keys: list[str], args: list[Any], **options: Any) -> Any:
            self.calls.append((name, [k.decode() if isinstance(k, bytes) else str(k) for k in keys]))
            return script(keys=keys, args=args, **options)

        return call


async def test_every_key_of_every_script_call_shares_the_tenant_hash_tag(lab_args: tuple[str, str]) -> None:
    """With every limit configured, each key passed to admit, reserve, settle and lease (renew and
    release) starts with `<prefix>{t:<tenant id>}:` and hashes to one cluster slot, and every key the
    calls left in Redis under the prefix carries the tag."""
    assert keyslot("foo") == 12182  # the reference value from the Redis Cluster specification
    assert keyslot("{user1000}.following") == keyslot("{user1000}.followers")
    async with lab_on(*lab_args) as lab:
        spy = KeySpy()
        scripts = lab.scripts
        scripts._admit = spy.wrap("admit", scripts._admit)
        scripts._reserve = spy.wrap("reserve", scripts._reserve)
        scripts._settle = spy.wrap("settle", scripts._settle)
        scripts._lease = spy.wrap("lease", scripts._lease)
        scripts._rebuild = spy.wrap("rebuild", scripts._rebuild)
        every = Limits(
            rpm=10, tpm=10_000, max_concurrent=5, daily_tokens=1000, monthly_tokens=2000, total_tokens=3000
        )
        who = scope(every, every, tenant_id=4242, key_id=99)
        await lab.admitted(who, "one", T0)
        assert isinstance(await lab.reserve(who, "one", T0, prompt=10, completion=10), Reserved)
        await lab.scripts.lease(who, "one", action="renew", ttl_ms=1000, now_ms=T0 + 1)
        await lab.scripts.settle(who, "one", 12)
        await lab.admitted(who, "two", T0)
        await lab.scripts.lease(who, "two", action="release", ttl_ms=1000, now_ms=T0 + 1)
        token = "rebuild-token"
        await lab.redis.set(lab.keys.hydrate_lock(4242), token)
        plan = {
            "resv_prefix": lab.keys.reservation(4242, ""),
            "day": "",
            "month": "",
            "counters": [],
            "ledgered": {},
        }
        lists = [lab.keys.reservation_index(4242), lab.keys.unledgered(4242), lab.keys.hydrate_lock(4242)]
        assert await lab.scripts.rebuild_counters(lists, token, orjson.dumps(plan)) == 0

        assert {name for name, _ in spy.calls} == {"admit", "reserve", "settle", "lease", "rebuild"}
        tagged = f"{lab.keys.prefix}{{t:4242}}:"
        slot = keyslot(tagged)
        for name, keys in spy.calls:
            for key in keys:
                assert key.startswith(tagged), (name, key)
                assert keyslot(key) == slot, (name, key)
        stored = [k.decode() async for k in lab.redis.scan_iter(match=f"{lab.keys.prefix}*")]
        assert stored
        assert all(k.startswith(tagged) for k in stored), stored


# --- zero overshoot, as a property ---------------------------------------------------------------

BUDGET_NAMES: tuple[tuple[Who, PeriodName, str], ...] = (
    ("key", "day", "daily_tokens"),
    ("key", "month", "monthly_tokens"),
    ("key", "total", "total_tokens"),
    ("tenant", "day", "daily_tokens"),
    ("tenant", "month", "monthly_tokens"),
    ("tenant", "total", "total_tokens"),
)
maybe_limit = st.none() | st.integers(min_value=1, max_value=400)
limit_sets = st.fixed_dictionaries(
    {
        "key": st.builds(Limits, tpm=maybe_limit, daily_tokens=maybe_limit, total_tokens=maybe_limit),
        "tenant": st.builds(Limits, tpm=maybe_limit, monthly_tokens=maybe_limit, total_tokens=maybe_limit),
    }
)
Operation = tuple[str, int, int | None, int | None]
operations = st.lists(
    st.one_of(
        # start a request: prompt bound, requested completion, default completion cap
        st.tuples(
            st.just("start"),
            st.integers(0, 60),
            st.none() | st.integers(0, 120),
            st.none() | st.integers(1, 80),
        ),
        # settle an open request: which one, actual tokens in thousandths of the reservation (None: as is)
        st.tuples(st.just("settle"), st.integers(0, 999), st.none() | st.integers(0, 1000), st.none()),
        # settle an already settled request again
        st.tuples(st.just("resettle"), st.integers(0, 999), st.integers(0, 1000), st.none()),
        # time passes (all of it stays inside one TPM window: at most 40 x 1.4 s)
        st.tuples(st.just("tick"), st.integers(1, 1400), st.none(), st.none()),
    ),
    min_size=1,
    max_size=40,
)


@attrs.define
class Books:
    """What the test knows was charged: settled actual tokens and open reservations."""

    settled: int = 0
    open: dict[str, int] = attrs.field(factory=dict)
    closed: list[str] = attrs.field(factory=list)

    @property
    def charged(self) -> int:
        """Tokens every configured counter must hold right now."""
        return self.settled + sum(self.open.values())


async def check_counters(lab: Lab, who: Scope, books: Books, now: int) -> int | None:
    """Every configured budget counter and TPM window equals what was charged and stays within its
    limit; returns the least headroom (None: nothing configured)."""
    rooms: list[int] = []
    for whom, period, field in BUDGET_NAMES:
        limits = who.key_limits if whom == "key" else who.tenant_limits
        limit = getattr(limits, field)
        if limit is None:
            continue
        value = await lab.budget(who, whom, period)
        if value is None:  # not hydrated yet: nothing may have been charged
            assert books.charged == 0, (whom, period)
            value = 0
        assert value == books.charged, (whom, period)
        assert value <= limit, (whom, period, value, limit)
        rooms.append(limit - value)
    for name, limit in (("k", who.key_limits.tpm), ("t", who.tenant_limits.tpm)):
        if limit is None:
            continue
        scope_name = f"k{who.key_id}" if name == "k" else "t"
        window = await lab.window(lab.keys.tpm(who.tenant_id, scope_name))
        used = sum(v for sec, v in window.items() if sec >= now // SECOND - 60)
        assert used == books.charged, name
        assert used <= limit, (name, used, limit)
        rooms.append(limit - used)
    return min(rooms) if rooms else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(limits=limit_sets, ops=operations)
async def test_reservations_never_overshoot_a_budget_and_settling_leaves_the_actual_usage(
    redis_url: str, limits: dict[str, Limits], ops: list[Operation]
) -> None:
    """For random limits (key and tenant budgets and TPM) and random sequences of admissions with
    reservations, settlements of fewer or as-reserved tokens, repeated settlements and passing time:
    after every step each configured counter equals settled plus open reservations and never exceeds
    its limit; admission is refused exactly when some counter is at its limit; a reservation is
    refused exactly when prompt + 1 does not fit and is otherwise clamped to the least headroom; and
    once everything is settled each counter equals the sum of the actual tokens."""
    fields = ("tpm", "daily_tokens", "monthly_tokens", "total_tokens")
    assume(any(getattr(lim, f) is not None for lim in limits.values() for f in fields))
    async with lab_on(redis_url, f"prop:{uuid.uuid4().hex[:12]}:") as lab:
        who = scope(limits["key"], limits["tenant"])
        books = Books()
        now = T0
        for i, (kind, a, b, c) in enumerate(ops):
            if kind == "tick":
                now += a
            elif kind == "start":
                room = await check_counters(lab, who, books, now)
                outcome = await lab.admit(who, f"r{i}", now)
                if isinstance(outcome, NeedsHydration):
                    await lab.hydrate(who, dict.fromkeys(outcome.missing, 0))
                    outcome = await lab.admit(who, f"r{i}", now)
                full = room is not None and room <= 0
                assert isinstance(outcome, Refused if full else Admitted), (outcome, room)
                if isinstance(outcome, Admitted):
                    reserved = await lab.reserve(who, f"r{i}", now, prompt=a, completion=b, default=c)
                    assert room is not None
                    if room < a + 1:
                        assert isinstance(reserved, Refused), reserved
                    else:
                        wanted = b if b is not None else c
                        completion = room - a if wanted is None else min(wanted, room - a)
                        amount = a + completion
                        assert reserved == Reserved(completion, amount)
                        books.open[f"r{i}"] = amount
            elif kind == "settle" and books.open:
                rid = sorted(books.open)[a % len(books.open)]
                amount = books.open.pop(rid)
                actual = amount if b is None else amount * b // 1000
                assert await lab.scripts.settle(who, rid, None if b is None else actual) is True
                books.settled += actual
                books.closed.append(rid)
            elif kind == "resettle" and books.closed:
                rid = books.closed[a % len(books.closed)]
                assert await lab.scripts.settle(who, rid, b) is False
            await check_counters(lab, who, books, now)

        for rid in sorted(books.open):
            amount = books.open.pop(rid)
            actual = amount // 2
            assert await lab.scripts.settle(who, rid, actual) is True
            books.settled += actual
        await check_counters(lab, who, books, now)
