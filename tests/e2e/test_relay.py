"""stream_proxy's relay through the real Caddy (docs/ARCHITECTURE.md#proxying): for every allowlisted
endpoint the client gets the simulator's own bytes (less the usage event the gateway asked for on
its own behalf, and the zero usage /v1/completions adds to every chunk), with its Content-Type and
the x-ratelimit-* headers; every request leaves one usage event with Ollama's own counts; client
disconnects cancel the generation; the key's model allowlist and token budget shape what reaches
Ollama; Ollama down or slow is 502 / 504 in the caller's dialect; grants are single use; the
official openai and ollama clients work through the gateway.

Usage events are read from the stack's Redis stream as they are written (XREAD, decoded with
shared.usage_wire) and matched by key prefix: every test uses keys of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import attrs
import cattrs
import coredis
import ollama
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

import localstack
from shared import grant as grants
from shared import keys, usage_wire
from shared.config import ProxyConfig, load_config
from shared.db import asyncpg_dsn
from shared.models import UsageEvent
from shared.periods import periods_at
from stream_proxy.app import create_app
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, finished_records, key_ids, sent_bytes

pytestmark = pytest.mark.e2e

NDJSON = "application/x-ndjson"
GIN_JSON = "application/json; charset=utf-8"
OPENAI_JSON = "application/json"
SSE = "text/event-stream"
ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
MESSAGES = [{"role": "user", "content": "Say hi"}]
RATE_HEADERS = tuple(
    f"x-ratelimit-{kind}-{what}"
    for kind in ("limit", "remaining", "reset")
    for what in ("requests", "tokens")
)
RPM, TPM = 100_000, 100_000_000

Reply = tuple[int, CIMultiDict[str], bytes]


# ---------------------------------------------------------------------------------------------
# Usage events


@attrs.define
class UsageLog:
    """Every usage event written to the stack's stream while this module runs, in stream order."""

    events: list[UsageEvent] = attrs.Factory(list)
    arrived: asyncio.Condition = attrs.Factory(asyncio.Condition)
    task: asyncio.Task[None] | None = None

    async def follow(self, redis_url: str, stream: str) -> None:
        """Read the stream as entries arrive (before the accountant can trim them). The client
        lives and dies in this task, as coredis requires."""
        client: coredis.Redis[bytes] = coredis.Redis.from_url(redis_url)
        last: bytes | str = "0-0"
        async with client:
            while True:
                reply = await client.xread({stream: last}, count=500, block=200)
                for entries in (reply or {}).values():
                    for entry in entries:
                        last = entry.identifier
                        with contextlib.suppress(KeyError, ValueError, TypeError, cattrs.BaseValidationError):
                            fields = {cast(bytes, k): cast(bytes, v) for k, v in entry.field_values.items()}
                            self.events.append(usage_wire.decode(fields))
                if reply:
                    async with self.arrived:
                        self.arrived.notify_all()

    async def of(self, prefix: str, count: int = 1, *, within: float = 10.0) -> list[UsageEvent]:
        """The events of one key, once at least `count` have arrived (bounded wait)."""

        def mine() -> list[UsageEvent]:
            if self.task is not None and self.task.done():
                self.task.result()  # the follower died: show why
            return [e for e in self.events if e.key_prefix == prefix]

        try:
            async with asyncio.timeout(within), self.arrived:
                await self.arrived.wait_for(lambda: len(mine()) >= count)
        except TimeoutError:
            raise AssertionError(f"expected {count} usage events for {prefix}, got {mine()}") from None
        return mine()


@pytest.fixture(scope="module")
async def usage(stack: Stack) -> AsyncIterator[UsageLog]:
    """A follower of the stack's usage stream for the tests of this module."""
    log = UsageLog()
    stream = f"{stack.env['GATEWAY_REDIS_PREFIX']}usage"
    log.task = asyncio.create_task(log.follow(stack.redis_url, stream))
    try:
        yield log
    finally:
        log.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await log.task


# ---------------------------------------------------------------------------------------------
# Helpers


def _prefix(token: str) -> str:
    return keys.parse_key(token).prefix


async def _send(
    http: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    key: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with http.request(method, url, json=body, headers=sent) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _load(http: aiohttp.ClientSession, stack: Stack, model: str) -> None:
    """Load a model straight at the simulator (an empty generate), so that /api/ps lists it."""
    status, _, data = await _send(http, "POST", f"{stack.ollama_url}/api/generate", body={"model": model})
    assert status == 200, data


async def _records(simulator: SimulatorControl, method: str, path: str) -> list[dict[str, Any]]:
    return [r for r in await simulator.requests() if r["method"] == method and r["path"] == path]


def _forwarded(record: dict[str, Any]) -> dict[str, Any]:
    """The body that reached the simulator."""
    document: dict[str, Any] = orjson.loads(base64.b64decode(record["body_base64"]))
    return document


def _sse_data(event: bytes) -> Any:
    return orjson.loads(event[len(b"data: ") :]) if event.startswith(b"data: {") else None


def _is_usage_event(event: bytes) -> bool:
    data = _sse_data(event)
    return isinstance(data, dict) and data.get("choices") == []


async def _key_ids(stack: Stack, token: str) -> tuple[int, int]:
    """(tenant id, key id) of a key made by make_key."""
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        return await key_ids(conn, token)
    finally:
        await conn.close()


async def _signed_grant(
    stack: Stack, token: str, method: str, path: str, *, metered: bool
) -> tuple[grants.Grant, str]:
    """A grant for one request by a real key, signed with the stack's secret, as the sidecar would."""
    tenant_id, key_id = await _key_ids(stack, token)
    zone = ZoneInfo(os.environ.get("GATEWAY_BUDGET_TIMEZONE", "UTC"))
    names = periods_at(time.time(), zone).names()
    grant = grants.Grant(
        request_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        key_id=key_id,
        key_prefix=_prefix(token),
        method=method,
        path=path,
        expires_at=time.time() + 30,
        metered=metered,
        periods={"day": names["day"], "month": names["month"]},
    )
    return grant, grants.sign(grant, stack.env["GATEWAY_GRANT_SECRET"])


@contextlib.asynccontextmanager
async def _own_proxy(stack: Stack, ollama_url: str, **environ: str) -> AsyncIterator[URL]:
    """A stream_proxy of this test's own (in process) on the stack's Redis, prefix and secret."""
    config = load_config(
        ProxyConfig,
        {
            "GATEWAY_REDIS_URL": stack.redis_url,
            "GATEWAY_REDIS_PREFIX": stack.env["GATEWAY_REDIS_PREFIX"],
            "GATEWAY_GRANT_SECRET": stack.env["GATEWAY_GRANT_SECRET"],
            "GATEWAY_OLLAMA_URL": ollama_url,
            **environ,
        },
    )
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        yield server.make_url("/")
    finally:
        await server.close()


def _assert_dialect(path: str, headers: CIMultiDict[str], data: bytes) -> str:
    """The error body is in the caller's dialect; returns its message."""
    document = orjson.loads(data)
    if path.startswith("/v1/"):
        assert headers.get("Content-Type") == OPENAI_JSON, headers
        assert set(document) == {"error"}, data
        assert set(document["error"]) == {"message", "type", "param", "code"}, data
        message: str = document["error"]["message"]
    else:
        assert headers.get("Content-Type") == GIN_JSON, headers
        assert set(document) == {"error"}, data
        message = document["error"]
    assert isinstance(message, str)
    assert message
    return message


# ---------------------------------------------------------------------------------------------
# Every endpoint: bytes, content type, rate-limit headers, usage event


@attrs.frozen
class Case:
    """One allowlisted request and what the client and the usage event should show."""

    id: str
    method: str
    path: str
    body: dict[str, Any] | None
    content_type: str
    counts: Literal["exact", "estimated", "none"] = "exact"
    client_usage: bool = True  # False: the usage event the gateway asked for must not reach the client
    strip_zero: bool = False  # /v1/completions without client include_usage


CHAT = {"model": "llama3.2", "messages": MESSAGES}
GENERATE = {"model": "llama3.2", "prompt": "Why is the sky blue?"}
COMPLETE = {"model": "llama3.2", "prompt": "Say hi"}
INCLUDE = {"stream_options": {"include_usage": True}}

CASES = (
    Case("chat-stream", "POST", "/api/chat", CHAT, NDJSON),
    Case("chat-stream-thinking", "POST", "/api/chat", {**CHAT, "model": "qwen3:8b"}, NDJSON),
    Case("chat-whole", "POST", "/api/chat", {**CHAT, "stream": False}, GIN_JSON),
    Case("generate-stream", "POST", "/api/generate", GENERATE, NDJSON),
    Case("generate-whole", "POST", "/api/generate", {**GENERATE, "stream": False}, GIN_JSON),
    Case("embed", "POST", "/api/embed", {"model": "all-minilm", "input": ["Why?", "Why not?"]}, GIN_JSON),
    Case(
        "embeddings",
        "POST",
        "/api/embeddings",
        {"model": "all-minilm", "prompt": "Why is the sky blue?"},
        GIN_JSON,
        counts="estimated",
    ),
    Case("tags", "GET", "/api/tags", None, GIN_JSON, counts="none"),
    Case("tags-head", "HEAD", "/api/tags", None, GIN_JSON, counts="none"),
    Case("show", "POST", "/api/show", {"model": "llama3.2"}, GIN_JSON, counts="none"),
    Case("ps", "GET", "/api/ps", None, GIN_JSON, counts="none"),
    Case("version", "GET", "/api/version", None, GIN_JSON, counts="none"),
    Case("version-head", "HEAD", "/api/version", None, GIN_JSON, counts="none"),
    Case("openai-chat-whole", "POST", "/v1/chat/completions", CHAT, OPENAI_JSON),
    Case("openai-chat-whole-usage", "POST", "/v1/chat/completions", {**CHAT, **INCLUDE}, OPENAI_JSON),
    Case(
        "openai-chat-stream",
        "POST",
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        SSE,
        client_usage=False,
    ),
    Case(
        "openai-chat-stream-usage", "POST", "/v1/chat/completions", {**CHAT, "stream": True, **INCLUDE}, SSE
    ),
    Case("completions-whole", "POST", "/v1/completions", COMPLETE, OPENAI_JSON),
    Case("completions-whole-usage", "POST", "/v1/completions", {**COMPLETE, **INCLUDE}, OPENAI_JSON),
    Case(
        "completions-stream",
        "POST",
        "/v1/completions",
        {**COMPLETE, "stream": True},
        SSE,
        client_usage=False,
        strip_zero=True,
    ),
    Case("completions-stream-usage", "POST", "/v1/completions", {**COMPLETE, "stream": True, **INCLUDE}, SSE),
    Case("openai-embeddings", "POST", "/v1/embeddings", {"model": "all-minilm", "input": "hi"}, OPENAI_JSON),
    Case("models", "GET", "/v1/models", None, OPENAI_JSON, counts="none"),
    Case("model", "GET", "/v1/models/llama3.2:latest", None, OPENAI_JSON, counts="none"),
    Case("model-short", "GET", "/v1/models/llama3.2", None, OPENAI_JSON, counts="none"),
)


def _without_ps_timing(path: str, document: Any) -> Any:
    """/api/ps as the gateway answers it: less what times other tenants' requests (DECISIONS.md)."""
    if path == "/api/ps":
        for entry in document["models"]:
            for name in ("expires_at", "size_vram", "context_length"):
                del entry[name]
    return document


def _expected(case: Case, sent: bytes) -> bytes:
    """What the client must receive, computed from the simulator's own bytes."""
    if case.method == "HEAD":
        return b""
    if case.path == "/api/ps":
        return orjson.dumps(_without_ps_timing(case.path, orjson.loads(sent)))
    if case.client_usage:
        return sent
    events = sent.split(b"\n\n")
    assert sum(map(_is_usage_event, events)) == 1, sent  # the gateway did ask for usage
    kept = [e for e in events if not _is_usage_event(e)]
    if case.strip_zero:
        assert all(ZERO_USAGE in e for e in kept if _sse_data(e) is not None), sent
        kept = [e.replace(ZERO_USAGE, b"") for e in kept]
    return b"\n\n".join(kept)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_every_endpoint_relays_the_simulators_bytes_and_reports_its_counts(
    *,
    case: Case,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    usage: UsageLog,
) -> None:
    """Through Caddy, the client receives exactly the bytes the simulator sent for its request (for
    OpenAI streams the client did not ask usage for, less the usage event the gateway asked for
    and, on /v1/completions, less the zero usage on every chunk), with the simulator's
    Content-Type and the key's x-ratelimit-* values; the request's one usage event carries the
    simulator's own prompt and completion counts, exactly (estimated only for /api/embeddings,
    which reports none)."""
    key = await make_key(rpm=RPM, tpm=TPM)
    if case.path == "/api/ps":  # load a model, so that there is something to list
        await _load(http, stack, "llama3.2")
    status, headers, received = await _send(
        http, case.method, f"{stack.gateway_url}{case.path}", key=key, body=case.body
    )
    assert status == 200, received
    records = await _records(simulator, case.method, case.path)
    assert len(records) == 1, records
    record = records[0]
    sent = sent_bytes(record)
    assert sent, record
    assert received == _expected(case, sent)
    assert headers.get("Content-Type") == case.content_type
    assert headers["x-ratelimit-limit-requests"] == str(RPM)
    assert 0 <= int(headers["x-ratelimit-remaining-requests"]) < RPM
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    if case.counts != "none":  # every header, for every route: test_every_allowed_response_...
        assert headers["x-ratelimit-limit-tokens"] == str(TPM)
        assert 0 <= int(headers["x-ratelimit-remaining-tokens"]) <= TPM
        assert headers["x-ratelimit-reset-tokens"].endswith("s")
    if case.content_type == SSE:
        assert _forwarded(record)["stream_options"] == {"include_usage": True}

    (event,) = await usage.of(_prefix(key))
    assert (event.endpoint, event.method, event.http_status, event.upstream_status) == (
        case.path,
        case.method,
        200,
        200,
    )
    assert event.bytes_relayed == len(received)
    assert not event.client_disconnected
    generation = record["generation"]
    if case.counts == "exact":
        assert generation is not None
        assert generation["prompt_eval_count"], generation
        assert (event.prompt_tokens, event.completion_tokens) == (
            generation["prompt_eval_count"],
            generation["eval_count"] or 0,
        )
        assert (event.estimated, event.estimate_reason, event.metered) == (False, None, True)
        assert case.body is not None
        assert event.model == case.body["model"]
    elif case.counts == "estimated":
        assert (event.estimated, event.estimate_reason, event.metered) == (True, "no_upstream_count", True)
        assert event.prompt_tokens > 0
        assert event.completion_tokens == 0
    else:
        assert (event.prompt_tokens, event.completion_tokens) == (0, 0)
        assert (event.estimated, event.metered) == (False, False)


@pytest.mark.parametrize("path", ["/api/version", "/api/tags"])
async def test_head_answers_carry_the_length_of_the_get_body(
    path: str, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A HEAD answer has no body but the same headers as the GET answer would (RFC 9110 §9.3.2), as
    Ollama's has: the Content-Length relayed is the simulator's (its body's length), never 0."""
    key = await make_key()
    status, headers, received = await _send(http, "HEAD", f"{stack.gateway_url}{path}", key=key)
    assert (status, received) == (200, b"")
    (record,) = await _records(simulator, "HEAD", path)
    length = len(sent_bytes(record))
    assert length > 0
    assert headers.get("Content-Length", str(length)) == str(length), headers


async def test_every_allowed_response_carries_the_rate_limit_headers(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """For a key with rpm and tpm limits, every allowed response, on every allowlisted route
    (metered or not), carries all six x-ratelimit-{limit,remaining,reset}-{requests,tokens}
    headers (docs/ARCHITECTURE.md#admission), with the key's limits as the limit values."""
    key = await make_key(rpm=RPM, tpm=TPM)
    missing: dict[str, list[str]] = {}
    for case in CASES:
        status, headers, data = await _send(
            http, case.method, f"{stack.gateway_url}{case.path}", key=key, body=case.body
        )
        assert status == 200, (case.id, data)
        missing[case.id] = [name for name in RATE_HEADERS if name not in headers]
        if not missing[case.id]:
            assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-limit-tokens"]) == (
                str(RPM),
                str(TPM),
            )
    without = sorted(name for name, absent in missing.items() if absent)
    assert without == [], missing
    assert len(await simulator.requests()) == len(CASES)


# ---------------------------------------------------------------------------------------------
# Client disconnects


@pytest.mark.parametrize("k", [1, 4])
async def test_a_client_that_disconnects_cancels_the_generation(
    *,
    k: int,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    usage: UsageLog,
) -> None:
    """A client that goes away after k chunks of a slow stream makes the gateway cancel the upstream
    request (the simulator records the generation as cancelled, well before its natural end) and
    write a usage event with k completion tokens (±1, the chunk in flight), estimated
    `client_disconnected`."""
    await simulator.settings(tokens_per_second=20, completion_tokens=200)
    key = await make_key()
    async with http.post(
        f"{stack.gateway_url}/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        lines = [await resp.content.readline() for _ in range(k)]
        resp.close()
    assert all(b'"done":false' in line for line in lines), lines
    (event,) = await usage.of(_prefix(key))
    assert (event.estimated, event.estimate_reason, event.client_disconnected) == (
        True,
        "client_disconnected",
        True,
    )
    assert k - 1 <= event.completion_tokens <= k + 1, event
    assert event.prompt_tokens > 0
    (record,) = await finished_records(http, stack, 1, wait_seconds=5)
    generation = record["generation"]
    assert generation["outcome"] == "cancelled", generation
    assert generation["chunks_sent"] < 200
    assert generation["eval_count"] is None


# ---------------------------------------------------------------------------------------------
# The key's body policy


DENIED = (
    ("POST", "/api/chat", {"MODEL": "qwen3:8b", "messages": MESSAGES}),
    ("POST", "/api/show", {"name": "qwen3:8b"}),
    ("POST", "/api/show", {"model": "llama3.2", "name": "qwen3:8b"}),
    ("POST", "/api/chat", {"model": "llama3:cloud", "messages": MESSAGES}),
    ("POST", "/api/generate", {"model": "gpt-oss:20b-cloud", "prompt": "x"}),
    ("POST", "/v1/chat/completions", {"model": "gpt-oss:20b-cloud", "messages": MESSAGES}),
    ("POST", "/api/generate", {"model": "qwen3:8b", "prompt": "x"}),
    ("POST", "/api/embed", {"model": "all-minilm", "input": "x"}),
    ("POST", "/v1/chat/completions", {"model": "qwen3:8b", "messages": MESSAGES}),
    ("GET", "/v1/models/qwen3:8b", None),
)


async def test_a_key_limited_to_one_model_cannot_name_another(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """For a key allowed only llama3.2: another model in any field spelling (`MODEL`, /api/show's
    `name`), `:cloud` and `-cloud` models, and /v1/models/<other> are 403 in the caller's dialect,
    and none of them reaches the simulator."""
    key = await make_key(models="llama3.2")
    for method, path, body in DENIED:
        status, headers, data = await _send(http, method, f"{stack.gateway_url}{path}", key=key, body=body)
        assert status == 403, (path, body, data)
        _assert_dialect(path, headers, data)
    assert await simulator.requests() == []


async def test_a_key_limited_to_one_model_sees_only_that_model(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """For a key allowed only llama3.2, spellings of llama3.2 work, and /api/tags, /api/ps and
    /v1/models list only llama3.2 (the simulator's listing, filtered), while an unrestricted key
    sees every model."""
    key, everything = await make_key(models="llama3.2"), await make_key()
    gw = stack.gateway_url
    for name in ("llama3.2", "LLama3.2", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest"):
        body = {"model": name, "messages": MESSAGES, "stream": False}
        status, _, data = await _send(http, "POST", f"{gw}/api/chat", key=key, body=body)
        assert status == 200, (name, data)
    body = {"model": "qwen3:8b", "messages": MESSAGES, "stream": False}
    assert (await _send(http, "POST", f"{gw}/api/chat", key=everything, body=body))[0] == 200
    assert (await _send(http, "GET", f"{gw}/v1/models/llama3.2", key=key))[0] == 200
    for path, field, name_of in (("/api/tags", "models", "model"), ("/api/ps", "models", "model"),
                                 ("/v1/models", "data", "id")):  # fmt: skip
        await simulator.reset()
        if path == "/api/ps":  # both models loaded
            for model in ("llama3.2", "qwen3:8b"):
                await _load(http, stack, model)
        status, headers, data = await _send(http, "GET", f"{gw}{path}", key=key)
        assert status == 200, data
        (record,) = await _records(simulator, "GET", path)
        upstream = _without_ps_timing(path, orjson.loads(sent_bytes(record)))
        assert {e[name_of] for e in upstream[field]} >= {"llama3.2:latest", "qwen3:8b"}, upstream
        listed = orjson.loads(data)
        assert listed == {**upstream, field: [e for e in upstream[field] if e[name_of] == "llama3.2:latest"]}
        assert headers.get("Content-Type") == (OPENAI_JSON if path.startswith("/v1") else GIN_JSON)
        status, _, data = await _send(http, "GET", f"{gw}{path}", key=everything)
        assert status == 200
        _, unfiltered = await _records(simulator, "GET", path)
        if path == "/api/ps":
            assert orjson.loads(data) == _without_ps_timing(path, orjson.loads(sent_bytes(unfiltered)))
        else:
            assert data == sent_bytes(unfiltered)


NUM_PREDICT = ("options", "num_predict")
CLAMPED = {
    "num_predict-5000": (
        "/api/generate",
        {**GENERATE, "stream": False, "options": {"num_predict": 5000}},
        NUM_PREDICT,
    ),
    "num_predict--1": ("/api/chat", {**CHAT, "stream": False, "options": {"num_predict": -1}}, NUM_PREDICT),
    "num_predict-absent": ("/api/chat", {**CHAT, "stream": False}, NUM_PREDICT),
    "num_predict-0": (
        "/api/generate",
        {**GENERATE, "stream": False, "options": {"num_predict": 0}},
        NUM_PREDICT,
    ),
    "max_tokens-5000": ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}, ("max_tokens",)),
    "max_tokens-0": ("/v1/completions", {**COMPLETE, "max_tokens": 0}, ("max_tokens",)),
}


@pytest.mark.parametrize(("path", "body", "field"), CLAMPED.values(), ids=CLAMPED.keys())
async def test_the_forwarded_completion_limit_fits_the_budget(
    *,
    path: str,
    body: dict[str, Any],
    field: tuple[str, ...],
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    usage: UsageLog,
) -> None:
    """For a key with a total budget of 1000 tokens, the completion limit that reaches Ollama is
    clamped so that prompt bound plus completion fits the budget: a positive number below 1000
    (never a value Ollama reads as "no limit"), whatever the client asked for."""
    key = await make_key(total_tokens=1000)
    status, _, data = await _send(http, "POST", f"{stack.gateway_url}{path}", key=key, body=body)
    assert status == 200, data
    (record,) = await _records(simulator, "POST", path)
    forwarded: Any = _forwarded(record)
    for name in field:
        forwarded = forwarded[name]
    assert isinstance(forwarded, int)
    assert 0 < forwarded < 1000, (forwarded, record["generation"])
    assert record["generation"]["completion_limit"] == forwarded
    (event,) = await usage.of(_prefix(key))
    assert event.reserved_tokens <= 1000
    assert event.total_tokens <= 1000


# ---------------------------------------------------------------------------------------------
# Ollama down or slow (a stream_proxy of the test's own, fed grants signed with the stack's secret)


async def test_ollama_unreachable_is_502_in_the_callers_dialect(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, usage: UsageLog
) -> None:
    """With Ollama unreachable, stream_proxy answers 502 in the caller's dialect, and writes a usage
    event with http status 502, no upstream status and no tokens (Ollama never saw the request)."""
    token = await make_key()
    closed = f"http://127.0.0.1:{localstack.free_port()}"
    async with _own_proxy(stack, closed) as url:
        for done, path in enumerate(("/api/chat", "/v1/chat/completions"), start=1):
            grant, signed = await _signed_grant(stack, token, "POST", path, metered=True)
            status, headers, data = await _send(
                http, "POST", url.with_path(path), body=CHAT, headers={"X-Gw-Grant": signed}
            )
            assert status == 502, data
            _assert_dialect(path, headers, data)
            event = next(e for e in await usage.of(_prefix(token), done) if e.request_id == grant.request_id)
            assert (event.http_status, event.upstream_status, event.endpoint) == (502, None, path)
            # Ollama never saw it: nothing charged, nothing estimated.
            assert (event.total_tokens, event.estimated) == (0, False)


async def test_every_backend_down_is_503_in_the_callers_dialect_and_nothing_is_charged(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, usage: UsageLog
) -> None:
    """With two backends (GATEWAY_OLLAMA_URLS) neither of which answers its poll, a metered request
    is 503 with Retry-After in the caller's dialect before anything is reserved (a usage event with
    http status 503 and no tokens), and /readyz is 503 with no backend healthy."""
    token = await make_key()
    closed = [f"http://127.0.0.1:{localstack.free_port()}" for _ in range(2)]
    backends = f"a={closed[0]},b={closed[1]};max_parallel=2"
    async with _own_proxy(stack, closed[0], GATEWAY_OLLAMA_URLS=backends) as url:
        for done, path in enumerate(("/api/chat", "/v1/chat/completions"), start=1):
            grant, signed = await _signed_grant(stack, token, "POST", path, metered=True)
            status, headers, data = await _send(
                http, "POST", url.with_path(path), body=CHAT, headers={"X-Gw-Grant": signed}
            )
            assert status == 503, data
            assert int(headers["Retry-After"]) >= 1
            assert "no model server is available" in _assert_dialect(path, headers, data)
            event = next(e for e in await usage.of(_prefix(token), done) if e.request_id == grant.request_id)
            assert (event.http_status, event.upstream_status, event.total_tokens) == (503, None, 0)
        async with http.get(url.with_path("/readyz")) as resp:
            assert resp.status == 503
            assert (await resp.json())["backends_healthy"] == 0


async def test_ollama_too_slow_is_504_in_the_callers_dialect(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    usage: UsageLog,
) -> None:
    """When Ollama's first byte takes longer than GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT, stream_proxy
    answers 504 in the caller's dialect, cancels the upstream request, and writes a usage event
    with http status 504 and no upstream status."""
    token = await make_key()
    await simulator.settings(time_to_first_token=1.0)
    try:
        async with _own_proxy(stack, stack.ollama_url, GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT="0.5") as url:
            paths = ("/api/chat", "/v1/chat/completions")
            for done, path in enumerate(paths, start=1):
                grant, signed = await _signed_grant(stack, token, "POST", path, metered=True)
                status, headers, data = await _send(
                    http, "POST", url.with_path(path), body=CHAT, headers={"X-Gw-Grant": signed}
                )
                assert status == 504, data
                _assert_dialect(path, headers, data)
                event = next(
                    e for e in await usage.of(_prefix(token), done) if e.request_id == grant.request_id
                )
                assert (event.http_status, event.upstream_status, event.endpoint) == (504, None, path)
            records = await finished_records(http, stack, len(paths), wait_seconds=5)
            assert [r["generation"]["outcome"] for r in records] == ["cancelled", "cancelled"], records
    finally:
        await simulator.reset()


# ---------------------------------------------------------------------------------------------
# Grants


async def test_a_grant_is_good_for_one_request(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A correctly signed grant sent straight to stream_proxy twice: the first request is relayed,
    the second is 403 `already used`, and the simulator saw exactly one request."""
    token = await make_key()
    _, signed = await _signed_grant(stack, token, "GET", "/api/version", metered=False)
    url = f"{stack.proxy_url}/api/version"
    first, _, body = await _send(http, "GET", url, headers={"X-Gw-Grant": signed})
    assert first == 200, body
    status, headers, body = await _send(http, "GET", url, headers={"X-Gw-Grant": signed})
    assert status == 403, body
    assert "already used" in _assert_dialect("/api/version", headers, body)
    assert [(r["method"], r["path"]) for r in await simulator.requests()] == [("GET", "/api/version")]


# ---------------------------------------------------------------------------------------------
# The official clients


def _sse_events(record: dict[str, Any]) -> list[Any]:
    return [d for d in map(_sse_data, sent_bytes(record).split(b"\n\n")) if d is not None]


async def test_openai_client_streams_chat_with_and_without_usage(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """The official openai client streams chat through the gateway: without include_usage no chunk
    has empty `choices` (the gateway's own usage event is dropped); with it, the last chunk has
    empty `choices` and the simulator's counts as usage. The text is the simulator's."""
    key = await make_key()
    messages: list[Any] = MESSAGES
    async with openai.AsyncOpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(model="llama3.2", messages=messages, stream=True)
        plain = [chunk async for chunk in stream]
        stream = await client.chat.completions.create(
            model="llama3.2", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        counted = [chunk async for chunk in stream]
    first, second = await _records(simulator, "POST", "/v1/chat/completions")
    assert plain
    assert all(chunk.choices for chunk in plain)
    assert all(chunk.usage is None for chunk in plain)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in _sse_events(first) if e["choices"])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in plain) == text
    assert text
    last = counted[-1]
    assert last.choices == []
    assert last.usage is not None
    generation = second["generation"]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        generation["prompt_eval_count"],
        generation["eval_count"],
    )
    assert all(chunk.choices for chunk in counted[:-1])


async def test_ollama_client_chat_generate_and_embed(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """The official ollama client's chat (whole and streamed), generate and embed work through the
    gateway and return the simulator's text, vectors and counts."""
    key = await make_key()
    client = ollama.AsyncClient(host=stack.gateway_url, headers={"Authorization": f"Bearer {key}"})
    try:
        whole = await client.chat(model="llama3.2", messages=MESSAGES)
        parts = [part async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
        generated = await client.generate(model="llama3.2", prompt="Why is the sky blue?")
        embedded = await client.embed(model="all-minilm", input=["Why?", "Why not?"])
    finally:
        await client.close()  # type: ignore[no-untyped-call]  # ollama 0.6.3 leaves close() unannotated
    chat_whole, chat_stream = await _records(simulator, "POST", "/api/chat")
    (generate,) = await _records(simulator, "POST", "/api/generate")
    (embed,) = await _records(simulator, "POST", "/api/embed")
    sent = orjson.loads(sent_bytes(chat_whole))
    assert whole.message.content == sent["message"]["content"]
    assert whole.message.content
    assert (whole.prompt_eval_count, whole.eval_count) == (sent["prompt_eval_count"], sent["eval_count"])
    lines = [orjson.loads(line) for line in sent_bytes(chat_stream).splitlines()]
    assert "".join(p.message.content or "" for p in parts) == "".join(x["message"]["content"] for x in lines)
    assert parts[-1].done
    assert parts[-1].eval_count == chat_stream["generation"]["eval_count"]
    assert generated.response == orjson.loads(sent_bytes(generate))["response"]
    assert generated.eval_count == generate["generation"]["eval_count"]
    sent_embed = orjson.loads(sent_bytes(embed))
    assert len(embedded.embeddings) == 2
    assert (
        embedded.prompt_eval_count
        == sent_embed["prompt_eval_count"]
        == embed["generation"]["prompt_eval_count"]
    )
    assert [list(v) for v in embedded.embeddings] == sent_embed["embeddings"]
