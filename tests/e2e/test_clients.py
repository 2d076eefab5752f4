"""The gateway's edge as the official SDKs and hostile clients see it, through the real Caddy.

The official `openai` and `ollama` clients work for every endpoint the gateway serves, and every
denial surfaces as the SDK's own error class. Client-sent grant and forwarding headers change
nothing: Caddy strips `X-Gw-*` before forward_auth and sets `X-Forwarded-*` itself, so the sidecar
decides on, meters and audits the real request. Oversized bodies stop at Caddy with 413; a client
that goes away mid-stream cancels the generation; allowed answers carry `x-ratelimit-*`.

Deliberately failing authentications are kept to three (the sidecar allows 60 per client address
per minute and every e2e request comes from 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import ollama
import openai
import pytest
from multidict import CIMultiDict

from shared import admin, keys
from shared import grant as grants
from tests.e2e.conftest import (
    KeyFactory,
    SimulatorControl,
    Stack,
    finished_records,
    forged_key,
    key_ids,
    ollama_client,
    openai_client,
    sent_bytes,
)

pytestmark = pytest.mark.e2e

MODEL = "llama3.2"
EMBED_MODEL = "all-minilm"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hi"}]
CHAT = {"model": MODEL, "messages": MESSAGES, "stream": False}
RATE_HEADERS = tuple(
    f"x-ratelimit-{kind}-{what}"
    for kind in ("limit", "remaining", "reset")
    for what in ("requests", "tokens")
)
# The dev Caddyfile's request_body max_size (10MB, decimal: humanize units).
BODY_LIMIT = 10_000_000
# How long to wait for the accountant to write a ledger or audit row (bounded polling, not timing).
SETTLE_SECONDS = 20.0

Reply = tuple[int, CIMultiDict[str], bytes]


# ---------------------------------------------------------------------------------------------
# Helpers


def _wrong_secret(token: str) -> str:
    """A well-formed key (valid checksum) with a real key's prefix but another secret."""
    forged = forged_key(keys.parse_key(token).prefix)
    keys.parse_key(forged)  # well-formed: the refusal must come from the secret check
    assert forged != token
    return forged


async def _suspended_key(make_key: KeyFactory, stack_db: asyncpg.Connection) -> str:
    tenant = f"susp-{uuid.uuid4().hex[:8]}"
    token = await make_key(tenant=tenant)
    await admin.set_tenant_status(stack_db, name=tenant, status="suspended")
    return token


def _vector(embedding: list[float] | str) -> list[float]:
    """An OpenAI embedding as floats (the SDK asks for base64 float32 unless told otherwise)."""
    if isinstance(embedding, list):
        return embedding
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _header_names(record: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in record["headers"]}


async def _eventually_row(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    """The first row `query` returns, polling until the accountant has written it (a bounded wait
    for an asynchronous writer, not a timing assertion)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        row = await conn.fetchrow(query, *args)
        if row is not None:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no row after {SETTLE_SECONDS}s for {query} {args}")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# The official clients succeed


async def test_openai_client_every_endpoint(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With a valid key the official openai client completes a chat (whole and streamed), a
    completion and an embedding, lists models and retrieves one; the answers are the simulator's."""
    async with openai_client(stack, await make_key()) as client:
        chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        completion = await client.completions.create(model=MODEL, prompt="Why is the sky blue?")
        embedding = await client.embeddings.create(model=EMBED_MODEL, input=["Why?", "Why not?"])
        listed = [model.id async for model in await client.models.list()]
        retrieved = await client.models.retrieve(MODEL)
    records = await simulator.requests()
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", f"/v1/models/{MODEL}"),
    ]
    assert (
        chat.choices[0].message.content
        == json.loads(sent_bytes(records[0]))["choices"][0]["message"]["content"]
    )
    assert chat.choices[0].message.content
    assert len(pieces) > 1
    assert "".join(pieces)
    assert completion.choices[0].text == json.loads(sent_bytes(records[2]))["choices"][0]["text"]
    assert [e.embedding for e in embedding.data] == [
        _vector(e["embedding"]) for e in json.loads(sent_bytes(records[3]))["data"]
    ]
    assert len(embedding.data) == 2
    assert MODEL in {name.split(":")[0] for name in listed}
    assert retrieved.id.split(":")[0] == MODEL


async def test_ollama_client_every_endpoint(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With a valid key the official ollama client chats, generates, embeds, lists and shows; the
    answers are the simulator's."""
    async with ollama_client(stack, await make_key()) as client:
        chat = await client.chat(model=MODEL, messages=MESSAGES)
        generated = await client.generate(model=MODEL, prompt="Why is the sky blue?")
        embedded = await client.embed(model=EMBED_MODEL, input=["Why?", "Why not?"])
        listed = await client.list()
        shown = await client.show(MODEL)
    records = await simulator.requests()
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/embed"),
        ("GET", "/api/tags"),
        ("POST", "/api/show"),
    ]
    assert chat.message.content == json.loads(sent_bytes(records[0]))["message"]["content"]
    assert chat.message.content
    assert generated.response == json.loads(sent_bytes(records[1]))["response"]
    assert [list(v) for v in embedded.embeddings] == json.loads(sent_bytes(records[2]))["embeddings"]
    assert {m.model for m in listed.models} == {
        m["model"] for m in json.loads(sent_bytes(records[3]))["models"]
    }
    assert shown.details is not None
    assert shown.details.family == json.loads(sent_bytes(records[4]))["details"]["family"]


# ---------------------------------------------------------------------------------------------
# Denials raise the SDKs' error classes


async def test_openai_wrong_secret_is_authentication_error(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A well-formed key with a real prefix and a wrong secret raises openai.AuthenticationError
    (401, invalid_api_key) and reaches nothing."""
    async with openai_client(stack, _wrong_secret(await make_key())) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert raised.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await simulator.requests() == []


async def test_openai_suspended_tenant_is_permission_denied(
    stack: Stack, make_key: KeyFactory, stack_db: asyncpg.Connection, simulator: SimulatorControl
) -> None:
    """A key of a suspended tenant raises openai.PermissionDeniedError (403, tenant_suspended)."""
    async with openai_client(stack, await _suspended_key(make_key, stack_db)) as client:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await client.models.list()
    assert raised.value.status_code == 403
    assert raised.value.code == "tenant_suspended"
    assert await simulator.requests() == []


async def test_openai_unknown_route_is_not_found(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """/v1/unknown, fetched with the client's raw `get`, raises openai.NotFoundError (404) in the
    OpenAI error shape."""
    async with openai_client(stack, await make_key()) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.get("/unknown", cast_to=object)
    assert raised.value.status_code == 404
    assert str(raised.value.response.url).endswith("/v1/unknown")
    assert raised.value.type == "not_found_error"
    assert await simulator.requests() == []


async def test_openai_second_call_over_rpm_is_rate_limit_error(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With rpm=1 the first call succeeds and the second raises openai.RateLimitError (429,
    rate_limit_exceeded, Retry-After); only the first reaches the simulator."""
    async with openai_client(stack, await make_key(rpm=1)) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as raised:
            await client.models.list()
    assert raised.value.status_code == 429
    assert raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["Retry-After"]) >= 1
    assert [r["path"] for r in await simulator.requests()] == ["/v1/models"]


async def test_ollama_denials_are_response_errors(
    stack: Stack, make_key: KeyFactory, stack_db: asyncpg.Connection, simulator: SimulatorControl
) -> None:
    """The ollama client raises ResponseError 401 for a wrong secret, 403 for a suspended tenant and
    429 for the second call of an rpm=1 key; only the allowed call reaches the simulator."""
    async with ollama_client(stack, _wrong_secret(await make_key())) as client:
        with pytest.raises(ollama.ResponseError) as unauthorised:
            await client.chat(model=MODEL, messages=MESSAGES)
    assert (unauthorised.value.status_code, unauthorised.value.error) == (401, "invalid API key")
    async with ollama_client(stack, await _suspended_key(make_key, stack_db)) as client:
        with pytest.raises(ollama.ResponseError) as forbidden:
            await client.chat(model=MODEL, messages=MESSAGES)
    assert (forbidden.value.status_code, forbidden.value.error) == (403, "tenant suspended")
    async with ollama_client(stack, await make_key(rpm=1)) as client:
        await client.chat(model=MODEL, messages=MESSAGES)
        with pytest.raises(ollama.ResponseError) as limited:
            await client.chat(model=MODEL, messages=MESSAGES)
    assert limited.value.status_code == 429
    assert "requests per minute" in limited.value.error
    assert [r["path"] for r in await simulator.requests()] == ["/api/chat"]


async def test_ollama_model_management_is_forbidden(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """pull, push, create, copy and delete with a valid key all raise ResponseError 403, and the
    simulator records none of those paths (nor anything else)."""
    async with ollama_client(stack, await make_key()) as client:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "pull": lambda: client.pull(MODEL),
            "push": lambda: client.push(MODEL),
            "create": lambda: client.create(model="mine", from_=MODEL),
            "copy": lambda: client.copy(MODEL, "mine"),
            "delete": lambda: client.delete(MODEL),
        }
        statuses: dict[str, int] = {}
        for name, call in calls.items():
            with pytest.raises(ollama.ResponseError) as blocked:
                await call()
            statuses[name] = blocked.value.status_code
    assert statuses == dict.fromkeys(calls, 403)
    assert await simulator.requests() == []


# ---------------------------------------------------------------------------------------------
# Client-sent grant and forwarding headers change nothing


def _signed_grant(stack: Stack, *, tenant_id: int, key_id: int, prefix: str, method: str, path: str) -> str:
    """A grant signed with the stack's real secret, as a thief who knew it might send."""
    grant = grants.Grant(
        request_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix=prefix,
        method=method,
        path=path,
        expires_at=time.time() + 30,
    )
    return grants.sign(grant, stack.env["GATEWAY_GRANT_SECRET"])


SPOOFER = "127.0.0.4"  # an address of its own: not 127.0.0.1-3 (other tests, the canary, the guesser)


def _spoofed(grant: str, **forwarded: str) -> dict[str, str]:
    return {
        "X-Gw-Grant": grant,
        "X-Gw-Request-Id": "spoofed-request-id",
        "X-Gw-Foo": "bar",
        "X-Forwarded-For": "203.0.113.66",
        **forwarded,
    }


async def test_spoofed_headers_without_a_key_are_401(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A request with no key but with a correctly signed grant, a grant request id, another X-Gw-*
    header and X-Forwarded-For/-Method/-Uri naming an open route is still 401, and reaches nothing."""
    token = await make_key()
    tenant_id, key_id = await key_ids(stack_db, token)
    grant = _signed_grant(
        stack,
        tenant_id=tenant_id,
        key_id=key_id,
        prefix=keys.parse_key(token).prefix,
        method="POST",
        path="/api/chat",
    )
    headers = _spoofed(grant, **{"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/version"})
    async with http.post(f"{stack.gateway_url}/api/chat", json=CHAT, headers=headers) as resp:
        assert resp.status == 401, await resp.text()
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await simulator.requests() == []


async def test_spoofed_headers_with_a_key_change_nothing(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """POST /api/chat sent with `X-Forwarded-Method: GET`, `X-Forwarded-Uri: /api/tags`, a signed
    grant for GET /api/tags, a grant request id and X-Gw-Foo is decided as the chat it is: without a
    body it is refused for the missing body (a tags listing needs none); with one it is relayed as
    POST /api/chat, none of the spoofed headers reaches Ollama, and the ledger meters it as chat
    under Caddy's own request id."""
    token = await make_key()
    tenant_id, key_id = await key_ids(stack_db, token)
    grant = _signed_grant(
        stack,
        tenant_id=tenant_id,
        key_id=key_id,
        prefix=keys.parse_key(token).prefix,
        method="GET",
        path="/api/tags",
    )
    headers = {
        "Authorization": f"Bearer {token}",
        **_spoofed(grant, **{"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/tags"}),
    }
    url = f"{stack.gateway_url}/api/chat"
    async with http.post(url, headers=headers) as resp:
        assert resp.status == 400, await resp.text()
        assert await resp.json() == {"error": "missing request body"}
    async with http.post(url, json=CHAT, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["done"] is True
    assert "message" in answer
    (record,) = await simulator.requests()
    assert (record["method"], record["path"]) == ("POST", "/api/chat")
    assert record["generation"]["endpoint"] == "/api/chat"
    names = _header_names(record)
    assert not {n for n in names if n.startswith("x-gw-")}
    values = {value for _, value in record["headers"]}
    assert not values & {grant, "spoofed-request-id", "bar", "203.0.113.66", "/api/tags"}
    await _eventually_row(
        stack_db, "SELECT 1 FROM usage_ledger WHERE key_id = $1 AND http_status = 200", key_id
    )
    rows = await stack_db.fetch("SELECT endpoint, request_id FROM usage_ledger WHERE key_id = $1", key_id)
    assert {row["endpoint"] for row in rows} == {"/api/chat"}
    for row in rows:
        uuid.UUID(row["request_id"])  # Caddy's {http.request.uuid}, not the client's value


async def test_spoofed_forwarded_uri_does_not_unblock_a_route(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """POST /api/pull with `X-Forwarded-Uri: /api/chat` and a spoofed X-Forwarded-For is still 403, and
    the audit row records the real method, path and client address (sent from an address of its
    own: a denial before the key is known is aggregated per address, reason and minute, with no
    request id, so the spoofed one is nowhere)."""
    agent = f"spoof-test/{uuid.uuid4().hex}"
    headers = {
        "Authorization": f"Bearer {await make_key()}",
        "User-Agent": agent,
        **_spoofed("v1.forged.grant", **{"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/chat"}),
    }
    connector = aiohttp.TCPConnector(local_addr=(SPOOFER, 0))
    async with aiohttp.ClientSession(connector=connector) as spoofer:
        url = f"{stack.gateway_url}/api/pull"
        async with spoofer.post(url, json={"model": MODEL}, headers=headers) as resp:
            assert resp.status == 403, await resp.text()
    assert await simulator.requests() == []
    row = await _eventually_row(
        stack_db,
        "SELECT method, path, client_addr, request_id, status FROM audit_log WHERE user_agent = $1",
        agent,
    )
    assert (row["method"], row["path"], row["status"]) == ("POST", "/api/pull", 403)
    assert row["client_addr"] == SPOOFER
    assert row["request_id"] is None
    spoofed = "SELECT count(*) FROM audit_log WHERE request_id = 'spoofed-request-id'"
    assert not await stack_db.fetchval(spoofed)


# ---------------------------------------------------------------------------------------------
# Bodies, disconnects and rate-limit headers


def _oversized_chat() -> bytes:
    head = b'{"model":"llama3.2","messages":[{"role":"user","content":"'
    tail = b'"}],"stream":false}'
    return head + b"a" * (BODY_LIMIT + 1 - len(head) - len(tail)) + tail


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_body_is_413_and_never_relayed(
    *,
    framing: str,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
) -> None:
    """A body one byte over the dev Caddyfile's 10MB limit, sent with Content-Length or chunked,
    is answered 413 and the simulator never sees the request."""
    body = _oversized_chat()
    assert len(body) == BODY_LIMIT + 1

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    payload: io.BytesIO | AsyncIterator[bytes] = io.BytesIO(body) if framing == "content-length" else chunks()
    headers = {"Authorization": f"Bearer {await make_key()}", "Content-Type": "application/json"}
    async with http.post(f"{stack.gateway_url}/api/chat", data=payload, headers=headers) as resp:
        assert resp.status == 413, await resp.text()
    assert await simulator.requests() == []


@pytest.mark.parametrize("sdk", ["openai", "ollama"])
async def test_client_disconnect_mid_stream_cancels_the_generation(
    *, sdk: str, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """An SDK stream closed after two chunks of a long, slow generation makes the gateway cancel the
    upstream request: the simulator records the generation as cancelled, well before its end."""
    await simulator.settings(tokens_per_second=20, completion_tokens=200)
    key = await make_key()
    received = 0
    if sdk == "openai":
        async with openai_client(stack, key) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            async for _ in stream:
                received += 1
                if received == 2:
                    break
            await stream.close()
    else:
        async with ollama_client(stack, key) as client:
            parts = await client.chat(model=MODEL, messages=MESSAGES, stream=True)
            async for _ in parts:
                received += 1
                if received == 2:
                    break
            await parts.aclose()  # type: ignore[attr-defined]  # an async generator, typed as AsyncIterator
    assert received == 2
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    assert generation["outcome"] == "cancelled", generation
    assert generation["chunks_sent"] < 200
    assert generation["eval_count"] is None


async def test_allowed_answers_carry_rate_limit_headers(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """For a key with rpm and tpm limits, allowed answers (chat, embeddings, the model list) carry
    all six x-ratelimit-* headers with the key's limits, and what remains is within them."""
    rpm, tpm = 1000, 1_000_000
    async with openai_client(stack, await make_key(rpm=rpm, tpm=tpm)) as client:
        chat = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        embeddings = await client.embeddings.with_raw_response.create(model=EMBED_MODEL, input="Why?")
        models = await client.models.with_raw_response.list()
    answers = {"chat": chat.headers, "embeddings": embeddings.headers, "models": models.headers}
    for route, headers in answers.items():
        assert [name for name in RATE_HEADERS if name not in headers] == [], (route, headers)
        assert int(headers["x-ratelimit-limit-requests"]) == rpm, route
        assert int(headers["x-ratelimit-limit-tokens"]) == tpm, route
        assert 0 <= int(headers["x-ratelimit-remaining-requests"]) < rpm, route
        assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) <= tpm, route
    assert len(await simulator.requests()) == len(answers)
