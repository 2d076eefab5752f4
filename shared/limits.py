"""The atomic limit operations: one Redis script call each (admit, reserve, settle, lease).

The Lua lives next to this module (`shared/lua/*.lua`); this module builds the key lists (all
under the tenant's hash tag, so every call is Redis Cluster safe) and turns replies into models.
Script time comes from Redis `TIME` unless `now_ms` is given (tests pin it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Literal

import attrs
import coredis

from shared import model_limits
from shared.grant import RateInfo
from shared.model_names import qualified
from shared.models import Limits, ModelRule
from shared.periods import PERIODS, Periods
from shared.redis_keys import RedisKeys

NO_LIMIT = -1
DECISION_TTL_MS = 120_000
# How long a settled request id is remembered: duplicate usage events (a spooled event written twice,
# a claim after a crashed accountant) arrive within minutes; one arriving later (Postgres down for
# over an hour) would count its tokens a second time in Redis, an overcount that errs closed and that
# `rebuild-counters` corrects. Every request leaves one such key, so this bounds Valkey's memory.
MARKER_TTL_MS = 3600 * 1000
# A grant is spent once; it cannot be presented after it expires (at most 60 s plus slack).
GRANT_MARKER_TTL_MS = 120_000
SETTLE_GRACE_MS = 600_000
# The per-tenant counter lock (shared/counters.py) is held this long at most; a ledgered settle it
# holds off is sent again every LOCK_POLL_S for up to LOCK_WAIT_S.
LOCK_MS = 5000
LOCK_POLL_S = 0.02
LOCK_WAIT_S = LOCK_MS / 1000 + 1.0
BUDGET_FIELDS = {"day": "daily_tokens", "month": "monthly_tokens", "total": "total_tokens"}


def _lua(name: str) -> str:
    """A script with the common prelude (clock and window) in front of it."""
    folder = resources.files("shared").joinpath("lua")
    return folder.joinpath("common.lua").read_text(encoding="utf-8") + folder.joinpath(
        f"{name}.lua"
    ).read_text(encoding="utf-8")


def _limit(value: int | None) -> int:
    return NO_LIMIT if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CountersBusy(Exception):
    """A tenant's counters are being rebuilt (shared/counters.py); try again shortly."""


@attrs.frozen
class Scope:
    """Who a call is for: the key, its tenant, and the budget periods in force."""

    tenant_id: int
    key_id: int
    key_limits: Limits
    tenant_limits: Limits
    periods: Periods
    rules: tuple[ModelRule, ...] = ()  # the key's model rules (shared/models.py `model_rules`)
    model: str | None = None  # the canonical model the request names, once it is known

    @property
    def key_scope(self) -> str:
        """The key's scope name in Redis key names."""
        return f"k{self.key_id}"

    def model_scopes(self) -> list[tuple[ModelRule, Literal["key", "tenant"], Limits]]:
        """The model scopes that apply to this request: each rule covering its model, at the key's
        scope and at the tenant's where that has a limit."""
        return [
            (rule, who, limits)
            for rule in model_limits.applicable(self.rules, self.model)
            for who, limits in rule.scopes()
        ]


@attrs.frozen
class Admitted:
    """Admitted; the values for the x-ratelimit-* headers."""

    rate: RateInfo
    second: int | None = None  # the RPM window bucket the request was counted in (None: not counted)


@attrs.frozen
class Refused:
    """Refused by a limit; retry_after_ms is -1 when no wait helps (a spent budget period)."""

    reason: str  # rpm, tpm, concurrency, budget_day, budget_month, budget_total, budget
    retry_after_ms: int
    scope: Literal["key", "tenant"]
    model: str | None = None  # the pattern of the model rule that refused (None: an unscoped limit)
    limit: int | None = None  # a model rule's limit and what was used of it, for the headers
    used: int | None = None


@attrs.frozen
class NeedsHydration:
    """Budget counters are missing from Redis: rebuild these from Postgres, then retry."""

    missing: tuple[tuple[Literal["key", "tenant"], str, str | None], ...]  # (scope, period, pattern)


@attrs.frozen
class Reserved:
    """Tokens reserved; forward `completion_limit` (None: the client's own, unlimited)."""

    completion_limit: int | None
    reserved: int


@attrs.frozen
class Spent:
    """The grant had already been used."""


def _budget_specs(scope: Scope) -> list[tuple[Literal["key", "tenant"], str, int]]:
    """(scope, period, limit) in the fixed order the scripts use."""
    specs: list[tuple[Literal["key", "tenant"], str, int]] = []
    for who, limits in (("key", scope.key_limits), ("tenant", scope.tenant_limits)):
        for period in PERIODS:
            specs.append((who, period, _limit(getattr(limits, BUDGET_FIELDS[period]))))  # type: ignore[arg-type]
    return specs


@functools.lru_cache(maxsize=1024)
def _packed(who: str, limits: Limits) -> str:
    """A model scope's limits as reserve.lua takes them: one argument."""
    values = [
        limits.rpm,
        limits.tpm,
        limits.max_concurrent,
        *(getattr(limits, BUDGET_FIELDS[p]) for p in PERIODS),
    ]
    return ",".join([who, *(str(_limit(v)) for v in values)])


def budgeted(rules: tuple[ModelRule, ...]) -> bool:
    """Whether any model rule has a budget (its counters must exist before a reservation)."""
    return any(
        getattr(limits, field) is not None
        for rule in rules
        for _, limits in rule.scopes()
        for field in BUDGET_FIELDS.values()
    )


def _model_budget_specs(scope: Scope) -> list[tuple[Literal["key", "tenant"], str, str]]:
    """(scope, period, pattern) of every limited budget of the key's model rules, whatever the model
    (the admission checks they exist)."""
    specs: list[tuple[Literal["key", "tenant"], str, str]] = []
    for rule in scope.rules:
        for who, limits in rule.scopes():
            for period in PERIODS:
                if getattr(limits, BUDGET_FIELDS[period]) is not None:
                    specs.append((who, period, rule.pattern))
    return specs


# A stream_proxy re-registers a tenant at most this often; the sweeper unlists a tenant only when
# its registration is older than TENANT_KEEP_MS (far longer, so skipped refreshes never unlist it).
TENANT_REFRESH_SECONDS = 10.0
TENANT_KEEP_MS = 120_000


@attrs.define
class LimitScripts:
    """The registered scripts of one Redis client."""

    redis: coredis.Redis[bytes]
    keys: RedisKeys
    _admit: Any = attrs.field(init=False)
    _reserve: Any = attrs.field(init=False)
    _settle: Any = attrs.field(init=False)
    _lease: Any = attrs.field(init=False)
    _tenants: Any = attrs.field(init=False)
    _rebuild: Any = attrs.field(init=False)
    _names: dict[tuple[int, str, str, Any, Any], tuple[str, ...]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._admit = self.redis.register_script(_lua("admit"))
        self._reserve = self.redis.register_script(_lua("reserve"))
        self._settle = self.redis.register_script(_lua("settle"))
        self._lease = self.redis.register_script(_lua("lease"))
        self._tenants = self.redis.register_script(_lua("tenants"))
        self._rebuild = self.redis.register_script(_lua("rebuild"))

    def budget_key(self, scope: Scope, who: str, period: str) -> str:
        """The Redis counter of one budget period."""
        name = scope.key_scope if who == "key" else "t"
        return self.keys.budget(scope.tenant_id, name, period, scope.periods.name(period))  # type: ignore[arg-type]

    def _model_keys(self, scope: Scope, pattern: str, who: str) -> tuple[str, ...]:
        """rpm, tpm, leases and the three budget counters of a rule's scope, in the script's order
        (remembered: the same few are named on every request of a key)."""
        name = scope.key_scope if who == "key" else "t"
        return self._remembered(
            (scope.tenant_id, name, pattern, scope.periods.day, scope.periods.month),
            lambda: (
                self.model_key(scope, pattern, who, "rpm"),
                self.model_key(scope, pattern, who, "tpm"),
                self.model_key(scope, pattern, who, "leases"),
                *(self.model_budget_key(scope, pattern, who, period) for period in PERIODS),
            ),
        )

    def _remembered(
        self, at: tuple[int, str, str, Any, Any], make: Callable[[], tuple[str, ...]]
    ) -> tuple[str, ...]:
        """Key names made once per scope and periods (at most 4096 remembered)."""
        found = self._names.get(at)
        if found is None:
            if len(self._names) >= 4096:
                self._names.clear()
            found = self._names[at] = make()
        return found

    def model_key(self, scope: Scope, pattern: str, who: str, kind: str) -> str:
        """A model rule's rpm / tpm / leases state for a scope."""
        name = scope.key_scope if who == "key" else "t"
        return self.keys.model(scope.tenant_id, model_limits.digest(pattern), kind, name)

    def model_budget_key(self, scope: Scope, pattern: str, who: str, period: str) -> str:
        """A model rule's counter of one budget period for a scope."""
        name = scope.key_scope if who == "key" else "t"
        start = scope.periods.name(period)  # type: ignore[arg-type]
        return self.keys.model_budget(scope.tenant_id, model_limits.digest(pattern), name, period, start)

    def _budget_keys(self, scope: Scope) -> list[str]:
        """The six budget counters of a scope, in the scripts' order (remembered, as _model_keys)."""
        at = (scope.tenant_id, scope.key_scope, "\0budgets", scope.periods.day, scope.periods.month)
        found = self._remembered(
            at,
            lambda: tuple(self.budget_key(scope, w, period) for w in ("key", "tenant") for period in PERIODS),
        )
        return list(found)

    def _missing(
        self, reply: list[Any], specs: list[tuple[Literal["key", "tenant"], str, str | None]], first: int
    ) -> NeedsHydration:
        return NeedsHydration(tuple(specs[int(i) - first] for i in reply[1:]))

    async def admit(
        self,
        scope: Scope,
        request_id: str,
        *,
        metered: bool,
        lease_ttl_ms: int,
        now_ms: int | None = None,
    ) -> Admitted | Refused | NeedsHydration:
        """The admission decision for one request (idempotent per request id)."""
        t, k = scope.tenant_id, scope.key_scope
        keys = [
            self.keys.decision(t, request_id),
            self.keys.rpm(t, k),
            self.keys.rpm(t, "t"),
            self.keys.tpm(t, k),
            self.keys.tpm(t, "t"),
            self.keys.leases(t, k),
            self.keys.leases(t, "t"),
            *self._budget_keys(scope),
            *(self.model_budget_key(scope, p, who, period) for who, period, p in _model_budget_specs(scope)),
        ]
        kl, tl = scope.key_limits, scope.tenant_limits
        args = [
            "" if now_ms is None else now_ms,
            request_id,
            1 if metered else 0,
            lease_ttl_ms,
            _limit(kl.rpm),
            _limit(tl.rpm),
            _limit(kl.tpm),
            _limit(tl.tpm),
            _limit(kl.max_concurrent),
            _limit(tl.max_concurrent),
            *(limit for _, _, limit in _budget_specs(scope)),
            DECISION_TTL_MS,
        ]
        reply = await self._admit(keys=keys, args=args)
        code = int(reply[0])
        if code == 2:
            specs = [(who, period, None) for who, period, _ in _budget_specs(scope)]
            return self._missing(reply, [*specs, *_model_budget_specs(scope)], 8)
        if code == 0:
            return Refused(_text(reply[1]), int(reply[2]), _text(reply[3]))  # type: ignore[arg-type]
        lim_req, rem_req, reset_req, lim_tok, rem_tok, reset_tok = (int(v) for v in reply[1:7])
        return Admitted(
            RateInfo(
                limit_requests=None if lim_req < 0 else lim_req,
                remaining_requests=None if lim_req < 0 else max(0, rem_req),
                reset_requests=None if lim_req < 0 else reset_req / 1000,
                limit_tokens=None if lim_tok < 0 else lim_tok,
                remaining_tokens=None if lim_tok < 0 else max(0, rem_tok),
                reset_tokens=None if lim_tok < 0 else reset_tok / 1000,
            ),
            second=int(reply[7]) if len(reply) > 7 else None,
        )

    async def reserve(
        self,
        scope: Scope,
        request_id: str,
        *,
        metered: bool,
        prompt_bound: int,
        requested_completion: int | None,
        default_completion: int | None,
        lease_ttl_ms: int,
        admitted_second: int | None = None,
        now_ms: int | None = None,
    ) -> Reserved | Spent | Refused | NeedsHydration:
        """Spend the grant and, for metered requests, decide the model rules covering `scope.model`
        and reserve prompt bound + completion limit; a refusal gives back the request the admission
        counted in `admitted_second`."""
        t, k = scope.tenant_id, scope.key_scope
        models = scope.model_scopes() if metered else []
        keys = [
            self.keys.grant_spent(t, request_id),
            self.keys.tpm(t, k),
            self.keys.tpm(t, "t"),
            *self._budget_keys(scope),
            self.keys.reservation(t, request_id),
            self.keys.reservation_index(t),
            self.keys.rpm(t, k),
            self.keys.rpm(t, "t"),
        ]
        model_args: list[Any] = []
        for rule, who, limits in models:
            keys += self._model_keys(scope, rule.pattern, who)
            model_args.append(_packed(who, limits))
        args = [
            "" if now_ms is None else now_ms,
            request_id,
            1 if metered else 0,
            prompt_bound,
            NO_LIMIT if requested_completion is None else requested_completion,
            NO_LIMIT if default_completion is None else default_completion,
            _limit(scope.key_limits.tpm),
            _limit(scope.tenant_limits.tpm),
            *(limit for _, _, limit in _budget_specs(scope)),
            GRANT_MARKER_TTL_MS,
            lease_ttl_ms,
            scope.key_id,
            scope.periods.name("day"),
            scope.periods.name("month"),
            NO_LIMIT if admitted_second is None else admitted_second,
            "" if scope.model is None else qualified(scope.model),
            len(models),
            *model_args,
        ]
        reply = await self._reserve(keys=keys, args=args)
        code = int(reply[0])
        if code == 2:
            specs: list[tuple[Literal["key", "tenant"], str, str | None]] = [
                (who, period, None) for who, period, _ in _budget_specs(scope)
            ]
            specs += [("key", "", None)] * 4  # KEYS 10..13: no budget counters
            for rule, who, _ in models:
                specs += [(who, "", None)] * 3 + [(who, period, rule.pattern) for period in PERIODS]
            return self._missing(reply, specs, 4)
        if code == 0:
            if _text(reply[1]) == "used":
                return Spent()
            if len(reply) > 4:
                rule = models[int(reply[4]) - 1][0]
                return Refused(
                    _text(reply[1]),
                    int(reply[2]),
                    _text(reply[3]),  # type: ignore[arg-type]
                    model=rule.pattern,
                    limit=int(reply[5]),
                    used=int(reply[6]),
                )
            return Refused(_text(reply[1]), int(reply[2]), _text(reply[3]))  # type: ignore[arg-type]
        completion = int(reply[1])
        return Reserved(completion_limit=None if completion < 0 else completion, reserved=int(reply[2]))

    def _settle_call(
        self, scope: Scope, request_id: str, actual_tokens: int | None, ledgered: bool
    ) -> tuple[list[str], list[Any]]:
        t, k = scope.tenant_id, scope.key_scope
        names = scope.periods.names()
        keys = [
            self.keys.reservation(t, request_id),
            self.keys.settled(t, request_id),
            self.keys.reservation_index(t),
            self.keys.tpm(t, k),
            self.keys.tpm(t, "t"),
            *self._budget_keys(scope),
            self.keys.leases(t, k),
            self.keys.leases(t, "t"),
            self.keys.unledgered(t),
            self.keys.hydrate_lock(t),
        ]
        args = [
            "" if actual_tokens is None else actual_tokens,
            request_id,
            MARKER_TTL_MS,
            1 if ledgered else 0,
            scope.key_id,
            names["day"],
            names["month"],
            "" if scope.model is None else qualified(scope.model),
        ]
        return keys, args

    async def settle(
        self, scope: Scope, request_id: str, actual_tokens: int | None, *, ledgered: bool = True
    ) -> bool:
        """Replace the reservation with the actual tokens (None: charge it as reserved); `ledgered`
        when Postgres already has the request (the accountant). True when applied now; while the
        tenant's counters are being rebuilt a ledgered settle waits (at most LOCK_WAIT_S)."""
        keys, args = self._settle_call(scope, request_id, actual_tokens, ledgered)
        deadline = time.monotonic() + LOCK_WAIT_S
        while (result := int(await self._settle(keys=keys, args=args))) < 0:
            if time.monotonic() >= deadline:
                raise CountersBusy("a settle held off by a counter rebuild")
            await asyncio.sleep(LOCK_POLL_S)
        return result == 1

    def settle_in(
        self, pipe: Any, scope: Scope, request_id: str, actual_tokens: int | None, *, ledgered: bool
    ) -> Callable[[], Awaitable[int]]:
        """Queue a settle on a pipeline; returns what reads its outcome once the pipeline ran:
        1 applied now, 0 already settled, -1 (ledgered only) the counters are being rebuilt.

        EVALSHA directly: a script object on a pipeline costs a SCRIPT EXISTS round trip every
        time. If Redis lost its script cache, the outcome is read by loading the script again.
        """
        keys, args = self._settle_call(scope, request_id, actual_tokens, ledgered)
        pending = pipe.evalsha(self._settle.sha, keys, args)

        async def outcome() -> int:
            try:
                return int(await pending)
            except coredis.exceptions.NoScriptError:
                return int(await self._settle(keys=keys, args=args))

        return outcome

    async def settle_many(
        self, items: Sequence[tuple[Scope, str, int | None]], *, ledgered: bool = True
    ) -> int:
        """Settle many requests in one pipelined round trip (each call is still its own script, so
        Redis Cluster routing is per tenant slot); returns how many were applied now. Settles held
        off by a rebuild of their tenant's counters are sent again until LOCK_WAIT_S has passed,
        then CountersBusy is raised (the accountant leaves the events pending and settles them
        when it claims them again)."""
        waiting = list(items)
        applied = 0
        deadline = time.monotonic() + LOCK_WAIT_S
        while waiting:
            async with self.redis.pipeline(transaction=False, raise_on_error=False) as pipe:
                outcomes = [
                    self.settle_in(pipe, scope, rid, tokens, ledgered=ledgered)
                    for scope, rid, tokens in waiting
                ]
            held: list[tuple[Scope, str, int | None]] = []
            for item, outcome in zip(waiting, outcomes, strict=True):
                result = await outcome()
                if result < 0:
                    held.append(item)
                else:
                    applied += result
            waiting = held
            if waiting:
                if time.monotonic() >= deadline:
                    raise CountersBusy(f"{len(waiting)} settles held off by a counter rebuild")
                await asyncio.sleep(LOCK_POLL_S)
        return applied

    async def rebuild_counters(self, keys: list[str], token: str, plan: bytes) -> int | None:
        """Run shared/lua/rebuild.lua: counters written, or None when the lock `token` was lost."""
        reply = await self._rebuild(keys=keys, args=["", token, plan])
        return int(reply[1]) if int(reply[0]) == 1 else None

    async def lease(
        self,
        scope: Scope,
        request_id: str,
        *,
        action: Literal["renew", "release"],
        ttl_ms: int,
        now_ms: int | None = None,
    ) -> int:
        """Renew a live stream's lease, or release it once the usage event is written."""
        t, k = scope.tenant_id, scope.key_scope
        keys = [
            self.keys.leases(t, k),
            self.keys.leases(t, "t"),
            self.keys.reservation(t, request_id),
            self.keys.reservation_index(t),
        ]
        ttl = SETTLE_GRACE_MS if action == "release" else ttl_ms
        reply = await self._lease(keys=keys, args=["" if now_ms is None else now_ms, request_id, action, ttl])
        return int(reply)

    async def register_tenant(self, tenant_id: int, *, now_ms: int | None = None) -> None:
        """List a tenant where the expired-lease sweeper looks (refresh at most every
        TENANT_REFRESH_SECONDS; the sweeper keeps a registration TENANT_KEEP_MS)."""
        await self._tenants(
            keys=[self.keys.reserving_tenants], args=["" if now_ms is None else now_ms, tenant_id, "register"]
        )

    async def reserving_tenants(self) -> list[int]:
        """The tenants that may hold open reservations."""
        return [int(member) for member in await self.redis.zrange(self.keys.reserving_tenants, 0, -1)]

    async def forget_tenant(self, tenant_id: int, *, now_ms: int | None = None) -> bool:
        """Unlist a tenant whose reservation index was seen empty, unless registered lately."""
        reply = await self._tenants(
            keys=[self.keys.reserving_tenants],
            args=["" if now_ms is None else now_ms, tenant_id, "forget", TENANT_KEEP_MS],
        )
        return bool(int(reply))

    async def now_ms(self) -> int:
        """Redis TIME in milliseconds (one clock for every replica; works on a cluster too)."""
        return int(await self._tenants(keys=[self.keys.reserving_tenants], args=["", 0, "now"]))
