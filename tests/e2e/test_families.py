"""The Anthropic Messages (`POST /v1/messages`) and OpenAI Responses (`POST /v1/responses`) families
end to end through the real Caddy, with the official `anthropic` and `openai` SDKs and raw HTTP:
what the client reads and what the ledger holds are the simulator's own text and counts; refusals
are in the caller's dialect; budgets hold under concurrent streams; web-search tools never reach
Ollama; `/` answers like Ollama; Anthropic routes carry `anthropic-ratelimit-*` headers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import aiohttp
import anthropic
import asyncpg
import attrs
import openai
import orjson
import pytest
from multidict import CIMultiDict

from shared import keys as key_format
from tests.e2e.conftest import (
    KeyFactory,
    SimulatorControl,
    Stack,
    finished_records,
    forged_key,
    ledger_rows,
    openai_client,
    prompt_bound,
    sent_bytes,
)

pytestmark = pytest.mark.e2e

MODEL = "llama3.2"
MESSAGES: Literal["/v1/messages"] = "/v1/messages"
RESPONSES: Literal["/v1/responses"] = "/v1/responses"
WAIT_SECONDS = 10.0
# A prompt of llama3.2's template is bounded at ~400 tokens (a token per byte): this budget holds a few.
BUDGET = 2000
ASKED = 40
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")

Auth = Literal["x-api-key", "bearer"]
Route = Literal["/v1/messages", "/v1/responses"]
ROUTES: tuple[Route, ...] = (MESSAGES, RESPONSES)


# --- helpers -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def anthropic_client(stack: Stack, key: str, auth: Auth) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official anthropic client on the gateway without retries: the key as `x-api-key` (the
    SDK's default) or as `Authorization: Bearer` (`auth_token`, as Claude Code with
    ANTHROPIC_AUTH_TOKEN)."""
    if auth == "x-api-key":
        client = anthropic.AsyncAnthropic(base_url=stack.gateway_url, api_key=key, max_retries=0)
    else:
        client = anthropic.AsyncAnthropic(
            base_url=stack.gateway_url, api_key=None, auth_token=key, max_retries=0
        )
    async with client:
        yield client


@attrs.frozen
class Reply:
    """One finished HTTP exchange through the gateway."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return orjson.loads(self.body)


async def post(
    http: aiohttp.ClientSession,
    stack: Stack,
    path: str,
    body: Any,
    headers: dict[str, str] | list[tuple[str, str]],
) -> Reply:
    """POST a JSON body (any JSON value, or raw bytes) through Caddy and read the whole answer."""
    data = io.BytesIO(body if isinstance(body, bytes) else orjson.dumps(body))
    all_headers = [("Content-Type", "application/json")]
    all_headers += list(headers.items()) if isinstance(headers, dict) else headers
    async with http.post(f"{stack.gateway_url}{path}", data=data, headers=all_headers) as resp:
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


def bearer(key: str) -> dict[str, str]:
    """The key as a Bearer token."""
    return {"Authorization": f"Bearer {key}"}


def messages_body(content: str, max_tokens: int = ASKED, *, stream: bool = False, model: str = MODEL) -> Any:
    """An Anthropic Messages body with one user message."""
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }


def responses_body(content: str, max_tokens: int = ASKED, *, stream: bool = False, model: str = MODEL) -> Any:
    """An OpenAI Responses body with a string input."""
    return {"model": model, "input": content, "max_output_tokens": max_tokens, "stream": stream}


def family_body(
    route: Route, content: str, max_tokens: int = ASKED, *, stream: bool, model: str = MODEL
) -> Any:
    """The body of `route` for one user text."""
    make = messages_body if route == MESSAGES else responses_body
    return make(content, max_tokens, stream=stream, model=model)


def sse_events(data: bytes) -> list[dict[str, Any]]:
    """The JSON `data:` payloads of the complete SSE events in `data`."""
    events = []
    for event in data.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line.removeprefix(b"data:").strip()
                if payload and payload != b"[DONE]":
                    events.append(orjson.loads(payload))
    return events


def content_deltas(route: Route, data: bytes) -> list[str]:
    """The text deltas of a Messages or Responses event stream."""
    if route == MESSAGES:
        return [
            e["delta"]["text"]
            for e in sse_events(data)
            if e.get("type") == "content_block_delta" and e["delta"].get("type") == "text_delta"
        ]
    return [e["delta"] for e in sse_events(data) if e.get("type") == "response.output_text.delta"]


def simulator_text(record: dict[str, Any]) -> str:
    """The answer text the simulator wrote for one /v1/messages or /v1/responses request."""
    data = sent_bytes(record)
    route: Route = record["path"]
    if record["generation"]["stream"]:
        return "".join(content_deltas(route, data))
    document = orjson.loads(data)
    if route == MESSAGES:
        return "".join(b["text"] for b in document["content"] if b["type"] == "text")
    return "".join(
        part["text"]
        for item in document["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def assert_anthropic_error(document: Any, kind: str) -> None:
    """`{"type":"error","error":{"type": kind, "message": str}}`."""
    assert isinstance(document, dict), document
    assert document.get("type") == "error", document
    assert isinstance(document.get("error"), dict), document
    assert document["error"].get("type") == kind, document
    assert isinstance(document["error"].get("message"), str), document


def assert_openai_error(document: Any, kind: str, code: str | None = None) -> None:
    """`{"error":{"message": str, "type": kind, ...}}` (and `code` when given)."""
    assert isinstance(document, dict), document
    assert set(document) == {"error"}, document
    assert document["error"].get("type") == kind, document
    assert isinstance(document["error"].get("message"), str), document
    if code is not None:
        assert document["error"].get("code") == code, document


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Poll until `check()` holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)


def no_key_reached_ollama(record: dict[str, Any], key: str) -> None:
    """Neither the key nor its headers were forwarded to the simulator."""
    names = {name.lower() for name, _ in record["headers"]}
    assert "x-api-key" not in names, record["headers"]
    assert "authorization" not in names, record["headers"]
    assert key not in record["body_text"]


# --- 1. the anthropic SDK ------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["x-api-key", "bearer"])
async def test_anthropic_sdk_messages_create_reads_the_simulators_text_and_counts(
    auth: Auth, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """`messages.create` with the key as x-api-key or as a Bearer token: the text is exactly the
    text the simulator generated, `usage.input_tokens` / `usage.output_tokens` are exactly the
    simulator's prompt_eval_count / eval_count, and the key never reaches Ollama."""
    key = await make_key()
    async with anthropic_client(stack, key, auth) as client:
        message = await client.messages.create(
            model=MODEL, max_tokens=ASKED, messages=[{"role": "user", "content": "Say something."}]
        )
    (record,) = await finished_records(http, stack, 1)
    assert record["path"] == MESSAGES
    generation = record["generation"]
    assert generation["outcome"] == "completed", generation
    text = "".join(b.text for b in message.content if isinstance(b, anthropic.types.TextBlock))
    assert text == simulator_text(record)
    assert text
    assert message.usage.output_tokens == generation["eval_count"]
    assert message.usage.input_tokens == generation["prompt_eval_count"]
    no_key_reached_ollama(record, key)


@pytest.mark.parametrize("auth", ["x-api-key", "bearer"])
async def test_anthropic_sdk_messages_stream_reads_the_simulators_text_and_counts(
    auth: Auth, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """`messages.stream` with the key as x-api-key or as a Bearer token: the final text is the
    concatenation of the text deltas the simulator streamed, and the final message's usage has
    exactly the simulator's eval_count and prompt_eval_count (from the final message_delta, not
    message_start's estimate)."""
    await simulator.settings(completion_tokens=20)
    key = await make_key()
    async with (
        anthropic_client(stack, key, auth) as client,
        client.messages.stream(
            model=MODEL, max_tokens=ASKED, messages=[{"role": "user", "content": "Tell me a story."}]
        ) as stream,
    ):
        text = await stream.get_final_text()
        final = await stream.get_final_message()
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    assert (record["path"], generation["stream"], generation["outcome"]) == (MESSAGES, True, "completed")
    assert generation["eval_count"] == 20
    assert text == simulator_text(record)
    assert final.usage.output_tokens == generation["eval_count"]
    assert final.usage.input_tokens == generation["prompt_eval_count"]
    assert final.stop_reason == "end_turn"
    no_key_reached_ollama(record, key)


async def test_a_thinking_model_streams_its_thinking_and_is_counted_exactly(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """qwen3:8b on /v1/messages (streamed through the SDK): the final message has the simulator's
    thinking text in a thinking block and its answer text, usage.output_tokens is its eval_count
    (thinking included), and the ledger row carries exactly the simulator's counts."""
    await simulator.settings(thinking_tokens=6, completion_tokens=9)
    key = await make_key()
    async with (
        anthropic_client(stack, key, "x-api-key") as client,
        client.messages.stream(
            model="qwen3:8b", max_tokens=ASKED, messages=[{"role": "user", "content": "Think first."}]
        ) as stream,
    ):
        text = await stream.get_final_text()
        final = await stream.get_final_message()
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    assert generation["outcome"] == "completed", generation
    assert generation["eval_count"] == 15
    thinking = [
        e["delta"]["thinking"]
        for e in sse_events(sent_bytes(record))
        if e.get("type") == "content_block_delta" and e["delta"].get("type") == "thinking_delta"
    ]
    assert len(thinking) == 6
    blocks = [b for b in final.content if isinstance(b, anthropic.types.ThinkingBlock)]
    assert [b.thinking for b in blocks] == ["".join(thinking)]
    assert text == simulator_text(record)
    assert final.usage.output_tokens == 15
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        generation["prompt_eval_count"],
        15,
        False,
    ), dict(row)


@pytest.mark.parametrize("route", ROUTES)
async def test_a_stream_ollama_fails_mid_way_is_charged_what_it_sent(
    *,
    route: Route,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """Ollama fails a stream after 3 tokens: its middleware decodes the chat handler's `{"error"}`
    line as an empty response and emits nothing more, so the stream just ends (no `message_stop`,
    no `response.completed`). The client receives the 3 deltas as Ollama sent them, and the ledger
    row is estimated `upstream_failed` with 3 completion tokens."""
    await simulator.settings(fail_after_chunks=3, completion_tokens=20)
    key = await make_key()
    reply = await post(http, stack, route, family_body(route, "fail me", stream=True), bearer(key))
    assert reply.status == 200, reply.body
    (record,) = await finished_records(http, stack, 1)
    assert record["generation"]["outcome"] == "failed"
    assert len(content_deltas(route, reply.body)) == 3
    kinds = [e["type"] for e in sse_events(reply.body)]
    final = "message_stop" if route == MESSAGES else "response.completed"
    assert final not in kinds, kinds
    assert kinds[-1] == ("content_block_delta" if route == MESSAGES else "response.output_text.delta"), kinds
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["estimated"], row["estimate_reason"]) == (True, "upstream_failed"), dict(row)
    assert row["completion_tokens"] == 3, dict(row)


# --- 2. refusals on /v1/messages -----------------------------------------------------------------


async def test_anthropic_refusals_raise_the_sdks_errors_with_anthropic_bodies(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """Through the anthropic SDK: an unknown key is AuthenticationError (401 authentication_error);
    a key limited to llama3.2 asking for qwen3:8b is PermissionDeniedError (403 permission_error);
    with rpm 2 the third request is RateLimitError (429 rate_limit_error) with a Retry-After of
    1..61 s; with tpm 60, requests asking 40 tokens each are served until the minute's tokens
    are spent (at most 60 by the simulator's counts), then RateLimitError with a Retry-After.
    Every body is `{"type":"error","error":{"type":…,"message":…}}` and none of the refused
    requests reaches the simulator."""
    real = await make_key()
    fake = forged_key(real[3:11])
    user: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello"}]
    async with anthropic_client(stack, fake, "x-api-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
            await client.messages.create(model=MODEL, max_tokens=5, messages=user)
    assert unauthenticated.value.status_code == 401
    assert_anthropic_error(unauthenticated.value.body, "authentication_error")

    limited = await make_key(models="llama3.2")
    async with anthropic_client(stack, limited, "bearer") as client:
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            await client.messages.create(model="qwen3:8b", max_tokens=5, messages=user)
    assert denied.value.status_code == 403
    assert_anthropic_error(denied.value.body, "permission_error")
    assert await simulator.requests() == []

    slow = await make_key(rpm=2)
    async with anthropic_client(stack, slow, "x-api-key") as client:
        for _ in range(2):
            await client.messages.create(model=MODEL, max_tokens=5, messages=user)
        with pytest.raises(anthropic.RateLimitError) as limited_out:
            await client.messages.create(model=MODEL, max_tokens=5, messages=user)
    assert limited_out.value.status_code == 429
    assert 1 <= int(limited_out.value.response.headers["retry-after"]) <= 61
    assert_anthropic_error(limited_out.value.body, "rate_limit_error")
    assert [r["path"] for r in await finished_records(http, stack, 2)] == [MESSAGES, MESSAGES]

    await simulator.reset()
    body = {"model": MODEL, "max_tokens": 40, "messages": user}
    tpm = await prompt_bound(stack, http, body, "anthropic_messages") + 40  # room for one reservation
    thrifty = await make_key(tpm=tpm)
    async with anthropic_client(stack, thrifty, "bearer") as client:

        async def until_refused() -> None:
            for _ in range(5):
                await client.messages.create(model=MODEL, max_tokens=40, messages=user)

        with pytest.raises(anthropic.RateLimitError) as over_tpm:
            await until_refused()
    assert 1 <= int(over_tpm.value.response.headers["retry-after"]) <= 61
    assert_anthropic_error(over_tpm.value.body, "rate_limit_error")
    used = [r["generation"] for r in await simulator.requests()]
    assert 1 <= len(used) < 5
    assert sum(g["prompt_eval_count"] + g["eval_count"] for g in used) <= tpm, used


async def test_a_field_of_the_wrong_type_is_an_anthropic_bad_request(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """`messages` as a string (through the SDK's extra_body, and raw) and `max_tokens` as a string:
    400 invalid_request_error in Anthropic's shape, BadRequestError in the SDK."""
    key = await make_key()
    async with anthropic_client(stack, key, "x-api-key") as client:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(
                model=MODEL, max_tokens=5, messages=[], extra_body={"messages": "hello"}
            )
    assert bad.value.status_code == 400
    assert_anthropic_error(bad.value.body, "invalid_request_error")
    for wrong in ({"messages": "hello"}, {"max_tokens": "5"}):
        body = {**messages_body("hello", 5), **wrong}
        reply = await post(http, stack, MESSAGES, body, {"x-api-key": key})
        assert reply.status == 400, (wrong, reply.body)
        assert_anthropic_error(reply.json(), "invalid_request_error")


async def test_two_different_keys_on_messages_are_refused_and_the_same_key_twice_is_not(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """`Authorization: Bearer` one valid key and `x-api-key` another valid key, or two `x-api-key`
    headers with different keys: 401 authentication_error in Anthropic's shape, and nothing
    reaches the simulator; the same key in both headers is accepted."""
    first, second = await make_key(), await make_key()
    headers = {"Authorization": f"Bearer {first}", "x-api-key": second}
    reply = await post(http, stack, MESSAGES, messages_body("hello", 5), headers)
    assert reply.status == 401, reply.body
    assert_anthropic_error(reply.json(), "authentication_error")
    twice = [("x-api-key", first), ("x-api-key", second)]
    reply = await post(http, stack, MESSAGES, messages_body("hello", 5), twice)
    assert reply.status == 401, reply.body
    assert_anthropic_error(reply.json(), "authentication_error")
    assert await simulator.requests() == []
    same = {"Authorization": f"Bearer {first}", "x-api-key": first}
    reply = await post(http, stack, MESSAGES, messages_body("hello", 5), same)
    assert reply.status == 200, reply.body
    assert reply.json()["type"] == "message"


async def test_other_messages_refusals_are_anthropic_shaped(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """No key at all: 401 authentication_error; an unserved path under /v1/messages
    (`/v1/messages/count_tokens`): 404 not_found_error; Ollama's queue full: 503 overloaded_error
    (the SDK's InternalServerError); a body over Caddy's size limit: 413 in Anthropic's shape."""
    key = await make_key()
    reply = await post(http, stack, MESSAGES, messages_body("hello", 5), {})
    assert reply.status == 401, reply.body
    assert_anthropic_error(reply.json(), "authentication_error")

    reply = await post(http, stack, f"{MESSAGES}/count_tokens", messages_body("hello", 5), bearer(key))
    assert reply.status == 404, reply.body
    assert_anthropic_error(reply.json(), "not_found_error")
    assert await simulator.requests() == []

    await simulator.settings(queue_full=True)
    async with anthropic_client(stack, key, "x-api-key") as client:
        with pytest.raises(anthropic.InternalServerError) as busy:
            await client.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hello"}]
            )
    assert busy.value.status_code == 503
    assert_anthropic_error(busy.value.body, "overloaded_error")

    huge = orjson.dumps(messages_body("x" * (11 * 1024 * 1024), 5))
    reply = await post(http, stack, MESSAGES, huge, bearer(key))
    assert reply.status == 413, reply.body[:300]
    assert_anthropic_error(reply.json(), "request_too_large")


# --- 3. the openai SDK on /v1/responses ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_responses_read_the_simulators_text_and_counts(
    stream: bool,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
) -> None:
    """`responses.create`, streamed and not: the output text is exactly the simulator's, and
    `usage.input_tokens` / `usage.output_tokens` are exactly its prompt_eval_count / eval_count
    (from `response.completed` when streamed)."""
    await simulator.settings(completion_tokens=15)
    key = await make_key()
    async with openai_client(stack, key) as client:
        if stream:
            deltas: list[str] = []
            completed = None
            events = await client.responses.create(
                model=MODEL, input="Say something.", max_output_tokens=ASKED, stream=True
            )
            async for event in events:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                elif event.type == "response.completed":
                    completed = event.response
            assert completed is not None
            text, usage = "".join(deltas), completed.usage
            assert completed.output_text == text
        else:
            response = await client.responses.create(
                model=MODEL, input="Say something.", max_output_tokens=ASKED
            )
            text, usage = response.output_text, response.usage
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    assert (record["path"], generation["stream"], generation["outcome"]) == (RESPONSES, stream, "completed")
    assert generation["eval_count"] == 15
    assert text == simulator_text(record)
    assert text
    assert usage is not None
    assert usage.output_tokens == generation["eval_count"]
    assert usage.input_tokens == generation["prompt_eval_count"]
    no_key_reached_ollama(record, key)


async def test_responses_refusals_are_openai_shaped(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """On /v1/responses: an unknown key is 401, a disallowed model 403, a wrong-typed
    `max_output_tokens` or `stream` 400, a key sent only as `x-api-key` 401, each with an OpenAI
    error body (`{"error":{"message","type",…}}`), never Anthropic's, and none reaches the
    simulator."""
    real = await make_key(models="llama3.2")
    reply = await post(http, stack, RESPONSES, responses_body("hello", 5), bearer(forged_key(real[3:11])))
    assert reply.status == 401, reply.body
    assert "type" not in reply.json()
    assert isinstance(reply.json()["error"]["message"], str)
    reply = await post(http, stack, RESPONSES, responses_body("hello", 5, model="qwen3:8b"), bearer(real))
    assert reply.status == 403, reply.body
    assert "type" not in reply.json()
    assert isinstance(reply.json()["error"]["message"], str)
    # x-api-key is an Anthropic-route convention: elsewhere it is no credential.
    reply = await post(http, stack, RESPONSES, responses_body("hello", 5), {"x-api-key": real})
    assert reply.status == 401, reply.body
    assert "type" not in reply.json()
    assert await simulator.requests() == []
    # A wrong-typed `stream` is Ollama's to refuse: relayed as its OpenAI-shaped 400.
    reply = await post(http, stack, RESPONSES, {**responses_body("hello", 5), "stream": "yes"}, bearer(real))
    assert reply.status == 400, reply.body
    assert_openai_error(reply.json(), "invalid_request_error")


async def test_a_wrong_typed_max_output_tokens_is_refused_not_replaced(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """`max_output_tokens: "5"` (a string) on /v1/responses is a 400 invalid_request_error, as Ollama
    answers it (and as /v1/messages answers `max_tokens: "5"`): the gateway must not replace the
    caller's limit with its default completion limit and have Ollama generate up to that."""
    key = await make_key()
    body = {**responses_body("hello", 5), "max_output_tokens": "5"}
    reply = await post(http, stack, RESPONSES, body, bearer(key))
    forwarded = [orjson.loads(r["body_text"]).get("max_output_tokens") for r in await simulator.requests()]
    assert reply.status == 400, (reply.body, forwarded)
    assert_openai_error(reply.json(), "invalid_request_error")
    assert all(limit == "5" for limit in forwarded), forwarded


# --- 4. metering ---------------------------------------------------------------------------------


async def test_the_ledger_holds_the_simulators_counts_for_both_families(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """/v1/messages and /v1/responses, streamed and not (a model name of its own each): one ledger
    row per request, endpoint the route, status 200, not estimated, with exactly the simulator's
    prompt_eval_count and eval_count."""
    calls = [(route, stream) for route in ROUTES for stream in (False, True)]
    models = [f"llama3.2:f{i:04d}" for i in range(len(calls))]
    await simulator.settings(completion_tokens=17, models=models)
    key = await make_key()
    for (route, stream), model in zip(calls, models, strict=True):
        reply = await post(
            http, stack, route, family_body(route, "count me", stream=stream, model=model), bearer(key)
        )
        assert reply.status == 200, reply.body
    records = await finished_records(http, stack, len(calls))
    generations = {orjson.loads(r["body_text"])["model"]: r for r in records}
    rows = {row["model"]: row for row in await ledger_rows(stack_db, key, len(calls))}
    assert set(rows) == set(models) == set(generations)
    for (route, stream), model in zip(calls, models, strict=True):
        row, record = rows[model], generations[model]
        generation = record["generation"]
        assert (record["path"], generation["stream"], generation["outcome"]) == (route, stream, "completed")
        assert generation["eval_count"] == 17
        assert (row["endpoint"], row["http_status"]) == (route, 200), dict(row)
        assert (row["estimated"], row["estimate_reason"], row["client_disconnected"]) == (False, None, False)
        assert row["prompt_tokens"] == generation["prompt_eval_count"], (model, dict(row))
        assert row["completion_tokens"] == generation["eval_count"], (model, dict(row))


@pytest.mark.parametrize("route", ROUTES)
async def test_a_client_that_disconnects_mid_stream_is_charged_what_it_received(
    *,
    route: Route,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """A client that reads 3 text deltas of a slow stream, then closes: the simulator's generation
    is cancelled well before its end; the ledger row is estimated `client_disconnected` with the
    completion tokens the client received (±1, the chunk in flight; never more than the simulator
    sent) and a non-zero prompt charge."""
    k = 3
    await simulator.settings(tokens_per_second=20, completion_tokens=200)
    key = await make_key()
    data = b""
    async with http.post(
        f"{stack.gateway_url}{route}", json=family_body(route, "go on", 400, stream=True), headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(content_deltas(route, data)) >= k:
                break
        resp.close()
    received = len(content_deltas(route, data))
    assert received >= k
    (record,) = await finished_records(http, stack, 1, wait_seconds=5)
    generation = record["generation"]
    assert generation["outcome"] == "cancelled", generation
    assert generation["tokens_sent"] < 200
    assert generation["eval_count"] is None
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["estimated"], row["estimate_reason"], row["client_disconnected"]) == (
        True,
        "client_disconnected",
        True,
    ), dict(row)
    assert received - 1 <= row["completion_tokens"] <= received + 1, (received, dict(row))
    assert row["completion_tokens"] <= generation["tokens_sent"], (generation, dict(row))
    assert row["prompt_tokens"] > 0
    assert row["endpoint"] == route


@pytest.mark.parametrize("route", ROUTES)
async def test_concurrent_streams_never_overshoot_a_total_budget(
    route: Route, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """30 concurrent streams (completion limit 40, 50 tokens/s so they overlap) on a key with a total
    budget of 2,000: the tokens the simulator delivered (prompt_eval_count + tokens_sent over its
    records) add up to at most 2,000; every forwarded completion limit is 1..40; allowed streams end
    normally; at least one request is refused 429 in the caller's dialect (Anthropic
    rate_limit_error, OpenAI insufficient_quota) and refused requests never reach the simulator."""
    await simulator.settings(tokens_per_second=50, completion_tokens=100)
    key = await make_key(total_tokens=BUDGET)

    async def one(index: int) -> tuple[str, Reply]:
        content = f"q{index:04d}"
        return content, await post(http, stack, route, family_body(route, content, stream=True), bearer(key))

    replies = dict(await asyncio.gather(*(one(i) for i in range(30))))
    allowed = {content for content, reply in replies.items() if reply.status == 200}
    assert 0 < len(allowed) < len(replies)
    last = "message_stop" if route == MESSAGES else "response.completed"
    for content, reply in replies.items():
        if content in allowed:
            assert sse_events(reply.body)[-1]["type"] == last, reply.body[-300:]
            continue
        assert reply.status == 429, reply.body
        if route == MESSAGES:
            assert_anthropic_error(reply.json(), "rate_limit_error")
        else:
            assert_openai_error(reply.json(), "insufficient_quota", "insufficient_quota")
    records = await finished_records(http, stack, len(allowed))
    assert len(records) == len(allowed)
    seen: set[str] = set()
    for record in records:
        body = orjson.loads(record["body_text"])
        seen.add(body["messages"][0]["content"] if route == MESSAGES else body["input"])
        limit = body["max_tokens" if route == MESSAGES else "max_output_tokens"]
        assert 1 <= limit <= ASKED, body
    assert seen == allowed
    delivered = sum(
        (r["generation"]["prompt_eval_count"] or 0) + r["generation"]["tokens_sent"] for r in records
    )
    assert delivered <= BUDGET, delivered


@pytest.mark.parametrize(
    ("route", "asked"),
    [(MESSAGES, 4000), (RESPONSES, 4000), (RESPONSES, None)],
    ids=["messages", "responses", "responses-unlimited"],
)
async def test_the_completion_limit_is_clamped_to_the_budget_left(
    *,
    route: Route,
    asked: int | None,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
) -> None:
    """With a total budget of 2,000, a request asking a completion limit of 4000 (or, on
    /v1/responses, none) is forwarded with a limit that fits the budget: at least 1, and the
    simulator's prompt count plus that limit stays within 2,000."""
    await simulator.settings(completion_tokens=2 * BUDGET)
    key = await make_key(total_tokens=BUDGET)
    body = family_body(route, "clamp me", 4000, stream=False)
    if asked is None:
        del body["max_output_tokens"]
    reply = await post(http, stack, route, body, bearer(key))
    assert reply.status == 200, reply.body
    (record,) = await finished_records(http, stack, 1)
    body = orjson.loads(record["body_text"])
    limit = body["max_tokens" if route == MESSAGES else "max_output_tokens"]
    generation = record["generation"]
    assert generation["completion_limit"] == limit
    assert limit >= 1
    assert generation["prompt_eval_count"] + limit <= BUDGET, (generation, limit)
    assert generation["eval_count"] == limit


WEB_SEARCH: tuple[tuple[Route, dict[str, Any]], ...] = (
    (MESSAGES, {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}),
    (MESSAGES, {"type": "web_search_20260101", "name": "web_search"}),
    (RESPONSES, {"type": "web_search"}),
    (RESPONSES, {"type": "web_search_preview"}),
    (RESPONSES, {"type": "web_search_preview_2025_03_11"}),
    (RESPONSES, {"type": "namespace", "name": "browse", "tools": [{"type": "web_search"}]}),
)


@pytest.mark.parametrize(("route", "tool"), WEB_SEARCH, ids=[t["type"] for _, t in WEB_SEARCH])
async def test_web_search_tools_are_refused_in_the_callers_dialect(
    *,
    route: Route,
    tool: dict[str, Any],
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
) -> None:
    """A web-search tool (beside an ordinary function tool) is 400 invalid_request_error, Anthropic-
    shaped on /v1/messages and OpenAI-shaped on /v1/responses, and the simulator sees nothing."""
    key = await make_key()
    if route == MESSAGES:
        function = {"name": "f", "description": "d", "input_schema": {"type": "object"}}
    else:
        function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    body = {**family_body(route, "search the web", stream=False), "tools": [function, tool]}
    reply = await post(http, stack, route, body, bearer(key))
    assert reply.status == 400, reply.body
    if route == MESSAGES:
        assert_anthropic_error(reply.json(), "invalid_request_error")
    else:
        assert_openai_error(reply.json(), "invalid_request_error")
    assert await simulator.requests() == []


async def test_web_search_through_the_sdks_is_a_bad_request(
    stack: Stack, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """The SDKs' own web-search tool types raise BadRequestError and never reach the simulator."""
    key = await make_key()
    async with anthropic_client(stack, key, "bearer") as client:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(
                model=MODEL,
                max_tokens=5,
                messages=[{"role": "user", "content": "search"}],
                tools=[{"type": "web_search_20250305", "name": "web_search"}],
            )
    async with openai_client(stack, key) as oclient:
        with pytest.raises(openai.BadRequestError):
            await oclient.responses.create(model=MODEL, input="search", tools=[{"type": "web_search"}])
    assert await simulator.requests() == []


# --- 5. / like Ollama ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_root_answers_ollama_is_running_without_a_key(
    method: str, stack: Stack, http: aiohttp.ClientSession, simulator: SimulatorControl
) -> None:
    """`GET /` and `HEAD /` through Caddy without a key: 200 text/plain; charset=utf-8, `Ollama is
    running` (HEAD: no body), answered by Caddy without reaching the simulator."""
    async with http.request(method, f"{stack.gateway_url}/") as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == (b"Ollama is running" if method == "GET" else b"")
    assert await simulator.requests() == []


# --- 6. anthropic-ratelimit-* --------------------------------------------------------------------


def reset_time(value: str) -> dt.datetime:
    """An RFC 3339 time."""
    assert RFC3339.match(value), value
    return dt.datetime.fromisoformat(value)


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_answers_carry_anthropic_ratelimit_headers(
    stream: bool, stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With rpm 10 and tpm 10000: an allowed /v1/messages answer carries
    anthropic-ratelimit-requests-{limit,remaining,reset} (10, below 10, an RFC 3339 time within
    the next minute) and anthropic-ratelimit-tokens-* (10000, below 10000, RFC 3339), and no
    x-ratelimit-* header; a /v1/responses answer of the same key carries x-ratelimit-* and no
    anthropic-ratelimit-*."""
    key = await make_key(rpm=10, tpm=10_000)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    reply = await post(http, stack, MESSAGES, messages_body("hello", 20, stream=stream), bearer(key))
    after = dt.datetime.now(dt.UTC)  # admitted in between: the window resets ≤ 61 s after that
    assert reply.status == 200, reply.body
    headers = reply.headers
    assert not [n for n in headers if n.lower().startswith("x-ratelimit-")], dict(headers)
    for kind, limit in (("requests", 10), ("tokens", 10_000)):
        assert headers[f"anthropic-ratelimit-{kind}-limit"] == str(limit)
        assert 0 <= int(headers[f"anthropic-ratelimit-{kind}-remaining"]) < limit
        reset = reset_time(headers[f"anthropic-ratelimit-{kind}-reset"])
        assert before <= reset <= after + dt.timedelta(seconds=62), (kind, reset, before, after)
    assert headers["anthropic-ratelimit-requests-remaining"] == "9"

    other = await post(http, stack, RESPONSES, responses_body("hello", 20), bearer(key))
    assert other.status == 200, other.body
    assert not [n for n in other.headers if n.lower().startswith("anthropic-ratelimit-")]
    assert other.headers["x-ratelimit-limit-requests"] == "10"
    assert other.headers["x-ratelimit-limit-tokens"] == "10000"


async def test_a_key_sent_as_x_api_key_reaches_no_log(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A valid key in x-api-key (SDK, streamed and not), a forged one, and two different keys at
    once: the secret part of none of them appears in any log file of the stack (Caddy redacts
    Authorization by itself, not x-api-key)."""
    valid, other = await make_key(), await make_key()
    fake = forged_key(valid[3:11])
    user: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello"}]
    async with anthropic_client(stack, valid, "x-api-key") as client:
        await client.messages.create(model=MODEL, max_tokens=5, messages=user)
        async with client.messages.stream(model=MODEL, max_tokens=5, messages=user) as stream:
            await stream.get_final_text()
    async with anthropic_client(stack, fake, "x-api-key") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model=MODEL, max_tokens=5, messages=user)
    reply = await post(
        http,
        stack,
        MESSAGES,
        messages_body("hi", 5),
        {"x-api-key": valid, "Authorization": f"Bearer {other}"},
    )
    assert reply.status == 401
    await asyncio.sleep(0.5)  # let the processes write their log lines
    start = len(key_format.KEY_SCHEME) + key_format.PREFIX_LEN
    secrets = {
        token[start : start + key_format.RANDOM_LEN]: name
        for token, name in ((valid, "valid"), (other, "other"), (fake, "forged"))
    }
    found = []
    for path in stack.logs.rglob("*.log"):
        text = path.read_text(errors="replace")
        found += [(path.name, name) for secret, name in secrets.items() if secret in text]
    assert found == []
