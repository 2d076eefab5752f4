"""Which key a request presents to the sidecar: `Authorization: Bearer` everywhere, `x-api-key` (the
Anthropic SDK's default) only under /v1/messages; one header of each kind, and the same key when both
are sent (docs/DECISIONS.md)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from authz_sidecar.authz import presented_key
from shared import keys
from shared.exceptions import KeyFormatError

KEY = keys.generate_key().token
OTHER = keys.generate_key().token
MESSAGES = "/v1/messages"


def _request(*headers: tuple[str, str]) -> web.Request:
    return make_mocked_request("GET", "/authz", headers=CIMultiDict(headers))


@pytest.mark.parametrize("uri", [MESSAGES, "/v1/messages?beta=true", "/api/chat", "/v1/chat/completions"])
def test_bearer_works_everywhere(uri: str) -> None:
    """A Bearer key is read on every route."""
    assert presented_key(_request(("Authorization", f"Bearer {KEY}")), uri).token == KEY


@pytest.mark.parametrize("name", ["x-api-key", "X-Api-Key", "X-API-KEY"])
def test_x_api_key_works_on_anthropic_routes(name: str) -> None:
    """x-api-key (any case) carries the key on /v1/messages, as the Anthropic SDK sends it."""
    assert presented_key(_request((name, KEY)), MESSAGES).token == KEY
    assert presented_key(_request((name, f"  {KEY} ")), MESSAGES).token == KEY


@pytest.mark.parametrize("uri", ["/api/chat", "/v1/chat/completions", "/v1/responses"])
def test_x_api_key_is_not_a_credential_elsewhere(uri: str) -> None:
    """Off the Anthropic routes x-api-key is not read: without Authorization the key is missing."""
    with pytest.raises(KeyFormatError, match="missing"):
        presented_key(_request(("x-api-key", KEY)), uri)


def test_both_headers_with_the_same_key_are_accepted() -> None:
    """Claude Code may send both; the same key in both is fine."""
    request = _request(("Authorization", f"Bearer {KEY}"), ("x-api-key", KEY))
    assert presented_key(request, MESSAGES).token == KEY


def test_two_different_keys_are_refused() -> None:
    """Bearer one key, x-api-key another: refused, whichever is valid."""
    request = _request(("Authorization", f"Bearer {KEY}"), ("x-api-key", OTHER))
    with pytest.raises(KeyFormatError, match="different"):
        presented_key(request, MESSAGES)


@pytest.mark.parametrize(
    "headers",
    [
        (("x-api-key", KEY), ("x-api-key", KEY)),
        (("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")),
    ],
)
def test_repeated_headers_are_refused(headers: tuple[tuple[str, str], ...]) -> None:
    """Two headers of one kind are refused (a proxy and the service may read different ones)."""
    with pytest.raises(KeyFormatError, match="exactly one"):
        presented_key(_request(*headers), MESSAGES)


@pytest.mark.parametrize(
    "value", ["", "nz_short", f"Bearer {KEY}", KEY[:-1] + ("A" if KEY[-1] != "A" else "B")]
)
def test_malformed_x_api_key_is_refused_before_any_lookup(value: str) -> None:
    """A malformed or bad-checksum x-api-key fails the format check (no Postgres, no Argon2)."""
    with pytest.raises(KeyFormatError):
        presented_key(_request(("x-api-key", value)), MESSAGES)
