"""Token budgets and rate-limit headers through the real Caddy: zero overshoot under concurrent
streams for a key's and for a tenant's total budget, the clamped completion limit Ollama receives,
the budget and RPM refusals, and the x-ratelimit-* headers of allowed responses."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import attrs
import coredis
import orjson
import pytest
from multidict import CIMultiDict

from shared import admin
from shared import keys as key_format
from shared.db import asyncpg_dsn
from shared.redis_keys import RedisKeys
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, prompt_bound

pytestmark = pytest.mark.e2e

MODEL = "llama3.2"
WAIT_SECONDS = 10.0
# A prompt of llama3.2's template is bounded at ~400 tokens (a token per byte): this budget holds a few.
BUDGET = 2000
# Tokens per second the simulator streams in the burst tests: each admitted stream (40 tokens)
# lasts 2 s, longer than the burst takes to be admitted or refused.
STREAMED = 20
ASKED = 40
RESETS = re.compile(r"^[0-9]+s$")  # x-ratelimit-reset-*: whole seconds


@attrs.frozen
class Reply:
    """One finished HTTP exchange through the gateway."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON (the whole body for errors and non-streamed answers)."""
        return orjson.loads(self.body)


def chat(content: str, num_predict: int, *, stream: bool = True) -> dict[str, Any]:
    """A native /api/chat body with one user message and a completion limit."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "options": {"num_predict": num_predict},
        "stream": stream,
    }


def openai_chat(content: str, max_tokens: int) -> dict[str, Any]:
    """A streamed /v1/chat/completions body with one user message and max_tokens."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def send(http: aiohttp.ClientSession, stack: Stack, path: str, key: str, body: Any = None) -> Reply:
    """POST (or GET without a body) through Caddy and read the whole answer."""
    headers = {"Authorization": f"Bearer {key}"}
    method = "GET" if body is None else "POST"
    async with http.request(method, f"{stack.gateway_url}{path}", json=body, headers=headers) as resp:
        return Reply(resp.status, CIMultiDict(resp.headers), await resp.read())


@attrs.frozen
class Generation:
    """One inference that reached the simulator."""

    path: str
    content: str
    completion_limit: int | None
    tokens: int  # prompt_eval_count + eval_count, as the simulator reported them


async def generations(simulator: SimulatorControl) -> list[Generation]:
    """Every inference request the simulator received since its reset."""
    found = []
    for record in await simulator.requests():
        if record["path"] not in ("/api/chat", "/v1/chat/completions"):
            continue
        body = orjson.loads(record["body_text"])
        generation = record["generation"]
        assert generation is not None, record
        if record["path"] == "/api/chat":
            limit = body.get("options", {}).get("num_predict")
        else:
            limit = body.get("max_tokens")
        tokens = (generation["prompt_eval_count"] or 0) + (generation["eval_count"] or 0)
        found.append(Generation(record["path"], body["messages"][0]["content"], limit, tokens))
    return found


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll until `check()` holds; fail after WAIT_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_SECONDS} s")
        await asyncio.sleep(0.05)


@attrs.frozen
class Store:
    """The stack's Postgres and Redis, to find ids and read counters."""

    conn: asyncpg.Connection
    redis: coredis.Redis[bytes]
    keys: RedisKeys

    async def ids(self, token: str) -> tuple[int, int]:
        """(tenant id, key id) of a token."""
        start = len(key_format.KEY_SCHEME)
        row = await self.conn.fetchrow(
            "SELECT tenant_id, id FROM api_keys WHERE prefix = $1",
            token[start : start + key_format.PREFIX_LEN],
        )
        assert row is not None
        return int(row["tenant_id"]), int(row["id"])

    async def total_counter(self, tenant_id: int, scope: str) -> int | None:
        """The total-budget counter of a scope (`k<id>` or `t`)."""
        raw = await self.redis.get(self.keys.budget(tenant_id, scope, "total", "1970-01-01"))
        return None if raw is None else int(raw)

    async def tpm_used(self, tenant_id: int, scope: str) -> int:
        """Tokens in a scope's TPM window."""
        window = await self.redis.hgetall(self.keys.tpm(tenant_id, scope))
        return sum(int(v) for v in window.values())


@pytest.fixture
async def store(stack: Stack) -> AsyncIterator[Store]:
    """A Postgres connection to the stack's database (the Redis client is opened per test)."""
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        yield Store(
            conn, coredis.Redis.from_url(stack.redis_url), RedisKeys(stack.env["GATEWAY_REDIS_PREFIX"])
        )
    finally:
        await conn.close()


def assert_budget_refusal(reply: Reply, scopes: tuple[str, ...]) -> None:
    """429 for a spent budget of one of `scopes`, Ollama-shaped (refused by the sidecar or by the
    reservation)."""
    assert reply.status == 429, reply.body
    assert reply.json() in [
        *({"error": f"{who} total token budget exhausted"} for who in scopes),  # admission: at the limit
        *({"error": f"{who} token budget exhausted"} for who in scopes),  # reservation: prompt + 1 misses
    ]


async def burst(
    http: aiohttp.ClientSession, stack: Stack, tokens: list[str], per_key: int
) -> dict[str, tuple[str, Reply]]:
    """`per_key` streamed chats for each key at once; content -> (key, reply). Every prompt is "q"
    and four digits: the same prompt bound for all, and each request recognisable in the simulator's
    record."""
    work = [(token, f"q{len(tokens) * i + n:04d}") for i in range(per_key) for n, token in enumerate(tokens)]

    async def one(token: str, content: str) -> tuple[str, tuple[str, Reply]]:
        return content, (token, await send(http, stack, "/api/chat", token, chat(content, ASKED)))

    return dict(await asyncio.gather(*(one(token, content) for token, content in work)))


async def assert_no_overshoot(
    simulator: SimulatorControl,
    store: Store,
    replies: dict[str, tuple[str, Reply]],
    scopes: tuple[str, ...],
    counter: tuple[int, str],
    *,
    expected: int,
) -> None:
    """Allowed streams completed, refused ones never reached the simulator, the simulator's tokens stay
    within the budget, and the budget counter settles at exactly those tokens.

    Every stream outlives the burst, so no reservation is settled while requests are admitted: the
    budget admits exactly k = BUDGET // (bound + ASKED) full reservations, plus one clamped below
    ASKED when what is left still holds the prompt bound + 1 (`expected`)."""
    allowed = {c for c, (_, r) in replies.items() if r.status == 200}
    assert len(allowed) == expected, (len(allowed), expected)
    for content, (_, reply) in replies.items():
        if content in allowed:
            assert reply.body.splitlines()[-1].startswith(b'{"model"'), reply.body[-200:]
            assert orjson.loads(reply.body.splitlines()[-1])["done"] is True
        else:
            assert_budget_refusal(reply, scopes)

    seen = await generations(simulator)
    assert sorted(g.content for g in seen) == sorted(allowed)
    used = sum(g.tokens for g in seen)
    assert used <= BUDGET
    assert all(g.completion_limit is not None and 1 <= g.completion_limit <= ASKED for g in seen), seen

    async with store.redis:

        async def settled() -> bool:
            return await store.total_counter(*counter) == used

        await until(settled, f"the budget counter {counter} settles at the {used} tokens used")


async def admitted(stack: Stack, http: aiohttp.ClientSession) -> int:
    """How many of a burst of chat("q…", ASKED) the budget admits before any of them settles."""
    bound = await prompt_bound(stack, http, chat("q0000", ASKED))
    full, left = divmod(BUDGET, bound + ASKED)
    return full + (1 if left >= bound + 1 else 0)


async def test_concurrent_streams_never_overshoot_a_key_total_budget(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl, store: Store
) -> None:
    """30 concurrent streamed /api/chat requests (num_predict 40, streams overlapping at 20 tokens/s)
    with a key whose total budget is 2,000: the tokens the simulator reported (prompt_eval_count +
    eval_count) add up to at most 2,000, every refused request got 429 for the spent budget and none
    of them reached the simulator, and the key's budget counter settles at the tokens used."""
    await simulator.settings(tokens_per_second=STREAMED, completion_tokens=100)
    token = await make_key(total_tokens=BUDGET)
    tenant_id, key_id = await store.ids(token)
    replies = await burst(http, stack, [token], per_key=30)
    expected = await admitted(stack, http)
    await assert_no_overshoot(
        simulator, store, replies, ("key",), (tenant_id, f"k{key_id}"), expected=expected
    )


async def test_concurrent_streams_never_overshoot_a_tenant_total_budget_shared_by_three_keys(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl, store: Store
) -> None:
    """A tenant total budget of 2,000 shared by three keys without budgets of their own, 10 concurrent
    streams per key all at once: at most 2,000 tokens reach the simulator's counts, refusals are 429
    for the tenant's budget and never reach the simulator, and the tenant counter settles at the
    tokens used."""
    await simulator.settings(tokens_per_second=STREAMED, completion_tokens=100)
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    first = await make_key(tenant=tenant)
    await admin.set_limits(store.conn, tenant=tenant, limits={"total_tokens": admin.LimitChange(BUDGET)})
    tokens = [first, await make_key(tenant=tenant), await make_key(tenant=tenant)]
    tenant_id, _ = await store.ids(first)
    replies = await burst(http, stack, tokens, per_key=10)
    assert {token for token, _ in replies.values()} == set(tokens)
    # A key without a budget of its own inherits the tenant's as its own key-level limit too: when
    # one key has used all of the tenant's tokens, both scopes are equally spent and the refusal
    # may name the key.
    expected = await admitted(stack, http)
    await assert_no_overshoot(
        simulator, store, replies, ("tenant", "key"), (tenant_id, "t"), expected=expected
    )


async def test_the_completion_limit_forwarded_is_clamped_to_the_budget_left(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl, store: Store
) -> None:
    """With a total budget of the /v1 prompt bound + 61: a first chat asking num_predict 40 is forwarded with
    40; once it is settled, a /v1 stream asking max_tokens 40 is forwarded with max_tokens = budget
    left - prompt bound (< 40); then a request whose prompt bound + 1 no longer fits gets 429
    insufficient_quota (OpenAI-shaped) and never reaches the simulator."""
    await simulator.settings(completion_tokens=100)
    first_bound = await prompt_bound(stack, http, chat("q0001", ASKED))
    bound = await prompt_bound(stack, http, openai_chat("q0002", ASKED), "openai_chat")
    assert await prompt_bound(stack, http, openai_chat("q0003", ASKED), "openai_chat") == bound
    budget = bound + 61
    assert first_bound + ASKED <= budget  # the first request is not clamped
    token = await make_key(total_tokens=budget)
    tenant_id, key_id = await store.ids(token)
    async with store.redis:

        async def settled_at(tokens: int) -> None:
            async def check() -> bool:
                return await store.total_counter(tenant_id, f"k{key_id}") == tokens

            await until(check, f"the budget counter settles at {tokens}")

        first = await send(http, stack, "/api/chat", token, chat("q0001", ASKED))
        assert first.status == 200, first.body
        (one,) = await generations(simulator)
        assert one.completion_limit == ASKED
        await settled_at(one.tokens)

        clamped = budget - one.tokens - bound
        assert 1 <= clamped < ASKED  # the budget left really clamps the next request
        second = await send(http, stack, "/v1/chat/completions", token, openai_chat("q0002", ASKED))
        assert second.status == 200, second.body
        assert second.body.endswith(b"data: [DONE]\n\n")
        first_again, two = await generations(simulator)
        assert first_again == one
        assert (two.path, two.completion_limit) == ("/v1/chat/completions", clamped)
        await settled_at(one.tokens + two.tokens)

        assert budget - one.tokens - two.tokens < bound + 1
        third = await send(http, stack, "/v1/chat/completions", token, openai_chat("q0003", ASKED))
        assert third.status == 429, third.body
        assert third.json() == {
            "error": {
                "message": "key token budget exhausted",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
        assert [g.content for g in await generations(simulator)] == ["q0001", "q0002"]


async def test_allowed_responses_carry_the_rate_limit_headers(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl, store: Store
) -> None:
    """With rpm 10 and tpm 10000 on the key, allowed answers carry x-ratelimit-limit/remaining/reset
    for requests and tokens: 10 / 9 / a reset in whole seconds, and 10000 / 10000 - the tokens
    reserved for this request; the next request (once the first is settled) shows 8 requests and
    10000 - used - reserved tokens. A key without rate limits gets none of these headers."""
    await simulator.settings(completion_tokens=100)
    token = await make_key(rpm=10, tpm=10_000)
    tenant_id, key_id = await store.ids(token)
    body = chat("q0001", 20, stream=False)
    reserved = await prompt_bound(stack, http, body) + 20

    first = await send(http, stack, "/api/chat", token, body)
    assert first.status == 200, first.body
    headers = first.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert RESETS.match(headers["x-ratelimit-reset-requests"])
    assert 1 <= int(headers["x-ratelimit-reset-requests"][:-1]) <= 61
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - reserved)
    assert RESETS.match(headers["x-ratelimit-reset-tokens"])
    assert 1 <= int(headers["x-ratelimit-reset-tokens"][:-1]) <= 61

    (one,) = await generations(simulator)
    async with store.redis:

        async def settled() -> bool:
            return await store.tpm_used(tenant_id, f"k{key_id}") == one.tokens

        await until(settled, "the TPM window holds the first request's actual tokens")
    second_body = openai_chat("q0002", 30)
    second = await send(http, stack, "/v1/chat/completions", token, second_body)
    assert second.status == 200, second.body
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    expected = 10_000 - one.tokens - (await prompt_bound(stack, http, second_body, "openai_chat") + 30)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(expected)

    plain = await make_key()
    unlimited = await send(http, stack, "/api/chat", plain, body)
    assert unlimited.status == 200, unlimited.body
    assert not [name for name in unlimited.headers if name.lower().startswith("x-ratelimit-")]


async def test_an_rpm_refusal_carries_retry_after_and_never_reaches_the_simulator(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With rpm 2, the third and fourth requests get 429 rate_limit_exceeded with a Retry-After of
    1..61 s, OpenAI-shaped on /v1 and Ollama-shaped on /api, and neither reaches the simulator."""
    token = await make_key(rpm=2)
    for _ in range(2):
        assert (await send(http, stack, "/api/tags", token)).status == 200
    refused = [
        await send(http, stack, "/v1/chat/completions", token, openai_chat("q0001", 5)),
        await send(http, stack, "/api/chat", token, chat("q0002", 5)),
    ]
    for reply in refused:
        assert reply.status == 429, reply.body
        assert 1 <= int(reply.headers["Retry-After"]) <= 61
    message = "key limit on requests per minute reached"
    assert refused[0].json() == {
        "error": {
            "message": message,
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert refused[1].json() == {"error": message}
    assert [r["path"] for r in await simulator.requests()] == ["/api/tags", "/api/tags"]
