"""`GET /authz`, called by Caddy's forward_auth: admission of one request, answered with a grant.

Order (docs/ARCHITECTURE.md#request-path), stopping at the first denial: endpoint policy; the key (format and
checksum before any I/O, then the cache, then one Postgres query and one Argon2id check, with a
failed-authentication limiter per client address and one per key prefix in front of the expensive
part); then the signed grant. The body never reaches the sidecar.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from zoneinfo import ZoneInfo

import attrs
import coredis
from aiohttp import web

from authz_sidecar.audit import Denial, DenialAuditor
from authz_sidecar.budgets import BudgetHydrator, HydrationBusy
from authz_sidecar.exceptions import Denied
from authz_sidecar.keys import Authenticator
from authz_sidecar.limiter import FailedAuthLimiter
from authz_sidecar.metrics import SidecarMetrics
from authz_sidecar.prefix_limiter import PrefixLocked
from shared import grant as grants
from shared import keys, policy
from shared.config import SidecarConfig
from shared.db import DB_ERRORS
from shared.dialect import dialect_of, error_response
from shared.exceptions import KeyFormatError
from shared.keystore import Verdict
from shared.limits import Admitted, LimitScripts, Refused, Scope, budgeted
from shared.models import KeyContext, Limits
from shared.periods import periods_at
from shared.untrusted import printable

log = logging.getLogger("authz_sidecar.authz")

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="neuronetz-gateway"'}
_KEY_MESSAGES = {
    "malformed": "invalid API key",
    "unknown": "invalid API key",
    "mismatch": "invalid API key",
    "revoked": "API key revoked",
    "expired": "API key expired",
}


def forwarded_request(request: web.Request) -> tuple[str, str]:
    """The client's method and raw URI as Caddy forwarded them."""
    method = request.headers.get("X-Forwarded-Method")
    uri = request.headers.get("X-Forwarded-Uri")
    if not method or not uri or not uri.startswith("/"):
        raise Denied(400, "missing forwarded request (call /authz through the gateway)", reason="no_forward")
    return method, uri


def body_encoding(request: web.Request) -> None:
    """Refuse compressed request bodies (Caddy passes the client's Content-Encoding as
    X-Gw-Body-Encoding): neither official client compresses them, native Ollama never decodes
    them, and an unbounded decompression is not worth its risk (docs/DECISIONS.md)."""
    encoding = request.headers.get("X-Gw-Body-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        shown = re.sub(r"[^a-z0-9, _-]", "?", encoding[:40])
        raise Denied(
            415, f"compressed request bodies are not accepted (Content-Encoding: {shown})", reason="encoding"
        )


def method_override(request: web.Request) -> str | None:
    """The first method-override header the client sent, if any."""
    for name in policy.METHOD_OVERRIDE_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            return value
    return None


CLIENT_IP_HEADER = "X-Gw-Client-Ip"


def client_address(request: web.Request) -> str | None:
    """The client address: Caddy's `{client_ip}`, which forward_auth sets as X-Gw-Client-Ip over
    anything a client sent under that name (and `request_header -X-Gw-*` strips client copies
    first). Never X-Forwarded-For: behind a trusted proxy Caddy appends to it, so its left-most
    entry is whatever the client wrote. Without the header (a direct call, not through Caddy) the
    peer address."""
    given = request.headers.get(CLIENT_IP_HEADER, "").strip()
    if given:
        return printable(given, 64)
    return printable(request.remote, 64)


def request_id_of(request: web.Request) -> str | None:
    """Caddy's request id (it replaces any the client sent), made printable all the same."""
    return printable(request.headers.get("X-Request-Id"), 100)


def presented_key(request: web.Request, uri: str) -> keys.ParsedKey:
    """The key the client presented: `Authorization: Bearer nz_…`, or on Anthropic routes also
    `x-api-key: nz_…` (the Anthropic SDK's default). One header of each kind at most, and when
    both are sent they must carry the same key (docs/DECISIONS.md)."""
    bearer = request.headers.getall("Authorization", ())
    if len(bearer) > 1:
        raise KeyFormatError("send exactly one Authorization header")
    api_key = request.headers.getall("x-api-key", ()) if dialect_of(uri) == "anthropic" else ()
    if len(api_key) > 1:
        raise KeyFormatError("send exactly one x-api-key header")
    if not api_key:
        return keys.parse_bearer(bearer[0] if bearer else None)
    from_header = keys.parse_key(api_key[0].strip())
    if bearer and keys.parse_bearer(bearer[0]).token != from_header.token:
        raise KeyFormatError("Authorization and x-api-key carry different API keys")
    return from_header


def _key_denial(verdict: Verdict) -> Denied:
    if verdict.reason == "suspended":
        return Denied(403, "tenant suspended", reason="tenant_suspended", code="tenant_suspended")
    return Denied(
        401,
        _KEY_MESSAGES.get(verdict.reason, "invalid API key"),
        reason=f"key_{verdict.reason}",
        code="invalid_api_key",
        headers=UNAUTHORIZED_HEADERS,
    )


UNAVAILABLE = {"Retry-After": "1"}
UNLIMITED = Limits()
STORE_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)
_BUDGET_NAMES = {"budget_day": "daily", "budget_month": "monthly", "budget_total": "total"}


def _limit_denial(refused: Refused, scope: Scope, zone: ZoneInfo, now: float) -> Denied:
    """429 for a limit: rate_limit_exceeded with the real wait, or insufficient_quota for budgets."""
    if refused.reason.startswith("budget"):
        name = _BUDGET_NAMES.get(refused.reason, "token")
        period = refused.reason.removeprefix("budget_")
        left = scope.periods.seconds_left(period, now, zone) if period in ("day", "month") else None  # type: ignore[arg-type]
        headers = {} if left is None else {"Retry-After": str(max(1, math.ceil(left)))}
        return Denied(
            429,
            f"{refused.scope} {name} token budget exhausted",
            reason=refused.reason,
            code="insufficient_quota",
            headers=headers,
        )
    what = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrency": "concurrent streams"}
    return Denied(
        429,
        f"{refused.scope} limit on {what.get(refused.reason, refused.reason)} reached",
        reason=refused.reason,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(refused.retry_after_ms / 1000)))},
    )


def _rollovers(scope: Scope, zone: ZoneInfo, now: float) -> dict[str, float]:
    """When the day and the month periods end (a model budget's Retry-After, stream_proxy)."""
    ends: dict[str, float] = {}
    for period in ("day", "month"):
        left = scope.periods.seconds_left(period, now, zone)
        if left is not None:
            ends[period] = now + left
    return ends


@attrs.define
class Admission:
    """Everything a decision needs; `handle` is the /authz handler."""

    config: SidecarConfig
    authenticator: Authenticator
    limiter: FailedAuthLimiter
    auditor: DenialAuditor
    metrics: SidecarMetrics
    scripts: LimitScripts
    hydrator: BudgetHydrator
    clock: Callable[[], float] = time.time
    zone: ZoneInfo = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.zone = ZoneInfo(self.config.budget.timezone)

    async def _limits(self, scope: Scope, request_id: str, *, metered: bool) -> Admitted:
        """One admission script call (plus hydration when a budget counter is missing).

        A key and tenant with no limit at all have nothing to count: no Redis call is made (the
        grant is still single use, enforced by stream_proxy's reservation call).
        """
        if scope.key_limits == UNLIMITED and scope.tenant_limits == UNLIMITED and not budgeted(scope.rules):
            return Admitted(grants.RateInfo())
        lease_ms = int(self.config.options.lease_ttl * 1000)
        try:
            for _ in range(50):
                outcome = await self.scripts.admit(scope, request_id, metered=metered, lease_ttl_ms=lease_ms)
                if isinstance(outcome, Admitted):
                    return outcome
                if isinstance(outcome, Refused):
                    raise _limit_denial(outcome, scope, self.zone, self.clock())
                try:
                    await self.hydrator.hydrate(scope, outcome, self.clock())
                except HydrationBusy:
                    continue
                except DB_ERRORS:
                    raise Denied(
                        503, "budget store unavailable", reason="hydration_failed", headers=UNAVAILABLE
                    ) from None
        except STORE_ERRORS:
            self.metrics.redis_errors.inc()
            raise Denied(
                503, "gateway state store unavailable", reason="redis_error", headers=UNAVAILABLE
            ) from None
        raise Denied(503, "budget counters are being rebuilt", reason="hydration_busy", headers=UNAVAILABLE)

    async def _context(self, request: web.Request, address: str | None, uri: str) -> KeyContext:
        try:
            parsed = presented_key(request, uri)
        except KeyFormatError as exc:
            self.limiter.failed(address)
            raise Denied(
                401, str(exc), reason="key_malformed", code="invalid_api_key", headers=UNAUTHORIZED_HEADERS
            ) from None
        verdict = self.authenticator.cached(parsed.token)
        if verdict is None:
            retry = self.limiter.retry_after(address)
            if retry is not None:
                raise Denied(
                    429,
                    "too many failed authentications from this address",
                    reason="auth_failures",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)},
                )
            try:
                verdict = await self.authenticator.resolve(parsed.token)
            except PrefixLocked as locked:
                self.limiter.failed(address)
                raise Denied(
                    429,
                    "too many failed authentications for this API key",
                    reason="key_guesses",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(locked.retry_after)},
                ) from None
            except DB_ERRORS:
                raise Denied(
                    503, "key store unavailable", reason="postgres_error", headers=UNAVAILABLE
                ) from None
        if verdict.context is None:
            if verdict.reason in ("unknown", "mismatch"):
                self.limiter.failed(address)
            raise _key_denial(verdict)
        expires = verdict.context.key_expires_at
        if expires is not None and expires.timestamp() <= self.clock():
            raise _key_denial(Verdict(None, "expired"))
        return verdict.context

    async def _grant(
        self,
        request: web.Request,
        *,
        method: str,
        uri: str,
        route: policy.Route,
        context: KeyContext,
        address: str | None,
    ) -> web.Response:
        request_id = request_id_of(request) or str(uuid.uuid4())
        metered = route in policy.METERED
        scope = Scope(
            tenant_id=context.tenant_id,
            key_id=context.key_id,
            key_limits=context.key_limits,
            tenant_limits=context.tenant_limits,
            periods=periods_at(self.clock(), self.zone),
            rules=context.model_rules,
        )
        admitted = await self._limits(scope, request_id, metered=metered)
        token = grants.sign(
            grants.Grant(
                request_id=request_id,
                tenant_id=context.tenant_id,
                key_id=context.key_id,
                key_prefix=context.prefix,
                method=method,
                path=uri.split("?", 1)[0],
                expires_at=self.clock() + min(self.config.options.grant_ttl, grants.MAX_TTL),
                allowed_models=context.allowed_models,
                max_body_bytes=context.max_body_bytes,
                max_num_ctx=context.max_num_ctx,
                max_keep_alive_seconds=context.max_keep_alive_seconds,
                prompt_logging=context.prompt_logging,
                prompt_log_ttl_seconds=context.prompt_log_ttl_seconds,
                allow_templates=context.allow_templates,
                allow_reload_options=context.allow_reload_options,
                key_limits=context.key_limits,
                tenant_limits=context.tenant_limits,
                client_addr=address,
                rate=admitted.rate,
                metered=metered,
                periods={str(p): name for p, name in scope.periods.names().items()},
                model_rules=context.model_rules,
                admitted_second=admitted.second,
                rollovers=_rollovers(scope, self.zone, self.clock()) if context.model_rules else None,
            ),
            self.config.grant.current,
        )
        return web.Response(status=200, headers={"X-Gw-Request-Id": request_id, "X-Gw-Grant": token})

    async def handle(self, request: web.Request) -> web.Response:
        """Decide one forwarded request."""
        started = time.perf_counter()
        address = client_address(request)
        context: KeyContext | None = None
        try:
            method, uri = forwarded_request(request)
            decision = policy.decide(method, uri, method_override(request))
            if not decision.allowed or decision.route is None:
                allow = {"Allow": ", ".join(decision.allow)} if decision.allow else None
                raise Denied(
                    decision.status, decision.message, reason=f"policy_{decision.status}", headers=allow
                )
            body_encoding(request)
            context = await self._context(request, address, uri)
            response = await self._grant(
                request, method=method, uri=uri, route=decision.route, context=context, address=address
            )
        except Denied as denied:
            self._finish(
                request,
                status=denied.status,
                reason=denied.reason,
                started=started,
                context=context,
                address=address,
            )
            path = request.headers.get("X-Forwarded-Uri", "/")
            return error_response(
                path,
                denied.status,
                denied.message,
                code=denied.code,
                headers=denied.headers,
                request_id=request_id_of(request),
            )
        self._finish(request, status=200, reason="allowed", started=started, context=context, address=address)
        return response

    def _finish(
        self,
        request: web.Request,
        *,
        status: int,
        reason: str,
        started: float,
        context: KeyContext | None,
        address: str | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.decisions.labels("allow" if status == 200 else "deny", reason).inc()
        self.metrics.latency.observe(elapsed)
        # Everything taken from the request is made printable here, at the edge: a byte above 0x7F
        # arrives as a lone surrogate that no log line, audit row or JSON encoder takes.
        path = printable((request.headers.get("X-Forwarded-Uri") or "").split("?", 1)[0], 200)
        method = printable(request.headers.get("X-Forwarded-Method"), 20)
        request_id = request_id_of(request)
        if status != 200:
            self.auditor.record(
                Denial(
                    at=self.clock(),
                    request_id=request_id,
                    status=status,
                    reason=reason,
                    method=method,
                    path=path,
                    client_addr=address,
                    user_agent=printable(request.headers.get("User-Agent") or "", 200) or None,
                    tenant_id=context.tenant_id if context else None,
                    key_id=context.key_id if context else None,
                    key_prefix=context.prefix if context else None,
                )
            )
        (log.info if status != 200 else log.debug)(
            "authz",
            extra={
                "request_id": request_id,
                "method": method,
                "path": path,
                "status": status,
                "reason": reason,
                "tenant_id": context.tenant_id if context else None,
                "key_prefix": context.prefix if context else None,
                "latency_ms": round(elapsed * 1000, 3),
            },
        )
