"""Every allow and deny path through the real Caddy: status, dialect, headers, the official
clients' exceptions, blocked routes in raw spellings, spoofed grant headers, and direct hits on
stream_proxy with missing, forged, expired, misrouted and replayed grants.

Deliberately failing authentications are kept few (about a dozen): the sidecar allows 60 per client
address per minute and every e2e request comes from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import attrs
import ollama
import openai
import pytest
from multidict import CIMultiDict
from yarl import URL

from shared import admin, keys
from shared import grant as grants
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, forged_key, ollama_client, openai_client

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Say hi"}], "stream": False}
OLLAMA_JSON = "application/json; charset=utf-8"
OPENAI_JSON = "application/json"
BLOCKED_WORDS = (
    "pull",
    "push",
    "create",
    "copy",
    "delete",
    "blobs",
    "/me",
    "signout",
    "user",
    "experimental",
)

Reply = tuple[int, CIMultiDict[str], bytes]


async def _ask(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    key: str | None = None,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request with an exact (not normalised) URL; returns status, headers and body."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with http.request(method, URL(url, encoded=True), json=body, headers=sent) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _raw(base_url: str, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> int:
    """Send one request with a byte-exact request target over a plain socket; return the status."""
    url = URL(base_url)
    assert url.host is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host}:{url.port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "PUT", "PATCH", "DELETE"):
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
        await writer.wait_closed()
    parts = status_line.decode("latin-1").split(" ", 2)
    assert parts[0].startswith("HTTP/1."), status_line
    return int(parts[1])


def _ollama_error(status: int, headers: CIMultiDict[str], body: bytes, message: str | None = None) -> str:
    """Assert the Ollama error shape `{"error": "<text>"}` (and its content type); return the text."""
    assert headers.get("Content-Type") == OLLAMA_JSON, (status, headers, body)
    document = json.loads(body)
    assert isinstance(document, dict)
    assert set(document) == {"error"}, body
    assert isinstance(document["error"], str)
    assert document["error"]
    if message is not None:
        assert body == json.dumps({"error": message}, separators=(",", ":")).encode()
    return document["error"]


def _openai_error(
    status: int, headers: CIMultiDict[str], body: bytes, *, err_type: str, code: str | None
) -> dict[str, Any]:
    """Assert the OpenAI error shape (four fields, newline-terminated, content type); return it."""
    assert headers.get("Content-Type") == OPENAI_JSON, (status, headers, body)
    assert body.endswith(b"}\n"), body
    document = json.loads(body)
    assert set(document) == {"error"}, body
    error: dict[str, Any] = document["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str)
    assert error["message"]
    assert (error["type"], error["param"], error["code"]) == (err_type, None, code), body
    return error


def _assert_401(reply: Reply, dialect: str, message: str) -> None:
    status, headers, body = reply
    assert status == 401, (status, body)
    assert headers["WWW-Authenticate"].startswith("Bearer"), headers
    if dialect == "ollama":
        _ollama_error(status, headers, body, message)
    else:
        error = _openai_error(status, headers, body, err_type="authentication_error", code="invalid_api_key")
        assert error["message"] == message


async def _leaked(simulator: SimulatorControl) -> list[dict[str, Any]]:
    """Recorded requests whose path names a blocked route."""
    return [r for r in await simulator.requests() if any(word in r["path"].lower() for word in BLOCKED_WORDS)]


# ---------------------------------------------------------------------------------------------
# Key denials


async def test_missing_and_malformed_keys_are_401_in_both_dialects(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """No key, a non-Bearer scheme, a non-key token and a key with a bad checksum are 401 with
    WWW-Authenticate, code invalid_api_key under /v1, and nothing reaches the simulator."""
    gw = stack.gateway_url
    _assert_401(await _ask(http, "POST", f"{gw}/api/chat", body=CHAT), "ollama", "missing API key")
    _assert_401(await _ask(http, "POST", f"{gw}/v1/chat/completions", body=CHAT), "openai", "missing API key")
    real = await make_key()
    bad_checksum = real[:-1] + ("A" if real[-1] != "A" else "B")
    _assert_401(
        await _ask(http, "POST", f"{gw}/api/chat", key=bad_checksum, body=CHAT), "ollama", "malformed API key"
    )
    _assert_401(
        await _ask(http, "GET", f"{gw}/v1/models", key="sk-not-a-gateway-key"), "openai", "malformed API key"
    )
    _assert_401(
        await _ask(http, "GET", f"{gw}/api/tags", headers={"Authorization": f"Basic {real}"}),
        "ollama",
        "malformed Authorization header",
    )
    assert await simulator.requests() == []


async def test_unknown_prefix_and_wrong_secret_are_401(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A well-formed key whose prefix is unknown, and one with a real prefix but another secret
    (valid checksum, so it reaches the Argon2 check), are both 401 `invalid API key`."""
    gw = stack.gateway_url
    unknown = forged_key("".join(secrets.choice(keys.ALPHABET) for _ in range(keys.PREFIX_LEN)))
    keys.parse_key(unknown)  # well-formed: the refusal must come from the lookup
    _assert_401(
        await _ask(http, "POST", f"{gw}/api/chat", key=unknown, body=CHAT), "ollama", "invalid API key"
    )
    real = await make_key()
    wrong_secret = forged_key(keys.parse_key(real).prefix)
    assert wrong_secret != real
    _assert_401(
        await _ask(http, "POST", f"{gw}/v1/chat/completions", key=wrong_secret, body=CHAT),
        "openai",
        "invalid API key",
    )
    # the real key itself still works: the failure above did not poison its prefix
    status, _, _ = await _ask(http, "POST", f"{gw}/api/chat", key=real, body=CHAT)
    assert status == 200
    assert [r["path"] for r in await simulator.requests()] == ["/api/chat"]


async def test_revoked_key_is_401(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A key revoked with the admin core (before any use, so nothing is cached) is 401
    `API key revoked` in both dialects."""
    token = await make_key()
    await admin.revoke_key(stack_db, prefix=keys.parse_key(token).prefix)
    gw = stack.gateway_url
    _assert_401(await _ask(http, "POST", f"{gw}/api/chat", key=token, body=CHAT), "ollama", "API key revoked")
    _assert_401(await _ask(http, "GET", f"{gw}/v1/models", key=token), "openai", "API key revoked")
    assert await simulator.requests() == []


async def test_expired_key_is_401(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A key whose expires_at is in the past (set before its first use) is 401 `API key expired`."""
    token = await make_key()
    await stack_db.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE prefix = $1",
        keys.parse_key(token).prefix,
    )
    gw = stack.gateway_url
    _assert_401(await _ask(http, "POST", f"{gw}/api/chat", key=token, body=CHAT), "ollama", "API key expired")
    _assert_401(
        await _ask(http, "POST", f"{gw}/v1/chat/completions", key=token, body=CHAT),
        "openai",
        "API key expired",
    )
    assert await simulator.requests() == []


async def test_suspended_tenant_is_403(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A key of a suspended tenant is 403 `tenant suspended` (code tenant_suspended under /v1),
    without WWW-Authenticate."""
    tenant = f"susp-{uuid.uuid4().hex[:8]}"
    token = await make_key(tenant=tenant)
    await admin.set_tenant_status(stack_db, name=tenant, status="suspended")
    gw = stack.gateway_url
    status, headers, body = await _ask(http, "POST", f"{gw}/api/chat", key=token, body=CHAT)
    assert status == 403
    assert "WWW-Authenticate" not in headers
    _ollama_error(status, headers, body, "tenant suspended")
    status, headers, body = await _ask(http, "GET", f"{gw}/v1/models", key=token)
    assert status == 403
    error = _openai_error(status, headers, body, err_type="permission_error", code="tenant_suspended")
    assert error["message"] == "tenant suspended"
    assert await simulator.requests() == []


# ---------------------------------------------------------------------------------------------
# Policy denials (decided before the key: a valid key changes nothing)


@pytest.mark.parametrize(
    ("method", "path", "status", "message", "allow"),
    [
        ("POST", "/api/pull", 403, "this endpoint is disabled on this gateway", None),
        ("DELETE", "/api/delete", 403, "this endpoint is disabled on this gateway", None),
        ("HEAD", "/api/blobs/sha256:abc", 403, None, None),
        ("POST", "/api//chat", 400, "ambiguous request path", None),
        ("POST", "/API/chat", 400, "ambiguous request path", None),
        ("POST", "/api/nope", 404, "not found", None),
        ("GET", "/api/status", 404, "not found", None),
        ("GET", "/api/chat", 405, "method not allowed", "POST"),
        ("DELETE", "/api/tags", 405, "method not allowed", None),
    ],
)
async def test_policy_denials_under_api_are_ollama_shaped(
    *,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    method: str,
    path: str,
    status: int,
    message: str | None,
    allow: str | None,
) -> None:
    """Blocked (403), ambiguous (400), unknown (404) and wrong-method (405 + Allow) requests under
    /api are refused in the Ollama dialect even with a valid key, and never reach the simulator."""
    key = await make_key()
    body = CHAT if method in ("POST", "DELETE") else None
    got, headers, data = await _ask(http, method, f"{stack.gateway_url}{path}", key=key, body=body)
    assert got == status, (got, data)
    if method != "HEAD":
        _ollama_error(got, headers, data, message)
    if status == 405:
        allowed = {m.strip() for m in headers["Allow"].split(",")}
        assert allowed == ({allow} if allow else {"GET", "HEAD"})
    else:
        assert "Allow" not in headers
    assert "WWW-Authenticate" not in headers
    assert await simulator.requests() == []


@pytest.mark.parametrize(
    ("method", "path", "status", "err_type", "allow"),
    [
        ("POST", "/v1//chat/completions", 400, "invalid_request_error", None),
        ("GET", "/v1/models/a%2Fb", 400, "invalid_request_error", None),
        ("POST", "/v1/audio/transcriptions", 404, "not_found_error", None),
        ("GET", "/v1/nope", 404, "not_found_error", None),
        ("POST", "/v1/models", 405, "api_error", "GET"),
        ("GET", "/v1/chat/completions", 405, "api_error", "POST"),
        ("GET", "/v1/models/../../api/pull", 403, "permission_error", None),
    ],
)
async def test_policy_denials_under_v1_are_openai_shaped(
    *,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    method: str,
    path: str,
    status: int,
    err_type: str,
    allow: str | None,
) -> None:
    """Policy denials under /v1 are in the OpenAI dialect (code null), with Allow on 405."""
    key = await make_key()
    body = CHAT if method == "POST" else None
    got, headers, data = await _ask(http, method, f"{stack.gateway_url}{path}", key=key, body=body)
    assert got == status, (got, data)
    _openai_error(got, headers, data, err_type=err_type, code=None)
    if allow is not None:
        assert headers["Allow"] == allow
    assert await simulator.requests() == []


async def test_method_override_headers_are_400(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A method-override header on a served path is 400 with a valid key; on a blocked path it is
    403; nothing reaches the simulator."""
    key = await make_key()
    gw = stack.gateway_url
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        status, headers, body = await _ask(
            http, "POST", f"{gw}/api/chat", key=key, body=CHAT, headers={name: "DELETE"}
        )
        assert status == 400, (name, body)
        _ollama_error(status, headers, body)
        status, headers, body = await _ask(
            http, "POST", f"{gw}/v1/chat/completions", key=key, body=CHAT, headers={name: "GET"}
        )
        assert status == 400, (name, body)
        _openai_error(status, headers, body, err_type="invalid_request_error", code=None)
        status, _, _ = await _ask(http, "POST", f"{gw}/api/pull", key=key, body=CHAT, headers={name: "GET"})
        assert status == 403
    assert await simulator.requests() == []


async def test_allowed_requests_pass(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With a valid key the allowlisted routes are answered by the simulator through Caddy,
    including HEAD where it is listed and a query string the policy ignores."""
    key = await make_key()
    gw = stack.gateway_url
    for method, path, body in [
        ("POST", "/api/chat", CHAT),
        ("GET", "/api/tags", None),
        ("HEAD", "/api/version", None),
        ("GET", "/api/version?x=1", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
    ]:
        status, _, data = await _ask(http, method, f"{gw}{path}", key=key, body=body)
        assert status == 200, (method, path, data)
    paths = [(r["method"], r["path"]) for r in await simulator.requests()]
    assert paths == [
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
        ("HEAD", "/api/version"),
        ("GET", "/api/version"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ]


# ---------------------------------------------------------------------------------------------
# The blocked set in raw spellings through Caddy, with a valid key

RAW_BLOCKED = (
    ("POST", "/api/pull"),
    ("POST", "//api/pull"),
    ("POST", "/api//pull"),
    ("POST", "/api/./pull"),
    ("POST", "/api/chat/../pull"),
    ("POST", "/api/%70ull"),
    ("POST", "/api/%2570ull"),
    ("POST", "/api%2Fpull"),
    ("POST", "/api%2fpull"),
    ("POST", "/%61pi/pull"),
    ("POST", "/API/PULL"),
    ("POST", "/Api/Pull"),
    ("POST", "/api/pull/"),
    ("POST", "/api/pull?x=1"),
    ("POST", "/api/pull#x"),
    ("POST", "/api\\pull"),
    ("POST", "/api/pull/."),
    ("POST", "/api/pull%2F"),
    ("POST", "/./api/pull"),
    ("POST", "/v1/../api/pull"),
    ("POST", "/api/%2e%2e/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/PUSH/"),
    ("POST", "/api/create"),
    ("POST", "/api/%63reate"),
    ("POST", "/api/copy"),
    ("POST", "/api/x/../copy"),
    ("DELETE", "/api/delete"),
    ("DELETE", "/api/DELETE"),
    ("POST", "/api/blobs/sha256:abc"),
    ("HEAD", "/api/blobs/sha256:abc"),
    ("POST", "/api/BLOBS/x"),
    ("POST", "/api/%62lobs/x"),
    ("POST", "/api/blobs/sha256%3Aabc"),
    ("POST", "/api/me"),
    ("POST", "/api/signout"),
    ("POST", "/api/%2573ignout"),
    ("DELETE", "/api/user/keys/x"),
    ("DELETE", "/api/user%2Fkeys%2Fx"),
    ("POST", "/api/experimental/web_search"),
    ("POST", "/api/experimental/web_fetch"),
    ("GET", "/api/experimental/model-recommendations"),
    ("POST", "/api/EXPERIMENTAL/web_search"),
    ("OPTIONS", "/api/pull"),
    ("GET", "/api/pull"),
    ("PUT", "/api/create"),
)


async def test_blocked_routes_in_raw_spellings_never_reach_ollama(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """Each blocked route, in many raw spellings and methods, sent byte-exact through Caddy with a
    valid key, is refused with 403 or 400 (never 2xx, never 5xx), and the simulator records none
    of them."""
    assert len(RAW_BLOCKED) >= 30
    key = await make_key()
    body = json.dumps({"model": "llama3.2", "name": "llama3.2", "stream": False}).encode()
    statuses: dict[tuple[str, str], int] = {}
    for method, target in RAW_BLOCKED:
        statuses[(method, target)] = await _raw(
            stack.gateway_url, method, target, {"Authorization": f"Bearer {key}"}, body
        )
    wrong = {request: status for request, status in statuses.items() if status not in (400, 403)}
    assert wrong == {}
    # the canonical spellings are refused by the policy itself (403), not by Caddy's parser
    assert statuses[("POST", "/api/pull")] == 403
    assert statuses[("DELETE", "/api/user/keys/x")] == 403
    assert await _leaked(simulator) == []
    assert await simulator.requests() == []


# ---------------------------------------------------------------------------------------------
# Client-sent grant headers


async def test_client_sent_grant_headers_change_nothing(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """Caddy strips client-sent X-Gw-* headers: a bogus grant, or even a correctly signed grant
    for this very request, without a key is still 401; with a valid key and a bogus grant the
    request works normally."""
    gw = stack.gateway_url
    bogus = {"X-Gw-Grant": "v1.e30.AAAA", "X-Gw-Request-Id": "spoofed-request-id"}
    _assert_401(
        await _ask(http, "POST", f"{gw}/api/chat", body=CHAT, headers=bogus), "ollama", "missing API key"
    )
    real_grant = grants.sign(
        grants.Grant(
            request_id=str(uuid.uuid4()),
            tenant_id=1,
            key_id=1,
            key_prefix="AAAAAAAA",
            method="POST",
            path="/api/chat",
            expires_at=time.time() + 30,
        ),
        stack.env["GATEWAY_GRANT_SECRET"],
    )
    _assert_401(
        await _ask(http, "POST", f"{gw}/api/chat", body=CHAT, headers={"X-Gw-Grant": real_grant}),
        "ollama",
        "missing API key",
    )
    assert await simulator.requests() == []
    key = await make_key()
    status, _, data = await _ask(http, "POST", f"{gw}/api/chat", key=key, body=CHAT, headers=bogus)
    assert status == 200, data
    records = await simulator.requests()
    assert [r["path"] for r in records] == ["/api/chat"]
    forwarded = {name.lower() for name, _ in records[0]["headers"]}
    assert not any(name.startswith("x-gw-") for name in forwarded)


# ---------------------------------------------------------------------------------------------
# Direct hits on stream_proxy


def _grant(path: str = "/api/chat", *, method: str = "POST", expires_in: float = 30.0) -> grants.Grant:
    return grants.Grant(
        request_id=str(uuid.uuid4()),
        tenant_id=1,
        key_id=1,
        key_prefix="AAAAAAAA",
        method=method,
        path=path,
        expires_at=time.time() + expires_in,
    )


async def _direct(http: aiohttp.ClientSession, stack: Stack, token: str | None) -> Reply:
    headers = {"X-Gw-Grant": token} if token is not None else {}
    return await _ask(http, "POST", f"{stack.proxy_url}/api/chat", body=CHAT, headers=headers)


async def test_stream_proxy_refuses_bad_grants(
    stack: Stack, http: aiohttp.ClientSession, simulator: SimulatorControl
) -> None:
    """A direct request to stream_proxy with no grant, a grant signed with a wrong secret, an
    expired grant, or a grant for another path or method is 403 in the caller's dialect, and
    none reaches the simulator."""
    secret = stack.env["GATEWAY_GRANT_SECRET"]
    cases = {
        "missing": None,
        "forged": grants.sign(_grant(), secret + "-but-wrong"),
        "expired": grants.sign(_grant(expires_in=-1.0), secret),
        "other path": grants.sign(_grant("/api/generate"), secret),
        "other method": grants.sign(_grant(method="GET"), secret),
        "garbage": "v1.e30.AAAA",
    }
    for name, token in cases.items():
        status, headers, body = await _direct(http, stack, token)
        assert status == 403, (name, body)
        _ollama_error(status, headers, body)
    status, headers, body = await _ask(http, "POST", f"{stack.proxy_url}/v1/chat/completions", body=CHAT)
    assert status == 403
    _openai_error(status, headers, body, err_type="permission_error", code=None)
    assert await simulator.requests() == []


async def test_stream_proxy_refuses_a_replayed_grant(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A correctly signed grant (for a real tenant and key) is good for one request: the first use
    is relayed, the second is 403 `grant already used`, and the simulator sees exactly one request."""
    prefix = keys.parse_key(await make_key()).prefix
    row = await stack_db.fetchrow("SELECT id, tenant_id FROM api_keys WHERE prefix = $1", prefix)
    assert row is not None
    grant = attrs.evolve(_grant(), tenant_id=row["tenant_id"], key_id=row["id"], key_prefix=prefix)
    token = grants.sign(grant, stack.env["GATEWAY_GRANT_SECRET"])
    first, _, first_body = await _direct(http, stack, token)
    assert first == 200, first_body
    status, headers, body = await _direct(http, stack, token)
    assert status == 403, body
    assert "already used" in _ollama_error(status, headers, body)
    assert [r["path"] for r in await simulator.requests()] == ["/api/chat"]


# ---------------------------------------------------------------------------------------------
# The official clients


async def test_openai_client_sees_the_right_exceptions(
    stack: Stack, make_key: KeyFactory, stack_db: asyncpg.Connection, simulator: SimulatorControl
) -> None:
    """The official openai client raises AuthenticationError (401, invalid_api_key) for a bad key,
    PermissionDeniedError (403) for a suspended tenant and NotFoundError (404) for a route the
    gateway does not serve."""
    messages: list[Any] = [{"role": "user", "content": "Say hi"}]
    unknown = forged_key("".join(secrets.choice(keys.ALPHABET) for _ in range(keys.PREFIX_LEN)))
    async with openai_client(stack, unknown) as client:
        with pytest.raises(openai.AuthenticationError) as auth:
            await client.chat.completions.create(model="llama3.2", messages=messages)
    assert auth.value.status_code == 401
    assert auth.value.code == "invalid_api_key"
    assert auth.value.type == "authentication_error"

    tenant = f"susp-{uuid.uuid4().hex[:8]}"
    suspended = await make_key(tenant=tenant)
    await admin.set_tenant_status(stack_db, name=tenant, status="suspended")
    async with openai_client(stack, suspended) as client:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model="llama3.2", messages=messages)
    assert denied.value.status_code == 403

    async with openai_client(stack, await make_key()) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.audio.speech.create(model="llama3.2", voice="alloy", input="Say hi")
    assert missing.value.status_code == 404
    assert missing.value.type == "not_found_error"
    assert await simulator.requests() == []


async def test_openai_client_chat_works(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With a valid key the official openai client completes a chat, streamed and not, and lists
    models."""
    messages: list[Any] = [{"role": "user", "content": "Say hi"}]
    async with openai_client(stack, await make_key()) as client:
        completion = await client.chat.completions.create(model="llama3.2", messages=messages)
        assert completion.choices[0].message.content
        stream = await client.chat.completions.create(model="llama3.2", messages=messages, stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert len(pieces) > 1
        assert "".join(pieces)
        models = await client.models.list()
        assert [m.id async for m in models]
    paths = [r["path"] for r in await simulator.requests()]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/models"]


async def test_ollama_client_sees_401_and_403(
    stack: Stack, make_key: KeyFactory, stack_db: asyncpg.Connection, simulator: SimulatorControl
) -> None:
    """The official ollama client raises ResponseError 401 for a bad key and 403 for a suspended
    tenant on chat, and 403 for pull, push, create, copy and delete with a valid key."""
    messages: list[Any] = [{"role": "user", "content": "Say hi"}]
    bad = forged_key(keys.parse_key(await make_key()).prefix)
    async with ollama_client(stack, bad) as client:
        with pytest.raises(ollama.ResponseError) as unauthorised:
            await client.chat(model="llama3.2", messages=messages)
    assert unauthorised.value.status_code == 401
    assert unauthorised.value.error == "invalid API key"

    tenant = f"susp-{uuid.uuid4().hex[:8]}"
    suspended = await make_key(tenant=tenant)
    await admin.set_tenant_status(stack_db, name=tenant, status="suspended")
    async with ollama_client(stack, suspended) as client:
        with pytest.raises(ollama.ResponseError) as forbidden:
            await client.chat(model="llama3.2", messages=messages)
    assert forbidden.value.status_code == 403

    async with ollama_client(stack, await make_key()) as client:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "pull": lambda: client.pull("llama3.2"),
            "push": lambda: client.push("llama3.2"),
            "create": lambda: client.create(model="mine", from_="llama3.2"),
            "copy": lambda: client.copy("llama3.2", "mine"),
            "delete": lambda: client.delete("llama3.2"),
        }
        for name, call in calls.items():
            with pytest.raises(ollama.ResponseError) as blocked:
                await call()
            assert blocked.value.status_code == 403, name
            assert blocked.value.error == "this endpoint is disabled on this gateway", name
    assert await _leaked(simulator) == []
    assert await simulator.requests() == []


async def test_ollama_client_chat_works(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With a valid key the official ollama client chats, streamed and not, and lists models."""
    messages: list[Any] = [{"role": "user", "content": "Say hi"}]
    async with ollama_client(stack, await make_key()) as client:
        response = await client.chat(model="llama3.2", messages=messages)
        assert response.message.content
        assert response.done
        stream = await client.chat(model="llama3.2", messages=messages, stream=True)
        chunks = [chunk async for chunk in stream]
        assert len(chunks) > 1
        assert chunks[-1].done
        assert "".join(c.message.content or "" for c in chunks)
        listed = await client.list()
        assert listed.models
    paths = [r["path"] for r in await simulator.requests()]
    assert paths == ["/api/chat", "/api/chat", "/api/tags"]


# --- credential guessing, from an address of its own ---------------------------------------------
GUESSER = "127.0.0.3"  # not 127.0.0.1 (every other test) nor 127.0.0.2 (the canary)
SPOOFED_ADDRESSES = {
    "X-Forwarded-For": "1.2.3.4",
    "X-Gateway-Client-IP": "5.6.7.8",
    "X-Gw-Client-Ip": "9.9.9.9",
}


async def _argon2_verifications(http: aiohttp.ClientSession, stack: Stack) -> float:
    """The sidecar's authz_argon2_verifications_total."""
    async with http.get(f"{stack.sidecar_url}/metrics") as resp:
        text = await resp.text()
    (line,) = [line for line in text.splitlines() if line.startswith("authz_argon2_verifications_total ")]
    return float(line.split()[1])


async def test_guessing_one_key_is_cut_off_after_ten_and_the_key_still_works(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """Through Caddy, from one address, with spoofed X-Forwarded-For, X-Gateway-Client-IP and
    X-Gw-Client-Ip on every request: 50 well-formed wrong keys for one real prefix get 401 for the
    first 10 (10 Argon2 verifications) and 429 with Retry-After for the other 40 (no Argon2); the
    real key, used before the flood, still answers 200 afterwards; and every audit row of the flood
    records the address Caddy saw, none a spoofed one."""
    real = await make_key()
    prefix = keys.parse_key(real).prefix
    agent = f"guesser/{uuid.uuid4().hex}"
    sent = {**SPOOFED_ADDRESSES, "User-Agent": agent}
    gw = stack.gateway_url
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(GUESSER, 0))) as guesser:
        status, _, body = await _ask(guesser, "POST", f"{gw}/api/chat", key=real, body=CHAT, headers=sent)
        assert status == 200, body
        before = await _argon2_verifications(http, stack)
        statuses: list[int] = []
        for _ in range(50):
            status, headers, body = await _ask(
                guesser, "POST", f"{gw}/api/chat", key=forged_key(prefix), body=CHAT, headers=sent
            )
            statuses.append(status)
            if status == 429:
                assert 1 <= int(headers["Retry-After"]) <= 60
                assert json.loads(body) == {"error": "too many failed authentications for this API key"}
        assert statuses == [401] * 10 + [429] * 40
        assert await _argon2_verifications(http, stack) == before + 10
        status, _, body = await _ask(guesser, "POST", f"{gw}/api/chat", key=real, body=CHAT, headers=sent)
        assert status == 200, body
    assert [r["path"] for r in await simulator.requests()] == ["/api/chat", "/api/chat"]

    deadline = time.monotonic() + 10
    query = "SELECT client_addr, reason, count FROM audit_log WHERE user_agent = $1"
    while True:
        rows = await stack_db.fetch(query, agent)
        by_reason = {r["reason"]: r for r in rows}
        if {"key_mismatch", "key_guesses"} <= by_reason.keys():
            break
        assert time.monotonic() < deadline, f"audit rows incomplete: {rows}"
        await asyncio.sleep(0.1)
    assert {str(r["client_addr"]) for r in rows} == {GUESSER}
    assert sum(r["count"] for r in rows if r["reason"] == "key_guesses") <= 40
