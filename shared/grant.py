"""The grant: the sidecar's signed, short-lived, single-use permission for one request.

Wire form: `v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256)>`. The signature covers the
version and the claims. Verification tries the current secret, then the previous one, so the
signing secret can be rotated without downtime. Single use is enforced by stream_proxy in Redis
(a grant id can be spent once); this module checks signature, expiry, method and path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import attrs
import cattrs
import orjson

from shared.models import Limits, ModelRule

VERSION = "v1"
MAX_TTL = 60.0
CLOCK_SLACK = 5.0


class GrantError(Exception):
    """The grant is missing, forged, expired or for another request; the message is safe to show."""


@attrs.frozen
class RateInfo:
    """Values stream_proxy writes as `x-ratelimit-*` headers on the response."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


@attrs.frozen
class Grant:
    """What the sidecar decided, bound to one request."""

    request_id: str
    tenant_id: int
    key_id: int
    key_prefix: str
    method: str
    path: str
    expires_at: float  # unix seconds
    lease: str | None = None  # concurrency lease id (the request id) when a stream slot was taken
    allowed_models: tuple[str, ...] | None = None  # None: every model
    max_body_bytes: int | None = None
    max_num_ctx: int | None = None
    max_keep_alive_seconds: int | None = None
    prompt_logging: bool = False
    prompt_log_ttl_seconds: int | None = None
    allow_templates: bool = False  # /api/generate's template and _debug_render_only allowed
    allow_reload_options: bool = False  # num_gpu & co. (which reload a shared model) allowed
    key_limits: Limits = attrs.Factory(Limits)
    tenant_limits: Limits = attrs.Factory(Limits)
    rate: RateInfo = attrs.Factory(RateInfo)
    client_addr: str | None = None
    metered: bool = False  # a token-consuming route: a lease was taken, a reservation follows
    periods: dict[str, str] | None = None  # budget period names in force at admission
    model_rules: tuple[ModelRule, ...] = ()  # the key's model rules, decided by the reservation
    admitted_second: int | None = None  # the RPM bucket the admission counted the request in
    rollovers: dict[str, float] | None = None  # unix times the day and month periods end


_wire = cattrs.Converter(omit_if_default=True)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()


def sign(grant: Grant, secret: str) -> str:
    """Serialise and sign a grant with the current secret."""
    claims = _b64(orjson.dumps(_wire.unstructure(grant)))
    signed = f"{VERSION}.{claims}".encode("ascii")
    return f"{VERSION}.{claims}.{_b64(_mac(secret, signed))}"


def verify(
    token: str | None,
    *,
    secrets: tuple[str, ...],
    method: str,
    path: str,
    now: float,
) -> Grant:
    """Check signature (any of `secrets`), expiry and the request it was issued for."""
    if not token:
        raise GrantError("missing grant")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise GrantError("malformed grant")
    # Compare the signature as text: base64 has more than one spelling of the same bytes, and a
    # grant must have exactly one.
    given = parts[2].encode("ascii", "replace")
    signed = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
    if not any(hmac.compare_digest(_b64(_mac(s, signed)).encode("ascii"), given) for s in secrets if s):
        raise GrantError("invalid grant signature")
    try:
        grant = _wire.structure(orjson.loads(_unb64(parts[1])), Grant)
    except (ValueError, cattrs.BaseValidationError, TypeError):
        raise GrantError("malformed grant") from None
    # A few seconds of slack above MAX_TTL for clock differences between sidecar and proxy hosts.
    if grant.expires_at <= now or grant.expires_at > now + MAX_TTL + CLOCK_SLACK:
        raise GrantError("expired grant")
    if grant.method != method or grant.path != path:
        raise GrantError("grant is for another request")
    return grant
