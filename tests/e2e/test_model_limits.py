"""Limits scoped to a model pattern ("model rules", docs/ARCHITECTURE.md#model-limits) through the real
Caddy, sidecar and stream_proxy, against the simulator with two models installed: `big:70b` (under a
rule on `big:*`) and `small:1b` (under none).

Rules are written straight into `model_limits` before a key's first request (the sidecar loads a
key's rules when it first verifies it). The verdicts come from what the simulator recorded and from
the limits set here, never from the gateway's own counters.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from typing import Any, Final

import aiohttp
import asyncpg
import attrs
import orjson
import pytest
from multidict import CIMultiDict

from shared import admin
from shared.model_names import normalise_pattern
from tests.e2e.conftest import (
    KeyFactory,
    SimulatorControl,
    Stack,
    finished_records,
    key_ids,
    prompt_bound,
)

pytestmark = pytest.mark.e2e

BIG: Final = "big:70b"
SMALL: Final = "small:1b"
INSTALLED: Final = [BIG, SMALL]
RULE: Final = normalise_pattern("big:*")
PATHS: Final = {"native": "/api/chat", "openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
LIMIT_COLUMNS: Final = ("rpm", "tpm", "max_concurrent", "daily_tokens", "monthly_tokens", "total_tokens")
RFC3339: Final = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@attrs.frozen
class Reply:
    """One finished exchange through the gateway, with the client-side time it ended."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    ended: float

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    family: str, model: str, content: str, *, limit: int = 8, stream: bool = False
) -> tuple[str, dict[str, Any]]:
    """(path, body) of one chat in a family's own shape, with a completion limit."""
    messages = [{"role": "user", "content": content}]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if family == "native":
        body["options"] = {"num_predict": limit}
    else:
        body["max_tokens"] = limit
    return PATHS[family], body


async def send(
    http: aiohttp.ClientSession, stack: Stack, key: str, call: tuple[str, dict[str, Any]]
) -> Reply:
    """One chat (`request`'s path and body) through Caddy, read to the end."""
    path, body = call
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(f"{stack.gateway_url}{path}", data=orjson.dumps(body), headers=headers) as resp:
        data = await resp.read()
        return Reply(resp.status, CIMultiDict(resp.headers), data, time.monotonic())


async def add_rule(
    conn: asyncpg.Connection, tenant_id: int, pattern: str, key_id: int | None = None, **limits: int
) -> None:
    """A model rule of the tenant (`key_id` None) or of one of its keys; unnamed limits stay NULL."""
    assert set(limits) <= set(LIMIT_COLUMNS), limits
    columns = ", ".join(limits)
    values = ", ".join(f"${n}" for n in range(4, 4 + len(limits)))
    await conn.execute(
        f"INSERT INTO model_limits (tenant_id, key_id, pattern, {columns}) VALUES ($1, $2, $3, {values})",  # noqa: S608 - fixed column names
        tenant_id,
        key_id,
        normalise_pattern(pattern),
        *limits.values(),
    )


def content_of(record: dict[str, Any]) -> str:
    """The user message a recorded request carried (every request of these tests has one)."""
    content: str = orjson.loads(record["body_text"])["messages"][0]["content"]
    return content


def chats(records: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The chat requests of one model among the simulator's records."""
    return [
        r
        for r in records
        if r["path"] in PATHS.values() and orjson.loads(r["body_text"]).get("model") == model
    ]


def refusal_message(family: str, reply: Reply) -> str:
    """The message of a 429, checked to be in the family's own error shape."""
    answer = reply.json()
    if family == "native":
        assert set(answer) == {"error"}, answer
        message: str = answer["error"]
    elif family == "anthropic":
        assert answer["type"] == "error", answer
        assert set(answer) <= {"type", "error", "request_id"}, answer
        assert answer["error"]["type"] == "rate_limit_error", answer
        message = answer["error"]["message"]
    else:
        error = answer["error"]
        assert error["param"] is None, answer
        message = error["message"]
    return message


def openai_error(reply: Reply) -> dict[str, Any]:
    """The error object of an OpenAI-shaped answer."""
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def assert_rpm_refusal(family: str, reply: Reply, limit: int, scopes: tuple[str, ...]) -> None:
    """429 for a model rule's requests per minute, in the family's dialect, naming the rule's
    pattern and limit, with Retry-After and the rule's rate-limit headers."""
    assert reply.status == 429, reply.body[:300]
    message = refusal_message(family, reply)
    assert message in {f"{s} limit of {limit} requests per minute for model {RULE} reached" for s in scopes}
    assert 1 <= int(reply.headers["Retry-After"]) <= 61, reply.headers
    if family == "openai":
        assert openai_error(reply)["type"] == "rate_limit_error"
        assert openai_error(reply)["code"] == "rate_limit_exceeded"
    if family == "anthropic":
        assert reply.headers["anthropic-ratelimit-requests-limit"] == str(limit)
        assert reply.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert RFC3339.match(reply.headers["anthropic-ratelimit-requests-reset"]), reply.headers
        assert not [h for h in reply.headers if h.lower().startswith("x-ratelimit-")]
    else:
        assert reply.headers["x-ratelimit-limit-requests"] == str(limit)
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
        assert re.fullmatch(r"[0-9]+s", reply.headers["x-ratelimit-reset-requests"]), reply.headers


async def new_tenant(make_key: KeyFactory, conn: asyncpg.Connection) -> tuple[str, str, int, int]:
    """(tenant name, key, tenant id, key id) of a fresh tenant with one key."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    key = await make_key(tenant=name)
    tenant_id, key_id = await key_ids(conn, key)
    return name, key, tenant_id, key_id


async def test_a_model_rpm_serves_exactly_its_limit_and_leaves_other_models_and_the_unscoped_rpm_alone(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """Tenant RPM 100 and 5 RPM on `big:*`: 20 big and 20 small requests at once (the big ones over
    native, OpenAI and Anthropic chats) -> exactly 5 big served, 15 refused with 429 in the caller's
    dialect naming the pattern, Retry-After and the rule's request headers; all 20 small served. The
    simulator saw exactly the 5 big and the 20 small. The 15 refusals did not count against the
    tenant's 100: 75 more requests are served and the 76th is refused by the unscoped limit."""
    await simulator.settings(models=INSTALLED)
    name, key, tenant_id, _ = await new_tenant(make_key, stack_db)
    await admin.set_limits(stack_db, tenant=name, limits={"rpm": admin.LimitChange(100)})
    await add_rule(stack_db, tenant_id, "big:*", rpm=5)

    # 7 native, 7 OpenAI, 6 Anthropic: with 5 served, every family gets at least one refusal.
    families = ["native"] * 7 + ["openai"] * 7 + ["anthropic"] * 6
    big = {f"big{n:02d}": family for n, family in enumerate(families)}
    small = {f"small{n:02d}": families[n] for n in range(20)}
    work = [(c, f, BIG) for c, f in big.items()] + [(c, f, SMALL) for c, f in small.items()]

    async def one(content: str, family: str, model: str) -> tuple[str, Reply]:
        return content, await send(http, stack, key, request(family, model, content))

    replies = dict(await asyncio.gather(*(one(*w) for w in work)))
    served_big = sorted(c for c in big if replies[c].status == 200)
    assert len(served_big) == 5, Counter(replies[c].status for c in big)
    for content, family in big.items():
        if content not in served_big:
            assert_rpm_refusal(family, replies[content], 5, ("key", "tenant"))
    assert {c: replies[c].status for c in small} == dict.fromkeys(small, 200)
    assert {f for c, f in big.items() if c not in served_big} == {"native", "openai", "anthropic"}

    records = await finished_records(http, stack, 25)
    assert sorted(content_of(r) for r in chats(records, BIG)) == served_big
    assert sorted(content_of(r) for r in chats(records, SMALL)) == sorted(small)

    # 40 admitted, 15 given back: 75 of the tenant's 100 are left, then the unscoped limit refuses.
    more = await asyncio.gather(
        *(send(http, stack, key, request("native", SMALL, f"more{n:02d}")) for n in range(75))
    )
    assert Counter(r.status for r in more) == {200: 75}
    over = await send(http, stack, key, request("native", SMALL, "over"))
    assert over.status == 429, over.body
    assert refusal_message("native", over) in {
        "key limit on requests per minute reached",
        "tenant limit on requests per minute reached",
    }
    records = await finished_records(http, stack, 100)
    assert len(chats(records, SMALL)) == 95
    assert len(chats(records, BIG)) == 5


# The daily-budget burst: big streams ask ASKED tokens at STREAMED tokens a second, so every admitted
# stream outlives the burst's admissions (no reservation settles while the others are decided).
ASKED: Final = 200
STREAMED: Final = 50
BURST: Final = 30


@pytest.mark.parametrize("budget", [300, 1700])
async def test_a_model_daily_budget_is_never_overshot_and_the_ledger_matches_the_simulator(  # noqa: PLR0917 - fixtures
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
    budget: int,
) -> None:
    """A tenant's daily budget on `big:*`, 30 concurrent OpenAI streams on big:70b asking 200 tokens
    each and meanwhile 10 native streams on small:1b: what the simulator's runner handled for big
    (prompt + completion, worst-case tokenizer) stays within the budget; the small streams all finish;
    the refused big ones get 429 insufficient_quota naming the pattern and never reach the simulator;
    once settled, the ledger's tokens for big and the tenant's model_budget_periods rows equal what
    the simulator counted.

    300 holds no request at all (big's prompt bound alone is ~400 tokens): everything on big is
    refused, small is untouched. 1,700 holds exactly the reservations that fit before any settles:
    two whole ones and a third whose completion limit is clamped to what is left."""
    await simulator.settings(
        models=INSTALLED, tokenizer="bytes", tokens_per_second=STREAMED, completion_tokens=ASKED + 100
    )
    _, key, tenant_id, key_id = await new_tenant(make_key, stack_db)
    await add_rule(stack_db, tenant_id, "big:*", daily_tokens=budget)
    bigs = {f"b{n:02d}": request("openai", BIG, f"b{n:02d}", limit=ASKED, stream=True) for n in range(BURST)}
    bound = await prompt_bound(stack, http, bigs["b00"][1], "openai_chat")
    assert {await prompt_bound(stack, http, b, "openai_chat") for _, b in bigs.values()} == {bound}
    full, left = divmod(budget, bound + ASKED)
    expected = full + (1 if left >= bound + 1 else 0)

    async def one(content: str, family: str, model: str, limit: int) -> tuple[str, Reply]:
        return content, await send(
            http, stack, key, request(family, model, content, limit=limit, stream=True)
        )

    work = [(c, "openai", BIG, ASKED) for c in bigs] + [(f"s{n:02d}", "native", SMALL, 20) for n in range(10)]
    replies = dict(await asyncio.gather(*(one(*w) for w in work)))
    served = sorted(c for c in bigs if replies[c].status == 200)
    assert len(served) == expected, (len(served), expected, bound)
    assert len(served) < BURST
    for content in bigs:
        reply = replies[content]
        if content in served:
            assert reply.body.endswith(b"data: [DONE]\n\n"), reply.body[-200:]
            continue
        assert reply.status == 429, reply.body[:300]
        error = openai_error(reply)
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert error["message"] in {
            f"{s} daily token budget of {budget} for model {RULE} exhausted" for s in ("key", "tenant")
        }
        assert 1 <= int(reply.headers["Retry-After"]) <= 86_400, reply.headers
    smalls = [c for c in replies if c.startswith("s")]
    assert {c: replies[c].status for c in smalls} == dict.fromkeys(smalls, 200)
    for content in smalls:
        assert orjson.loads(replies[content].body.splitlines()[-1])["done"] is True

    records = await finished_records(http, stack, len(served) + len(smalls), wait_seconds=20)
    on_big = chats(records, BIG)
    assert sorted(content_of(r) for r in on_big) == served
    assert len(chats(records, SMALL)) == len(smalls)
    for record in on_big:
        assert record["generation"]["outcome"] == "completed", record["generation"]
    limits = sorted(r["generation"]["completion_limit"] for r in on_big)
    assert limits == sorted([ASKED] * full + ([left - bound] if left >= bound + 1 else []))
    used = sum(r["generation"]["prompt_tokens"] + r["generation"]["completion_tokens"] for r in on_big)
    assert used <= budget, (used, budget, len(served))

    # Every big request reached stream_proxy and leaves a ledger row (refusals charged 0).
    query = "SELECT count(*) AS n, coalesce(sum(total_tokens), 0) AS tokens FROM usage_ledger "
    query += "WHERE tenant_id = $1 AND model_key = $2"
    row = None
    for _ in range(200):
        row = await stack_db.fetchrow(query, tenant_id, BIG)
        if row is not None and row["n"] >= BURST:
            break
        await asyncio.sleep(0.05)
    assert row is not None
    assert (row["n"], row["tokens"]) == (BURST, used)
    periods = await stack_db.fetch(
        "SELECT scope, scope_id, period, tokens FROM model_budget_periods WHERE model = $1 AND "
        "((scope = 'tenant' AND scope_id = $2) OR (scope = 'key' AND scope_id = $3))",
        BIG,
        tenant_id,
        key_id,
    )
    found = {(p["scope"], p["period"]): p["tokens"] for p in periods}
    rows = {(s, p) for s in ("tenant", "key") for p in ("day", "month", "total")}
    assert set(found) <= rows, found
    assert {r: found.get(r, 0) for r in rows} == dict.fromkeys(rows, used), found


async def test_a_model_concurrency_of_one_refuses_the_second_stream_and_frees_its_lease(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """A key rule of one concurrent stream on `big:*`: of two overlapping big streams, one is refused
    (429 rate_limit_exceeded with Retry-After) while the other runs; right after that stream ended, a
    big and a small stream overlap and both are served, and after that big one ended, the next big
    one is served too (each finished stream gave its lease back)."""
    await simulator.settings(models=INSTALLED, tokens_per_second=10)
    _, key, tenant_id, key_id = await new_tenant(make_key, stack_db)
    await add_rule(stack_db, tenant_id, "big:*", key_id, max_concurrent=1)

    def stream(model: str, content: str) -> Any:
        return send(http, stack, key, request("openai", model, content, limit=10, stream=True))

    first, second = await asyncio.gather(stream(BIG, "first"), stream(BIG, "second"))
    assert sorted([first.status, second.status]) == [200, 429], (first.body, second.body)
    served, refused = (first, second) if first.status == 200 else (second, first)
    assert served.body.endswith(b"data: [DONE]\n\n")
    assert refused.ended < served.ended  # refused while the other stream ran
    error = openai_error(refused)
    assert error == {
        "message": f"key limit of 1 concurrent streams for model {RULE} reached",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    # Until the running stream's lease would expire: at most the stack's lease TTL (30 s by default).
    assert 1 <= int(refused.headers["Retry-After"]) <= 31, refused.headers
    served_first = "first" if first.status == 200 else "second"

    big, small = await asyncio.gather(stream(BIG, "big"), stream(SMALL, "small"))
    assert (big.status, small.status) == (200, 200), (big.body, small.body)
    after = await stream(BIG, "after")
    assert after.status == 200, after.body

    records = await finished_records(http, stack, 4)
    assert sorted(content_of(r) for r in chats(records, BIG)) == sorted([served_first, "big", "after"])
    (on_small,) = chats(records, SMALL)
    (on_big,) = [r for r in records if content_of(r) == "big"]
    # They really overlapped: each was received before the other finished.
    assert on_big["received_at_ns"] < on_small["finished_at_ns"]
    assert on_small["received_at_ns"] < on_big["finished_at_ns"]


async def test_a_key_rule_inherits_the_tenant_rule_and_the_tenant_scope_is_shared(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """A tenant rule of 3 RPM on `big:*` and a key rule on the same pattern setting only tpm: that
    key is held to 3 by its own scope (the refusals name the key: its rule inherited the tenant's
    rpm); the tenant's second key then finds the tenant's 3 used up (refusals name the tenant), while
    its small requests are served."""
    await simulator.settings(models=INSTALLED)
    name, first, tenant_id, first_id = await new_tenant(make_key, stack_db)
    second = await make_key(tenant=name)
    await add_rule(stack_db, tenant_id, "big:*", rpm=3)
    await add_rule(stack_db, tenant_id, "big:*", first_id, tpm=1_000_000)

    replies = await asyncio.gather(
        *(send(http, stack, first, request("native", BIG, f"a{n}")) for n in range(5))
    )
    assert Counter(r.status for r in replies) == {200: 3, 429: 2}
    for reply in replies:
        if reply.status == 429:
            assert_rpm_refusal("native", reply, 3, ("key",))

    others = [
        await send(http, stack, second, request(family, BIG, f"b{family}")) for family in ("native", "openai")
    ]
    for family, reply in zip(("native", "openai"), others, strict=True):
        assert_rpm_refusal(family, reply, 3, ("tenant",))
    assert (await send(http, stack, second, request("native", SMALL, "b-small"))).status == 200

    records = await finished_records(http, stack, 4)
    served = sorted(f"a{n}" for n, r in enumerate(replies) if r.status == 200)
    assert sorted(content_of(r) for r in chats(records, BIG)) == served
    assert [content_of(r) for r in chats(records, SMALL)] == ["b-small"]


# How a client may spell the model a rule covers: Ollama resolves each to big:70b
# (docs/OLLAMA.md#model-names); a body Go and the gateway could read differently is refused whole.
SPELLINGS: Final = (
    "BIG:70B",
    "  big:70b\n",
    "big:70b:local",
    "library/big:70b",
    "registry.ollama.ai/library/big:70b",
    "Registry.Ollama.AI/Library/Big:70b",
)


async def test_no_spelling_of_a_rationed_model_escapes_its_rule(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """A tenant rule of 0 RPM on `big:*`: every spelling of big:70b, in every family, and the key
    spelled in another case, is 429 naming the rule, and none reaches the simulator; a body naming
    the model twice (repeated key, or two cases of it) is 400 before any limit; small:1b is served."""
    await simulator.settings(models=INSTALLED)
    _, key, tenant_id, _ = await new_tenant(make_key, stack_db)
    await add_rule(stack_db, tenant_id, "big:*", rpm=0)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    for family in PATHS:
        for spelling in SPELLINGS:
            reply = await send(http, stack, key, request(family, spelling, f"{family}:{spelling}"))
            assert reply.status == 429, (family, spelling, reply.body[:300])
            assert RULE in refusal_message(family, reply), reply.body[:300]
    path, body = request("native", BIG, "other case of the key")
    body["MODEL"] = body.pop("model")
    async with http.post(f"{stack.gateway_url}{path}", data=orjson.dumps(body), headers=headers) as resp:
        assert resp.status == 429, await resp.text()
    for raw in (
        b'{"model":"small:1b","model":"big:70b","messages":[{"role":"user","content":"x"}]}',
        b'{"model":"small:1b","Model":"big:70b","messages":[{"role":"user","content":"x"}]}',
    ):
        async with http.post(f"{stack.gateway_url}/api/chat", data=raw, headers=headers) as resp:
            assert resp.status == 400, await resp.text()
    assert (await send(http, stack, key, request("native", SMALL, "small"))).status == 200

    records = await finished_records(http, stack, 1)
    assert chats(records, BIG) == []
    assert [orjson.loads(r["body_text"])["model"] for r in records if r["path"] in PATHS.values()] == [SMALL]
