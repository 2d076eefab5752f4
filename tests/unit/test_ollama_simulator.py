"""The Ollama simulator speaks v0.33.0-rc2's wire format byte for byte (docs/OLLAMA.md)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

import ollama_simulator as sim

# 2026-08-21T17:00:00.101234Z, the first timestamp of transcript A.
START_NS = 1_787_331_600_101_234_000
STAMP = "2026-08-21T17:00:00.101234Z"
CREATED = 1_787_331_600
RNG_SEED = 7
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SAY_HI = [{"role": "user", "content": "Say hi"}]
# "Say hi" as llama3.2's template renders it, counted by hand in words mode:
# <|start_header_id|> system <|end_header_id|> Cutting Knowledge Date : December 2023 <|eot_id|>
# (10) <|start_header_id|> user <|end_header_id|> Say hi <|eot_id|> (6) <|start_header_id|>
# assistant <|end_header_id|> (3), plus the BOS.
SAY_HI_PROMPT_TOKENS = 10 + 6 + 3 + 1


@attrs.define
class Sim:
    """A running simulator with a client session pointed at it."""

    session: aiohttp.ClientSession
    root: URL
    recorder: sim.Recorder
    state: sim.SimulatorState

    def url(self, path: str) -> URL:
        route, _, query = path.partition("?")
        return self.root.with_path(route).with_query(query or None)

    def post(self, path: str, body: Any, **kwargs: Any) -> aiohttp.client._RequestContextManager:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.session.post(self.url(path), data=data, allow_redirects=False, **kwargs)

    def get(self, path: str, **kwargs: Any) -> aiohttp.client._RequestContextManager:
        return self.session.get(self.url(path), allow_redirects=False, **kwargs)


def rng_ids(count: int) -> list[int]:
    """The first `count` values the simulator's seeded id generator draws (randrange(999))."""
    rng = random.Random(RNG_SEED)  # noqa: S311 - mirrors the simulator's non-secret ids
    return [rng.randrange(999) for _ in range(count)]


@contextlib.asynccontextmanager
async def running(
    settings: sim.SimulatorSettings | None = None,
    *,
    wall_tick_ns: int = 0,
    handler_cancellation: bool = True,
) -> AsyncIterator[Sim]:
    """Serve a simulator with a pinned clock and id generator.

    aiohttp's TestServer always cancels handlers on disconnect; `handler_cancellation=False`
    serves through a plain AppRunner instead, as the CLI does.
    """
    recorder = sim.Recorder()
    clock = sim.FakeClock(start_ns=START_NS, wall_tick_ns=wall_tick_ns)
    rng = random.Random(RNG_SEED)  # noqa: S311 - deterministic ids for byte-exact checks
    app = sim.create_app(settings or sim.SimulatorSettings(), recorder, clock=clock, rng=rng)
    state = app[sim.STATE_KEY]
    if handler_cancellation:
        server = TestServer(app)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                yield Sim(session, server.make_url("/"), recorder, state)
        finally:
            await server.close()
        return
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            yield Sim(session, URL(f"http://127.0.0.1:{port}/"), recorder, state)
    finally:
        await runner.cleanup()


def settings(**changes: Any) -> sim.SimulatorSettings:
    return sim.SimulatorSettings(**changes)


HI = settings(reply=("Hi", "!"), completion_tokens=2)
NATIVE_METRICS = (
    '"total_duration":3000000,"load_duration":1000000,"prompt_eval_count":{p},'
    '"prompt_eval_duration":1000000,"eval_count":{e},"eval_duration":1000000'
)


def metrics(prompt: int, completion: int) -> str:
    return NATIVE_METRICS.format(p=prompt, e=completion)


# --------------------------------------------------------------------------- wire transcripts


async def test_native_chat_stream_is_transcript_a() -> None:
    """Native chat stream (docs/OLLAMA.md#native-api): NDJSON chunks, key order, metrics only on the done
    chunk, Content-Type exact."""
    async with running(HI) as s, s.post("/api/chat", {"model": "llama3.2", "messages": SAY_HI}) as r:
        body = await r.read()
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert "Server" not in r.headers
    expected = (
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
        '"content":"Hi"},"done":false}\n'
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
        '"content":"!"},"done":false}\n'
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
        f'"content":""}},"done":true,"done_reason":"stop",{metrics(SAY_HI_PROMPT_TOKENS, 2)}}}\n'
    )
    assert body.decode() == expected


async def test_created_at_is_stamped_per_chunk() -> None:
    """Each native chunk reads the clock itself (the record's arrival takes the first read)."""
    async with (
        running(HI, wall_tick_ns=12_345_000) as s,
        s.post("/api/chat", {"model": "llama3.2", "messages": SAY_HI}) as r,
    ):
        lines = (await r.read()).decode().splitlines()
    stamps = [json.loads(line)["created_at"] for line in lines]
    assert stamps == [
        "2026-08-21T17:00:00.113579Z",
        "2026-08-21T17:00:00.125924Z",
        "2026-08-21T17:00:00.138269Z",
    ]


async def test_native_generate_non_stream_is_transcript_b() -> None:
    """Native generate, stream false (docs/OLLAMA.md#native-api): one object, charset Content-Type, no
    trailing newline, context before metrics."""
    request = {"model": "llama3.2", "prompt": "Say hi", "stream": False}
    async with running(settings(reply=("Hi", "!"), completion_tokens=2)) as s:
        async with s.post("/api/generate", request) as r:
            body = await r.read()
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
            assert r.headers["Content-Length"] == str(len(body))
        async with s.post("/api/generate", {**request, "raw": True}) as r:
            raw = json.loads(await r.read())
    context = json.loads(body)["context"]
    # r.Tokenize(prompt + response): the prompt's tokens without the BOS, then "Hi" and "!".
    assert len(context) == SAY_HI_PROMPT_TOKENS - 1 + 2
    assert all(isinstance(token, int) for token in context)
    expected = (
        f'{{"model":"llama3.2","created_at":"{STAMP}","response":"Hi!","done":true,'
        f'"done_reason":"stop","context":[{",".join(map(str, context))}],{metrics(SAY_HI_PROMPT_TOKENS, 2)}}}'
    )
    assert body.decode() == expected
    assert "context" not in raw
    assert raw["prompt_eval_count"] == 2 + 1  # raw: "Say hi" as sent, plus the BOS


async def test_openai_chat_stream_with_usage_is_transcript_c() -> None:
    """OpenAI chat stream (docs/OLLAMA.md#openai-api): role only first, a delta:{} finish chunk, the
    choices:[] usage chunk, [DONE]."""
    request = {
        "model": "llama3.2",
        "messages": SAY_HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running(HI) as s, s.post("/v1/chat/completions", request) as r:
        body = await r.read()
        assert r.headers["Content-Type"] == "text/event-stream"
    head = (
        f'data: {{"id":"chatcmpl-{rng_ids(1)[0]}","object":"chat.completion.chunk",'
        f'"created":{CREATED},"model":"llama3.2","system_fingerprint":"fp_ollama",'
    )
    expected = (
        head + '"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},'
        '"finish_reason":null}]}\n\n'
        + head
        + '"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":null}]}\n\n'
        + head
        + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        + head
        + '"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22}}\n\n'
        "data: [DONE]\n\n"
    )
    assert body.decode() == expected


async def test_openai_chat_stream_without_include_usage_has_no_usage() -> None:
    """Without stream_options.include_usage the stream carries no usage and the record no counts."""
    request = {"model": "llama3.2", "messages": SAY_HI, "stream": True}
    async with running(HI) as s:
        async with s.post("/v1/chat/completions", request) as r:
            events = (await r.read()).decode().split("\n\n")
        generation = s.recorder.generations()[0]
    assert events[-2:] == ["data: [DONE]", ""]
    assert "usage" not in "".join(events)
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"
    assert generation.outcome == "completed"
    assert generation.prompt_eval_count is None
    assert generation.eval_count is None


async def test_openai_chat_non_stream_is_transcript_d() -> None:
    """OpenAI chat, no stream (docs/OLLAMA.md#openai-api): stream defaults to false on /v1; usage always
    present; trailing newline, no charset."""
    async with (
        running(HI) as s,
        s.post("/v1/chat/completions", {"model": "llama3.2", "messages": SAY_HI}) as r,
    ):
        body = await r.read()
        assert r.headers["Content-Type"] == "application/json"
    expected = (
        f'{{"id":"chatcmpl-{rng_ids(1)[0]}","object":"chat.completion","created":{CREATED},'
        '"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,'
        '"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22}}\n'
    )
    assert body.decode() == expected


async def test_native_embed_is_transcript_e() -> None:
    """Embeddings (docs/OLLAMA.md#native-api, #openai-api): /api/embed key order and summed prompt_eval_count;
    /v1/embeddings usage mirrors it."""
    inputs = ["Why is the sky blue?", "Why is the grass green?"]
    async with running() as s:
        async with s.post("/api/embed", {"model": "all-minilm", "input": inputs}) as r:
            native = await r.read()
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        async with s.post("/v1/embeddings", {"model": "all-minilm", "input": "hi"}) as r:
            openai = await r.read()
            assert r.headers["Content-Type"] == "application/json"
    parsed = json.loads(native)
    assert list(parsed) == [
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    ]
    assert parsed["prompt_eval_count"] == 16  # 6 tokens + [CLS]/[SEP] per input
    assert [len(v) for v in parsed["embeddings"]] == [384, 384]
    assert abs(sum(x * x for x in parsed["embeddings"][0]) - 1) < 1e-5
    assert not native.endswith(b"\n")
    vector = json.loads(openai)["data"][0]["embedding"]
    expected = (
        '{"object":"list","data":[{"object":"embedding","embedding":'
        + sim.go_json(sim.Float32s(tuple(vector))).decode()
        + ',"index":0}],"model":"all-minilm","usage":{"prompt_tokens":3,"total_tokens":3}}\n'
    )
    assert openai.decode() == expected


async def test_not_found_errors_are_transcript_f() -> None:
    """Errors (docs/OLLAMA.md#error-bodies): native 404 (charset, no newline) and OpenAI-shaped 404
    (newline)."""
    bad = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    async with running() as s:
        async with s.post("/api/chat", bad) as r:
            assert (r.status, r.headers["Content-Type"]) == (404, "application/json; charset=utf-8")
            assert await r.read() == b'{"error":"model \'nope\' not found"}'
        async with s.post("/v1/chat/completions", {**bad, "stream": True}) as r:
            assert (r.status, r.headers["Content-Type"]) == (404, "application/json")
            assert await r.read() == (
                b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
                b'"param":null,"code":null}}\n'
            )
        async with s.post("/api/generate", {"model": "nope", "prompt": "x"}) as r:
            assert await r.read() == b'{"error":"model \'nope\' not found"}'
        async with s.post("/api/embed", {"model": "nope", "input": "x"}) as r:
            assert r.status == 404
            assert await r.read() == b'{"error":"model \\"nope\\" not found, try pulling it first"}'
        async with s.post("/api/show", {"model": "nope"}) as r:
            assert r.status == 404
            assert await r.read() == b'{"error":"model \'nope:latest\' not found"}'
        async with s.get("/v1/models/nope") as r:
            assert r.status == 404
            assert json.loads(await r.read())["error"]["type"] == "not_found_error"


async def test_native_mid_stream_failure_is_transcript_f() -> None:
    """A failure after k chunks writes one {"error"} line and ends with no done chunk."""
    failing = settings(reply=("I",), completion_tokens=5, fail_after_chunks=1)
    async with running(failing) as s:
        async with s.post("/api/chat", {"model": "llama3.2", "messages": SAY_HI}) as r:
            assert r.status == 200
            body = await r.read()
        generation = s.recorder.generations()[0]
    assert body.decode() == (
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
        '"content":"I"},"done":false}\n'
        '{"error":"an error was encountered while running the model: unexpected EOF"}\n'
    )
    assert (generation.outcome, generation.tokens_sent, generation.chunks_sent) == ("failed", 1, 2)
    assert generation.eval_count is None


async def test_failure_before_the_first_chunk_is_a_real_status() -> None:
    """With nothing written yet, a stream error gets a real 500 (no bytes precede the first chunk)."""
    async with running(settings(fail_after_chunks=0)) as s:
        async with s.post("/api/chat", {"model": "llama3.2", "messages": SAY_HI}) as r:
            assert (r.status, r.headers["Content-Type"]) == (500, "application/json")
            assert json.loads(await r.read()) == {"error": s.state.settings.failure_message}
        stream = {"model": "llama3.2", "messages": SAY_HI, "stream": True}
        async with s.post("/v1/chat/completions", stream) as r:
            assert r.status == 500
            assert json.loads(await r.read())["error"]["type"] == "api_error"


async def test_openai_mid_stream_failure_sends_one_junk_chunk() -> None:
    """Mid-stream error quirk (docs/OLLAMA.md#openai-api): the error becomes an empty-model chunk, then no
    finish, usage or [DONE]."""
    failing = settings(reply=("I",), completion_tokens=5, fail_after_chunks=2)
    request = {
        "model": "llama3.2",
        "messages": SAY_HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running(failing) as s, s.post("/v1/chat/completions", request) as r:
        events = (await r.read()).decode().split("\n\n")
    assert len(events) == 4
    assert events[-1] == ""
    junk = events[2]
    assert junk == (
        f'data: {{"id":"chatcmpl-{rng_ids(1)[0]}","object":"chat.completion.chunk",'
        f'"created":{CREATED},"model":"","system_fingerprint":"fp_ollama",'
        '"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}]}'
    )
    assert "[DONE]" not in "".join(events)


async def test_completions_mid_stream_failure_keeps_the_zero_usage() -> None:
    """/v1/completions: the junk chunk has model "" and, with include_usage, the zero usage."""
    failing = settings(completion_tokens=5, fail_after_chunks=1)
    request = {
        "model": "llama3.2",
        "prompt": "Say hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running(failing) as s, s.post("/v1/completions", request) as r:
        events = [e for e in (await r.read()).decode().split("\n\n") if e]
    junk = json.loads(events[-1].removeprefix("data: "))
    assert len(events) == 2
    assert junk["model"] == ""
    assert junk["choices"] == [{"text": "", "index": 0, "finish_reason": None}]
    assert junk["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def test_load_and_unload_shortcuts_are_transcript_g() -> None:
    """Load and unload (docs/OLLAMA.md#routes): an empty prompt loads, empty messages with keep_alive 0
    unload; no counts."""
    async with running() as s:
        async with s.post("/api/generate", {"model": "llama3.2"}) as r:
            load = await r.read()
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        async with s.get("/api/ps") as r:
            loaded = [m["name"] for m in json.loads(await r.read())["models"]]
        unload_request = {"model": "llama3.2", "messages": [], "keep_alive": 0}
        async with s.post("/api/chat", unload_request) as r:
            unload = await r.read()
        async with s.get("/api/ps") as r:
            after = json.loads(await r.read())["models"]
    assert (
        load
        == (
            f'{{"model":"llama3.2","created_at":"{STAMP}","response":"","done":true,"done_reason":"load"}}'
        ).encode()
    )
    assert (
        unload
        == (
            f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
            '"content":""},"done":true,"done_reason":"unload"}'
        ).encode()
    )
    assert loaded == ["llama3.2:latest"]
    assert after == []


# --------------------------------------------------------------------------- OpenAI details


async def test_completions_stream_has_zero_usage_on_every_chunk() -> None:
    """/v1/completions (docs/OLLAMA.md#openai-api): with include_usage every chunk has zero usage; the real
    one comes last, before [DONE]."""
    request = {
        "model": "llama3.2",
        "prompt": "Say hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running(HI) as s:
        async with s.post("/v1/completions", request) as r:
            body = (await r.read()).decode()
        async with s.post("/v1/completions", {**request, "stream_options": None}) as r:
            plain = (await r.read()).decode()
    events = body.split("\n\n")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert events[-2:] == ["data: [DONE]", ""]
    assert [list(c) for c in chunks] == [
        ["id", "object", "created", "choices", "model", "system_fingerprint", "usage"]
    ] * 4
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert [c["usage"] for c in chunks[:3]] == [zero, zero, zero]
    assert [c["choices"] for c in chunks[:3]] == [
        [{"text": "Hi", "index": 0, "finish_reason": None}],
        [{"text": "!", "index": 0, "finish_reason": None}],
        [{"text": "", "index": 0, "finish_reason": "stop"}],
    ]
    assert chunks[3]["choices"] == []
    # /v1/completions becomes /api/generate: "Say hi" renders as in /api/chat (20 tokens).
    assert chunks[3]["usage"] == {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}
    assert "usage" not in plain


async def test_completions_non_stream_shape() -> None:
    """/v1/completions, no stream (docs/OLLAMA.md#openai-api): text_completion object with choices before
    usage, trailing newline."""
    async with (
        running(HI) as s,
        s.post("/v1/completions", {"model": "llama3.2", "prompt": "Say hi"}) as r,
    ):
        body = await r.read()
    assert body.decode() == (
        f'{{"id":"cmpl-{rng_ids(1)[0]}","object":"text_completion","created":{CREATED},'
        '"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"text":"Hi!",'
        '"index":0,"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":2,'
        '"total_tokens":22}}\n'
    )


async def test_include_usage_is_ignored_without_stream() -> None:
    """stream_options only matter when stream is true; non-stream bodies always carry usage."""
    request = {"model": "llama3.2", "messages": SAY_HI, "stream_options": {"include_usage": True}}
    async with running(HI) as s, s.post("/v1/chat/completions", request) as r:
        body = json.loads(await r.read())
    assert body["object"] == "chat.completion"
    assert body["usage"]["total_tokens"] == SAY_HI_PROMPT_TOKENS + 2


async def test_openai_content_parts_become_separate_messages() -> None:
    """openai.FromChatRequest turns each text part into its own user message; the template's
    collate merges them back into one turn, "a b\n\nc" (a, b and c: 3 tokens for 2 for "Say hi")."""
    parts = [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]
    request = {"model": "llama3.2", "messages": [{"role": "user", "content": parts}]}
    async with running(HI) as s, s.post("/v1/chat/completions", request) as r:
        usage = json.loads(await r.read())["usage"]
    assert usage["prompt_tokens"] == SAY_HI_PROMPT_TOKENS - 2 + 3


async def test_openai_validation_errors_use_gin_framing() -> None:
    """/v1 middleware errors: OpenAI shape, 400, but gin's charset and no trailing newline."""
    async with running() as s:
        async with s.post("/v1/chat/completions", b"") as r:
            assert (r.status, r.headers["Content-Type"]) == (400, "application/json; charset=utf-8")
            assert await r.read() == (
                b'{"error":{"message":"EOF","type":"invalid_request_error","param":null,"code":null}}'
            )
        async with s.post("/v1/chat/completions", {"model": "llama3.2", "messages": []}) as r:
            assert json.loads(await r.read())["error"]["message"] == "[] is too short - 'messages'"
        no_model = {"messages": SAY_HI}
        async with s.post("/v1/chat/completions", no_model) as r:
            assert (r.status, r.headers["Content-Type"]) == (400, "application/json")
            assert json.loads(await r.read())["error"]["message"] == "model is required"


async def test_openai_models_listing() -> None:
    """Models (docs/OLLAMA.md#openai-api): /v1/models lists normalised names; /v1/models/{model} echoes the
    path parameter."""
    async with running() as s:
        async with s.get("/v1/models") as r:
            listing = json.loads(await r.read())
        async with s.get("/v1/models/LLAMA3.2") as r:
            single = await r.read()
    assert [m["id"] for m in listing["data"]] == list(sim.DEFAULT_MODELS)
    assert {m["owned_by"] for m in listing["data"]} == {"library"}
    assert single == b'{"id":"LLAMA3.2","object":"model","created":1785585600,"owned_by":"library"}\n'


async def test_openai_models_without_models_is_null() -> None:
    """With no models installed, /v1/models has "data":null (Go's nil slice)."""
    async with running(settings(models=())) as s, s.get("/v1/models") as r:
        assert await r.read() == b'{"object":"list","data":null}\n'


# --------------------------------------------------------------------------- limits and counts


async def test_num_predict_stops_with_length() -> None:
    """options.num_predict below the natural end stops at the limit with done_reason length."""
    async with running(settings(completion_tokens=12)) as s:
        request = {"model": "llama3.2", "messages": SAY_HI, "options": {"num_predict": 5}}
        async with s.post("/api/chat", request) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        async with s.post("/api/chat", {**request, "options": {"num_predict": 50}}) as r:
            final = json.loads((await r.read()).splitlines()[-1])
        async with s.post("/api/chat", {**request, "options": {"NUM_PREDICT": 5}}) as r:
            ignored = json.loads((await r.read()).splitlines()[-1])
    assert len(lines) == 6
    assert (lines[-1]["done_reason"], lines[-1]["eval_count"]) == ("length", 5)
    assert (final["done_reason"], final["eval_count"]) == ("stop", 12)
    assert ignored["eval_count"] == 12  # options is a Go map: its keys are case-sensitive


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_openai_token_limits_stop_with_length(field: str) -> None:
    """max_tokens and max_completion_tokens cap the completion: finish_reason length."""
    request = {"model": "llama3.2", "messages": SAY_HI, field: 3}
    async with running(settings(completion_tokens=12)) as s:
        async with s.post("/v1/chat/completions", request) as r:
            body = json.loads(await r.read())
        generation = s.recorder.generations()[0]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert generation.completion_limit == 3


async def test_eval_count_equals_content_chunks() -> None:
    """One token per chunk: eval_count is the number of content chunks of a normal generation."""
    async with (
        running(settings(completion_tokens=7)) as s,
        s.post("/api/generate", {"model": "llama3.2", "prompt": "hello there"}) as r,
    ):
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert len(lines) == 8
    assert lines[-1]["eval_count"] == 7
    assert lines[-1]["prompt_eval_count"] == SAY_HI_PROMPT_TOKENS  # "hello there": 2 tokens too
    assert all(set(line) == {"model", "created_at", "response", "done"} for line in lines[:-1])


async def test_generate_counts_system_and_context() -> None:
    """The system prompt goes into the template's system block ("be brief": 2 more tokens than
    "Say hi"'s prompt, "hi" 1 fewer); context ids 1, 2, 3 detokenize to three control bytes
    prepended to the prompt, one token each."""
    request = {"model": "llama3.2", "prompt": "hi", "system": "be brief", "context": [1, 2, 3]}
    async with running() as s, s.post("/api/generate", {**request, "stream": False}) as r:
        body = json.loads(await r.read())
    assert body["prompt_eval_count"] == SAY_HI_PROMPT_TOKENS + 2 - 1 + 3


async def test_text_is_deterministic_per_prompt() -> None:
    """The same prompt gives the same words; other prompts start elsewhere in the word list."""
    prompts = ("one", "one", "two", "three", "four", "five")
    async with running() as s:
        texts = []
        for prompt in prompts:
            request = {"model": "llama3.2", "prompt": prompt, "stream": False}
            async with s.post("/api/generate", request) as r:
                texts.append(json.loads(await r.read())["response"])
    assert texts[0] == texts[1]
    assert len(set(texts)) > 2


async def test_thinking_model_thinks_first() -> None:
    """qwen3 thinks by default: thinking chunks first, counted in eval_count; reasoning on /v1."""
    async with running(settings(thinking_tokens=2, completion_tokens=3)) as s:
        async with s.post("/api/chat", {"model": "qwen3:8b", "messages": SAY_HI}) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        request = {"model": "qwen3:8b", "messages": SAY_HI, "stream": True}
        async with s.post("/v1/chat/completions", request) as r:
            events = (await r.read()).decode().split("\n\n")
        async with s.post("/api/chat", {"model": "qwen3:8b", "messages": SAY_HI, "think": False}) as r:
            no_think = [json.loads(line) for line in (await r.read()).splitlines()]
    assert [("thinking" in line["message"]) for line in lines[:-1]] == [True, True, False, False, False]
    assert lines[0]["message"]["content"] == ""
    assert lines[-1]["eval_count"] == 5
    first = json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]
    assert list(first) == ["role", "content", "reasoning"]
    assert no_think[-1]["eval_count"] == 3


async def test_think_on_a_model_without_thinking_is_refused() -> None:
    """think:true on llama3.2 is a 400 naming the model as sent."""
    request = {"model": "llama3.2", "messages": SAY_HI, "think": True}
    async with running() as s, s.post("/api/chat", request) as r:
        assert r.status == 400
        assert await r.read() == b'{"error":"\\"llama3.2\\" does not support thinking"}'


async def test_embedding_model_cannot_chat() -> None:
    """An embedding-only model refuses generate and chat with Ollama's capability errors."""
    async with running() as s:
        async with s.post("/api/chat", {"model": "all-minilm", "messages": SAY_HI}) as r:
            assert (r.status, json.loads(await r.read())) == (
                400,
                {"error": '"all-minilm" does not support chat'},
            )
        async with s.post("/api/generate", {"model": "all-minilm", "prompt": "x"}) as r:
            assert json.loads(await r.read()) == {"error": '"all-minilm" does not support generate'}


async def test_legacy_embeddings_report_no_counts() -> None:
    """/api/embeddings returns only {"embedding": [...]}: no counts or durations."""
    async with running(settings(embedding_dimensions=4)) as s:
        async with s.post("/api/embeddings", {"model": "all-minilm", "prompt": "hi"}) as r:
            body = json.loads(await r.read())
        async with s.post("/api/embeddings", {"model": "all-minilm", "prompt": ""}) as r:
            blank = await r.read()
    assert list(body) == ["embedding"]
    assert len(body["embedding"]) == 4
    assert blank == b'{"embedding":[]}'


async def test_empty_embed_input_only_loads() -> None:
    """/api/embed with no input answers {"model","embeddings":[]} with no metrics."""
    async with running() as s, s.post("/api/embed", {"model": "all-minilm", "input": []}) as r:
        assert await r.read() == b'{"model":"all-minilm","embeddings":[]}'


# --------------------------------------------------------------------------- Go binding


async def test_keys_bind_case_insensitively_last_wins() -> None:
    """Go matches keys case-insensitively and the last duplicate wins."""
    body = b'{"model":"nope","MODEL":"llama3.2","Messages":[{"ROLE":"user","Content":"hi"}],"STREAM":false}'
    async with running() as s, s.post("/api/chat", body) as r:
        assert r.status == 200
        assert json.loads(await r.read())["model"] == "llama3.2"


async def test_model_names_match_case_insensitively_with_latest() -> None:
    """Installed models match case-insensitively, with :latest as the default tag; echo is verbatim."""
    async with running() as s:
        for name in ("LLAMA3.2", "llama3.2:LATEST", "library/llama3.2", "Qwen3:8B"):
            request = {"model": name, "prompt": "x", "stream": False}
            async with s.post("/api/generate", request) as r:
                assert r.status == 200, name
                assert json.loads(await r.read())["model"] == name


async def test_bad_bodies_get_go_errors() -> None:
    """Empty body, wrong types and bad durations get Go's 400 texts."""
    async with running() as s:
        async with s.post("/api/chat", b"") as r:
            assert (r.status, await r.read()) == (400, b'{"error":"missing request body"}')
        async with s.post("/api/chat", {"model": "llama3.2", "stream": "yes"}) as r:
            assert json.loads(await r.read()) == {
                "error": "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"
            }
        native_parts = {"model": "llama3.2", "messages": [{"role": "user", "content": []}]}
        async with s.post("/api/chat", native_parts) as r:
            assert json.loads(await r.read()) == {
                "error": "json: cannot unmarshal array into Go struct field "
                "Message.messages.content of type string"
            }
        async with s.post("/api/generate", {"model": "llama3.2", "keep_alive": "10"}) as r:
            assert json.loads(await r.read()) == {"error": 'time: missing unit in duration "10"'}
        async with s.post("/api/chat", b'{"model":') as r:
            assert json.loads(await r.read()) == {"error": "unexpected EOF"}
        async with s.post("/api/chat", {"messages": SAY_HI}) as r:
            assert json.loads(await r.read()) == {"error": "model is required"}
        async with s.post("/api/generate", {"prompt": "x"}) as r:
            assert (r.status, json.loads(await r.read())) == (404, {"error": "model '' not found"})
        raw = {"model": "llama3.2", "prompt": "x", "raw": True, "system": "s"}
        async with s.post("/api/generate", raw) as r:
            assert json.loads(await r.read()) == {
                "error": "raw mode does not support template, system, or context"
            }


async def test_go_html_escaping_in_output() -> None:
    """Output escapes <, >, & and U+2028/2029 as \\u003c etc., like Go's encoder."""
    escaping = settings(reply=("<think>", "a&b", "\u2028\u2029"), completion_tokens=3)
    async with (
        running(escaping) as s,
        s.post("/api/generate", {"model": "llama3.2", "prompt": "x", "stream": False}) as r,
    ):
        body = await r.read()
    assert b'"response":"\\u003cthink\\u003ea\\u0026b\\u2028\\u2029"' in body


# --------------------------------------------------------------------------- routing


async def test_gin_404_405_and_trailing_slash() -> None:
    """gin texts for unknown paths and wrong methods; trailing slashes redirect (307 POST, 301 GET)."""
    async with running() as s:
        async with s.get("/api/nothing") as r:
            assert (r.status, r.headers["Content-Type"], await r.read()) == (
                404,
                "text/plain",
                b"404 page not found",
            )
        async with s.get("/api/show") as r:
            assert (r.status, r.headers["Content-Type"], await r.read()) == (
                405,
                "text/plain",
                b"405 method not allowed",
            )
        async with s.post("/api/chat/?x=1", {}) as r:
            assert (r.status, r.headers["Location"], await r.read()) == (307, "/api/chat?x=1", b"")
        async with s.get("/api/tags/") as r:
            assert (r.status, r.headers["Location"]) == (301, "/api/tags")
            assert await r.read() == b'<a href="/api/tags">Moved Permanently</a>.\n\n'
        async with s.get("/api/chat/") as r:
            assert r.status == 404
        async with s.session.head(s.url("/api/ps")) as r:
            assert r.status == 405


async def test_root_and_version() -> None:
    """GET and HEAD / answer "Ollama is running"; /api/version reports the configured version."""
    async with running() as s:
        async with s.get("/") as r:
            assert (r.headers["Content-Type"], await r.read()) == (
                "text/plain; charset=utf-8",
                b"Ollama is running",
            )
        async with s.session.head(s.url("/")) as r:
            assert (r.status, r.headers["Content-Length"]) == (200, "17")
        async with s.get("/api/version") as r:
            assert await r.read() == b'{"version":"0.33.0-rc2"}'


async def test_tags_and_show() -> None:
    """/api/tags lists normalised names with details; /api/show accepts the deprecated name."""
    async with running() as s:
        async with s.get("/api/tags") as r:
            models = json.loads(await r.read())["models"]
        async with s.post("/api/show", {"name": "llama3.2"}) as r:
            show = json.loads(await r.read())
        async with s.post("/api/show", {}) as r:
            missing = (r.status, json.loads(await r.read()))
    assert [m["name"] for m in models] == list(sim.DEFAULT_MODELS)
    assert list(models[0]) == ["name", "model", "modified_at", "size", "digest", "details", "capabilities"]
    assert "model_info" in show
    assert show["capabilities"] == ["completion", "tools"]
    assert missing == (400, {"error": "model is required"})


async def test_cloud_models_are_refused_natively() -> None:
    """:cloud and -cloud names get Ollama's 403 in the native shape, even on /v1."""
    async with running() as s:
        async with s.post("/api/chat", {"model": "gpt-oss:120b-cloud", "messages": SAY_HI}) as r:
            assert (r.status, await r.read()) == (
                403,
                b'{"error":"ollama cloud is disabled: remote model is unavailable"}',
            )
        request = {"model": "kimi:cloud", "messages": SAY_HI}
        async with s.post("/v1/chat/completions", request) as r:
            assert r.status == 403
            assert json.loads(await r.read()) == {
                "error": "ollama cloud is disabled: remote model is unavailable"
            }


async def test_queue_full_is_503() -> None:
    """queue_full answers 503 "server busy" natively and as an OpenAI api_error."""
    async with running(settings(queue_full=True)) as s:
        async with s.post("/api/generate", {"model": "llama3.2", "prompt": "x"}) as r:
            assert (r.status, json.loads(await r.read())) == (503, {"error": sim.MSG_QUEUE_FULL})
        async with s.post("/v1/chat/completions", {"model": "llama3.2", "messages": SAY_HI}) as r:
            error = json.loads(await r.read())["error"]
            assert (r.status, error["type"], error["message"]) == (503, "api_error", sim.MSG_QUEUE_FULL)


async def test_host_and_origin_checks() -> None:
    """A foreign Host or Origin gets an empty 403 (loopback listener); the request is recorded."""
    async with running() as s:
        async with s.get("/api/tags", headers={"Host": "ollama.example.com"}) as r:
            assert (r.status, await r.read()) == (403, b"")
        async with s.get("/api/tags", headers={"Host": "localhost:11434"}) as r:
            assert r.status == 200
        async with s.get("/api/tags", headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with s.get("/api/tags", headers={"Origin": "http://localhost:3000"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert [rec.status for rec in s.recorder.records] == [403, 200, 403, 200]


async def test_mutating_endpoints_answer_and_are_recorded() -> None:
    """pull/push/create stream progress to success; copy and delete answer empty 200s; blobs 201."""
    blob = b"hello"
    digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    async with running() as s:
        async with s.post("/api/pull", {"model": "gemma3"}) as r:
            pulled = [json.loads(line) for line in (await r.read()).splitlines()]
        async with s.post("/api/push", {"model": "llama3.2", "stream": False}) as r:
            pushed = await r.read()
        async with s.post("/api/create", {"model": "mine", "from": "llama3.2"}) as r:
            created = [json.loads(line) for line in (await r.read()).splitlines()]
        async with s.post("/api/copy", {"source": "llama3.2", "destination": "copy"}) as r:
            copied = (r.status, await r.read())
        async with s.session.delete(s.url("/api/delete"), json={"model": "copy"}) as r:
            deleted = (r.status, await r.read())
        async with s.session.delete(s.url("/api/delete"), json={"model": "copy"}) as r:
            missing = (r.status, await r.read())
        async with s.post(f"/api/blobs/{digest}", blob) as r:
            assert r.status == 201
        async with s.session.head(s.url(f"/api/blobs/{digest}")) as r:
            assert r.status == 200
        async with s.post(f"/api/blobs/{digest[:-1]}0", blob) as r:
            assert r.status == 400
        async with s.post("/api/me", {}) as r:
            assert r.status == 401
        async with s.get("/api/tags") as r:
            names = [m["name"] for m in json.loads(await r.read())["models"]]
    assert pulled[-1] == {"status": "success"}
    assert pushed == b'{"status":"success"}'
    assert created[-1] == {"status": "success"}
    assert copied == (200, b"")
    assert deleted == (200, b"")
    assert missing == (404, b'{"error":"model \'copy\' not found"}')
    assert {"gemma3:latest", "mine:latest"} <= set(names)
    paths = [record.path for record in s.recorder.records]
    assert paths[:6] == ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/delete"]


async def test_anthropic_and_responses_report_usage() -> None:
    """/v1/messages puts usage in the final message_delta; /v1/responses in response.completed."""
    async with running(HI) as s:
        request = {"model": "llama3.2", "max_tokens": 10, "messages": SAY_HI, "stream": True}
        async with s.post("/v1/messages", request) as r:
            assert r.headers["Cache-Control"] == "no-cache"
            events = (await r.read()).decode().split("\n\n")
        async with s.post("/v1/responses", {"model": "llama3.2", "input": "Say hi"}) as r:
            response = json.loads(await r.read())
    delta = next(e for e in events if e.startswith("event: message_delta"))
    usage = json.loads(delta.split("data: ", 1)[1])["usage"]
    assert usage == {"input_tokens": SAY_HI_PROMPT_TOKENS, "output_tokens": 2}
    assert events[-2] == 'event: message_stop\ndata: {"type":"message_stop"}'
    assert response["usage"]["input_tokens"] == SAY_HI_PROMPT_TOKENS
    assert response["output"][0]["content"][0]["text"] == "Hi!"


# --------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_disconnect_stops_generation(handler_cancellation: bool) -> None:
    """Closing the connection after k chunks stops generation; the record says cancelled, ~k chunks."""
    slow = settings(tokens_per_second=200.0, completion_tokens=10_000)
    async with running(slow, handler_cancellation=handler_cancellation) as s:
        async with s.post("/api/chat", {"model": "llama3.2", "messages": SAY_HI}) as r:
            for _ in range(3):
                assert (await r.content.readline()).startswith(b'{"model"')
            r.close()
        async with asyncio.timeout(5):
            await s.recorder.wait_finished(1)
        generation = s.recorder.generations()[0]
    assert generation.outcome == "cancelled"
    assert 3 <= generation.chunks_sent < 100
    assert generation.eval_count is None


async def test_non_stream_disconnect_is_recorded() -> None:
    """A stream:false client that gives up is recorded as cancelled; nothing was reported."""
    slow = settings(tokens_per_second=200.0, completion_tokens=10_000)
    request = {"model": "llama3.2", "messages": SAY_HI, "stream": False}
    async with running(slow, handler_cancellation=False) as s:
        with pytest.raises(TimeoutError):
            await s.session.post(
                s.url("/api/chat"),
                json=request,
                timeout=aiohttp.ClientTimeout(total=0.3),
            )
        async with asyncio.timeout(5):
            await s.recorder.wait_finished(1)
        generation = s.recorder.generations()[0]
    assert (generation.outcome, generation.chunks_sent) == ("cancelled", 0)
    assert 0 < generation.tokens_sent < 10_000


async def test_no_bytes_before_the_first_chunk() -> None:
    """During the time to first token not even the status line is sent."""
    waiting = settings(time_to_first_token=30.0)
    async with running(waiting) as s:
        with pytest.raises(TimeoutError):
            await s.session.post(
                s.url("/api/chat"),
                json={"model": "llama3.2", "messages": SAY_HI},
                timeout=aiohttp.ClientTimeout(sock_read=0.3),
            )
        async with asyncio.timeout(5):
            await s.recorder.wait_finished(1)
        assert s.recorder.generations()[0].chunks_sent == 0


async def test_openai_disconnect_is_recorded() -> None:
    """An SSE client that goes away is recorded as cancelled with the chunks it got."""
    slow = settings(tokens_per_second=200.0, completion_tokens=10_000)
    request = {"model": "llama3.2", "messages": SAY_HI, "stream": True}
    async with running(slow) as s:
        async with s.post("/v1/chat/completions", request) as r:
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            r.close()
        async with asyncio.timeout(5):
            await s.recorder.wait_finished(1)
        generation = s.recorder.generations()[0]
    assert (generation.outcome, generation.endpoint) == ("cancelled", "/v1/chat/completions")
    assert 2 <= generation.chunks_sent < 100


# --------------------------------------------------------------------------- control API


async def test_control_api_shows_what_reached_the_simulator() -> None:
    """GET /_sim/requests lists method, path, query, headers, body and generation outcome."""
    async with running(HI) as s:
        request = {"model": "llama3.2", "messages": SAY_HI, "stream": False}
        async with s.post("/api/chat?trace=1", request, headers={"X-Test": "yes"}) as r:
            assert r.status == 200
        async with s.get("/_sim/requests?wait_finished=1&timeout=5") as r:
            records = await r.json()
        async with s.get("/_sim/requests?path=/api/tags") as r:
            assert await r.json() == []
    assert len(records) == 1
    record = records[0]
    assert (record["method"], record["path"], record["query"]) == ("POST", "/api/chat", "trace=1")
    assert ["X-Test", "yes"] in record["headers"]
    assert json.loads(record["body_text"]) == request
    assert record["status"] == 200
    assert record["generation"]["outcome"] == "completed"
    assert record["generation"]["prompt_eval_count"] == SAY_HI_PROMPT_TOKENS
    assert record["generation"]["eval_count"] == 2


async def test_control_api_changes_settings_and_resets() -> None:
    """POST /_sim/settings applies at once (chunk counts follow); bad keys are 400; reset restores."""
    async with running() as s:
        async with s.post("/_sim/settings", {"completion_tokens": 4, "tokens_per_second": 1000}) as r:
            assert (await r.json())["completion_tokens"] == 4
        async with s.post("/api/generate", {"model": "llama3.2", "prompt": "x"}) as r:
            assert len((await r.read()).splitlines()) == 5
        async with s.post("/_sim/settings", {"no_such_setting": 1}) as r:
            assert r.status == 400
        async with s.post("/_sim/settings", {"completion_tokens": -1}) as r:
            assert r.status == 400
        async with s.get("/_sim/settings") as r:
            current = await r.json()
        assert (current["completion_tokens"], current["tokens_per_second"]) == (4, 1000.0)
        assert s.recorder.generations()[0].tokens_sent == 4
        async with s.post("/_sim/reset", b"") as r:
            assert (await r.json())["completion_tokens"] == 12
        assert s.recorder.records == []


async def test_max_records_keeps_only_the_newest_requests() -> None:
    """With max_records 2, three requests leave the last two on record (benchmarks keep few)."""
    async with running() as s:
        async with s.post("/_sim/settings", {"max_records": 2}) as r:
            assert r.status == 200
        for prompt in ("one", "two", "three"):
            async with s.post("/api/generate", {"model": "llama3.2", "prompt": prompt, "stream": False}) as r:
                assert r.status == 200
        assert [json.loads(r.body)["prompt"] for r in s.recorder.records] == ["two", "three"]


# --------------------------------------------------------------------------- pure pieces


@given(st.text())
def test_text_tokens_never_exceed_bytes(text: str) -> None:
    """Every words-mode token is at least one character, hence at least one UTF-8 byte."""
    assert sim.count_text_tokens(text) <= len(text.encode())


@given(st.text())
def test_token_ids_round_trip(text: str) -> None:
    """Token ids decode back to the text (how /api/generate's context is prepended again): in
    words mode one id per counted token, in bytes mode the byte values themselves."""
    vocabulary = sim.Vocabulary()
    ids = vocabulary.tokenize(text, "words")
    assert len(ids) == sim.count_text_tokens(text)
    assert vocabulary.detokenize(ids) == text
    assert vocabulary.tokenize(text, "bytes") == list(text.encode())
    assert vocabulary.detokenize(list(text.encode())) == text


def test_prompt_eval_count_formula() -> None:
    """Words mode: a token per <|special|> marker, word run and punctuation mark, whitespace
    riding along (only-whitespace text is one token); bytes mode: a token per UTF-8 byte; the
    runner adds a BOS, and each [img-N] marker is the image's tokens instead of its text."""
    assert sim.count_text_tokens("<|eot_id|>Why is the sky blue?\n\n") == 1 + 5 + 1
    assert sim.count_text_tokens("   ") == 1
    assert sim.count_text_tokens("héllo", "bytes") == 6
    with_images = sim.SimulatorSettings(tokens_per_image=5)
    assert sim.prompt_tokens(sim.Prompt("[img-0]Look at this", 1), with_images) == 3 + 1 + 5
    assert sim.prompt_tokens(sim.Prompt("héllo"), sim.SimulatorSettings(tokenizer="bytes")) == 6 + 1
    assert sim.embed_prompt_tokens(["Why is the sky blue?", "hi"]) == 8 + 3


def test_go_float_formatting() -> None:
    """Floats use Go's shortest form, with an exponent only below 1e-6 or from 1e21 up."""
    assert sim.go_float(0.1) == "0.1"
    assert sim.go_float(3.0) == "3"
    assert sim.go_float(1e-7) == "1e-7"
    assert sim.go_float(1.5e-10) == "1.5e-10"
    assert sim.go_float(1e21) == "1e+21"
    assert sim.go_float(123456789.0) == "123456789"
    assert sim.go_float(0.1, 32) == "0.1"
    assert sim.go_float(sim._to_float32(0.010071029), 32) == "0.010071029"


def test_rfc3339nano_trims_trailing_zeros() -> None:
    """Timestamps are RFC3339Nano in UTC with the fraction's trailing zeros trimmed."""
    assert sim.rfc3339nano(1_787_331_600_126_000_000) == "2026-08-21T17:00:00.126Z"
    assert sim.rfc3339nano(1_787_331_600_000_000_000) == "2026-08-21T17:00:00Z"
    assert sim.rfc3339nano(1_787_331_600_000_000_001) == "2026-08-21T17:00:00.000000001Z"


def test_go_json_is_compact_and_html_escaped() -> None:
    """go_json keeps key order, has no spaces and escapes like Go's json.Marshal."""
    value = {"b": [1, True, None], "a": "<&>\u2028\n\x7f"}
    assert sim.go_json(value) == b'{"b":[1,true,null],"a":"\\u003c\\u0026\\u003e\\u2028\\n\x7f"}'


def test_go_durations() -> None:
    """keep_alive strings parse as Go durations; bare numbers without a unit are errors."""
    assert sim.parse_go_duration("1h30m") == 5_400_000_000_000
    assert sim.parse_go_duration("-1s") == -1_000_000_000
    assert sim.parse_go_duration("1.5ms") == 1_500_000
    with pytest.raises(sim.BindError, match='unknown unit "d"'):
        sim.parse_go_duration("1d")


def test_model_names() -> None:
    """Names parse with Ollama's defaults; bad grammar is rejected; cloud suffixes are detected."""
    name = sim.parse_model_name("LLAMA3.2")
    assert name is not None
    assert (name.key, name.display()) == ("registry.ollama.ai/library/llama3.2:latest", "LLAMA3.2:latest")
    assert sim.parse_model_name("a/b/c/d") is None
    assert sim.parse_model_name("bad name") is None
    assert sim.is_cloud_model("gpt-oss:20b-cloud")
    assert sim.is_cloud_model("kimi:cloud")
    assert not sim.is_cloud_model("llama3.2")


def test_settings_reject_negative_values() -> None:
    """SimulatorSettings validates its numbers at construction."""
    with pytest.raises(ValueError, match="tokens_per_second"):
        sim.SimulatorSettings(tokens_per_second=-1)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_port_and_exits_on_sigterm(tmp_path: Path) -> None:
    """--port 0 binds a free port, writes it to --port-file and stdout; SIGTERM exits cleanly."""
    port_file = tmp_path / "port"
    command = [sys.executable, "-m", "ollama_simulator", "--port", "0", "--port-file", str(port_file)]
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            printed = int(process.stdout.readline())
            assert port_file.read_text() == f"{printed}\n"
            connection = http.client.HTTPConnection("127.0.0.1", printed, timeout=5)
            connection.request("GET", "/")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b"Ollama is running")
            connection.close()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
