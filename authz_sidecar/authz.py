"""`GET /authz`, called by Caddy's forward_auth: admission of one request, answered with a grant.

Order (DESIGN.md step 2): endpoint policy, then the key (format and checksum before any I/O,
then cache, then Postgres and Argon2id), then the signed grant. The body never reaches here.
"""

from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from authz_sidecar.exceptions import Denied
from authz_sidecar.keys import Authenticator
from shared import grant as grants
from shared import keys, policy
from shared.config import SidecarConfig
from shared.exceptions import KeyFormatError
from shared.models import KeyContext

log = logging.getLogger("authz_sidecar.authz")

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="neuronetz-gateway"'}
_KEY_REASONS = {
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
    return method.upper(), uri


def method_override(request: web.Request) -> str | None:
    """The first method-override header the client sent, if any."""
    for name in policy.METHOD_OVERRIDE_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            return value
    return None


def client_address(request: web.Request) -> str | None:
    """The client address Caddy saw (Caddy replaces any client-sent X-Forwarded-For)."""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.split(",")[0].strip()[:64]
    return request.remote


async def admit(
    request: web.Request, *, config: SidecarConfig, authenticator: Authenticator
) -> tuple[web.Response, KeyContext]:
    """Decide one forwarded request; raises Denied."""
    method, uri = forwarded_request(request)
    decision = policy.decide(method, uri, method_override(request))
    if not decision.allowed:
        headers = {"Allow": ", ".join(decision.allow)} if decision.allow else None
        raise Denied(decision.status, decision.message, reason=f"policy_{decision.status}", headers=headers)
    try:
        parsed = keys.parse_bearer(request.headers.get("Authorization"))
    except KeyFormatError as exc:
        raise Denied(
            401, str(exc), reason="key_malformed", code="invalid_api_key", headers=UNAUTHORIZED_HEADERS
        ) from None
    verdict = await authenticator.resolve(parsed.token)
    context = verdict.context
    now = authenticator.wall_clock()
    if context is None:
        if verdict.reason == "suspended":
            raise Denied(403, "tenant suspended", reason="tenant_suspended")
        raise Denied(
            401,
            _KEY_REASONS.get(verdict.reason, "invalid API key"),
            reason=f"key_{verdict.reason}",
            code="invalid_api_key",
            headers=UNAUTHORIZED_HEADERS,
        )
    if context.key_expires_at is not None and context.key_expires_at.timestamp() <= now:
        raise Denied(
            401, "API key expired", reason="key_expired", code="invalid_api_key", headers=UNAUTHORIZED_HEADERS
        )
    request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
    path = uri.split("?", 1)[0]
    token = grants.sign(
        grants.Grant(
            request_id=request_id,
            tenant_id=context.tenant_id,
            key_id=context.key_id,
            key_prefix=context.prefix,
            method=method,
            path=path,
            expires_at=now + min(config.options.grant_ttl, grants.MAX_TTL),
            allowed_models=context.allowed_models,
            max_body_bytes=context.max_body_bytes,
            max_num_ctx=context.max_num_ctx,
            max_keep_alive_seconds=context.max_keep_alive_seconds,
            prompt_logging=context.prompt_logging,
            prompt_log_ttl_seconds=context.prompt_log_ttl_seconds,
            key_limits=context.key_limits,
            tenant_limits=context.tenant_limits,
            client_addr=client_address(request),
        ),
        config.grant.current,
    )
    response = web.Response(status=200, headers={"X-Gw-Request-Id": request_id, "X-Gw-Grant": token})
    return response, context


def log_decision(
    request: web.Request, status: int, reason: str, started: float, context: KeyContext | None
) -> None:
    """One structured line per decision: never the key, only its prefix."""
    log.info(
        "authz",
        extra={
            "request_id": request.headers.get("X-Request-Id"),
            "method": request.headers.get("X-Forwarded-Method"),
            "path": (request.headers.get("X-Forwarded-Uri") or "").split("?", 1)[0][:200],
            "status": status,
            "reason": reason,
            "tenant_id": context.tenant_id if context else None,
            "key_prefix": context.prefix if context else None,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )
