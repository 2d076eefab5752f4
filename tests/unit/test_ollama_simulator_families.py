"""Byte-exact fixtures for /v1/messages, /v1/responses and streamed tool calls.

Every expected body below is transcribed by hand from Ollama v0.33.0-rc2's Go source or its
Go tests (the comment beside each fixture names the file and function); none is computed with
the simulator's own functions. Token counts follow the simulator's token model (tokens.py)
over the prompt each model's template renders, counted by hand below; HI's reply "Hi","!" is 2.
Ids come from the seeded random.Random the fixture below also seeds (Go draws math/rand or
crypto/rand there; only the draw order is Ollama's).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
from aiohttp.test_utils import TestServer
from yarl import URL

import ollama_simulator as sim

START_NS = 1_787_331_600_101_234_000
STAMP = "2026-08-21T17:00:00.101234Z"
CREATED = 1_787_331_600
RNG_SEED = 7
SAY_HI = [{"role": "user", "content": "Say hi"}]
HI = {"reply": ("Hi", "!"), "completion_tokens": 2}
CALL_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

# A tool offered on each family; its schema is sent compactly, so its raw bytes are these.
SCHEMA = b'{"type":"object","properties":{"city":{"type":"string"}}}'
SCHEMA_OBJ = json.loads(SCHEMA)
# The call a tool_call model makes: one argument per property, a string is "<name>-1".
ARGS = '{"city":"city-1"}'
ARGS_ESCAPED = '{\\"city\\":\\"city-1\\"}'
# {"name":"get_weather","arguments":{"city":"city-1"}} is 25 tokens of the token model:
# { " name " : " get_weather " , " arguments " : { " city " : " city - 1 " } }
TOOL_TOKENS = 25
# "Say hi" for llama3.2: <|start_header_id|> system <|end_header_id|> Cutting Knowledge Date :
# December 2023 <|eot_id|> (10), <|start_header_id|> user <|end_header_id|> Say hi <|eot_id|> (6),
# <|start_header_id|> assistant <|end_header_id|> (3), and the BOS.
SAY_HI_PROMPT_TOKENS = 20
# For qwen3 (think on by default): <|im_start|> user Say hi / think <|im_end|> <|im_start|> assistant
# (9) and the BOS.
QWEN_SAY_HI_PROMPT_TOKENS = 10
# With the get_weather tool, llama3.2's template adds to the system block "When you receive ...
# capabilities." (31 tokens) and puts in the user turn "Given the following functions, ...
# prompt." (25), "Respond in the format {"name": ... variables." (30) and the tool as
# templateTool's JSON, {"type":"function","function":{"name":"get_weather","description":"",
# "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}} (64: every brace,
# quote, colon and comma is one, every key or value one more). Anthropic, OpenAI and Responses
# tools all become that api.Tool.
TOOLS_PROMPT_TOKENS = 31 + 25 + 30 + 64


@attrs.define
class Sim:
    session: aiohttp.ClientSession
    root: URL
    recorder: sim.Recorder

    def post(self, path: str, body: Any, **kwargs: Any) -> aiohttp.client._RequestContextManager:
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        return self.session.post(self.root.with_path(path), data=data, allow_redirects=False, **kwargs)


@contextlib.asynccontextmanager
async def running(**changes: Any) -> AsyncIterator[Sim]:
    """A simulator with a pinned clock (every read is START_NS) and seeded ids."""
    recorder = sim.Recorder()
    clock = sim.FakeClock(start_ns=START_NS, wall_tick_ns=0)
    rng = random.Random(RNG_SEED)  # noqa: S311 - deterministic ids for byte-exact checks
    app = sim.create_app(sim.SimulatorSettings(**changes), recorder, clock=clock, rng=rng)
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Sim(session, server.make_url("/"), recorder)
    finally:
        await server.close()


class Draws:
    """The seeded generator's draws, in the order the Go code makes them."""

    def __init__(self) -> None:
        self.rng = random.Random(RNG_SEED)  # noqa: S311 - mirrors the simulator's seeded ids

    def hex96(self, prefix: str) -> str:
        """anthropic.generateID: prefix_ and %x of 12 random bytes."""
        return f"{prefix}_{self.rng.getrandbits(96):024x}"

    def intn(self, n: int) -> int:
        """math/rand.Intn(n)."""
        return self.rng.randrange(n)

    def call_id(self) -> str:
        """server/routes.go toolCallId: "call_" and 8 of [a-z0-9]."""
        return "call_" + "".join(self.rng.choice(CALL_LETTERS) for _ in range(8))


def sse(event: str, data: str) -> str:
    """middleware/anthropic.go writeSSE and ResponsesWriter.writeEvent framing."""
    return f"event: {event}\ndata: {data}\n\n"


# --------------------------------------------------------------------------- /v1/messages non-stream


async def test_messages_non_stream_text_end_turn() -> None:
    """ToMessagesResponse (anthropic/anthropic.go; TestToMessagesResponse_Basic): struct field order, no
    stop_sequence (omitempty), done_reason stop -> stop_reason end_turn, encoder newline."""
    request = {"model": "llama3.2", "max_tokens": 10, "messages": SAY_HI}
    async with running(**HI) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
        assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
        assert "Cache-Control" not in r.headers
    ident = Draws().hex96("msg")
    # anthropic.MessagesResponse: id, type, role, model, content, stop_reason, usage.
    assert body.decode() == (
        f'{{"id":"{ident}","type":"message","role":"assistant","model":"llama3.2",'
        '"content":[{"type":"text","text":"Hi!"}],"stop_reason":"end_turn",'
        f'"usage":{{"input_tokens":{SAY_HI_PROMPT_TOKENS},"output_tokens":2}}}}\n'
    )


async def test_messages_non_stream_length_is_max_tokens() -> None:
    """mapStopReason (anthropic/anthropic.go; TestMapStopReason {"length", false, "max_tokens"}): a cut at
    max_tokens (num_predict) reports max_tokens and the cut output."""
    request = {"model": "llama3.2", "max_tokens": 1, "messages": SAY_HI}
    async with running(**HI) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
    ident = Draws().hex96("msg")
    assert body.decode() == (
        f'{{"id":"{ident}","type":"message","role":"assistant","model":"llama3.2",'
        '"content":[{"type":"text","text":"Hi"}],"stop_reason":"max_tokens",'
        f'"usage":{{"input_tokens":{SAY_HI_PROMPT_TOKENS},"output_tokens":1}}}}\n'
    )


async def test_messages_non_stream_tool_use() -> None:
    """ToMessagesResponse (TestToMessagesResponse_WithToolCalls): text then a tool_use block with id,
    name and input (the arguments object); tool calls make stop_reason tool_use."""
    tools = [{"name": "get_weather", "input_schema": SCHEMA_OBJ}]
    request = {"model": "llama3.2", "max_tokens": 100, "messages": SAY_HI, "tools": tools}
    async with running(**HI, tool_call=True) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
    draws = Draws()
    ident, call_id = draws.hex96("msg"), draws.call_id()
    assert body.decode() == (
        f'{{"id":"{ident}","type":"message","role":"assistant","model":"llama3.2",'
        '"content":[{"type":"text","text":"Hi!"},'
        f'{{"type":"tool_use","id":"{call_id}","name":"get_weather","input":{ARGS}}}],'
        '"stop_reason":"tool_use",'
        f'"usage":{{"input_tokens":{SAY_HI_PROMPT_TOKENS + TOOLS_PROMPT_TOKENS},'
        f'"output_tokens":{2 + TOOL_TOKENS}}}}}\n'
    )


# --------------------------------------------------------------------------- /v1/messages stream


def message_start(ident: str, input_tokens: int, model: str = "llama3.2") -> str:
    """StreamConverter.Process first write: MessagesResponse with content [] and no stop_reason."""
    return sse(
        "message_start",
        f'{{"type":"message_start","message":{{"id":"{ident}","type":"message","role":"assistant",'
        f'"model":"{model}","content":[],"usage":{{"input_tokens":{input_tokens},"output_tokens":0}}}}}}',
    )


def block_start(index: int, block: str) -> str:
    return sse(
        "content_block_start",
        f'{{"type":"content_block_start","index":{index},"content_block":{block}}}',
    )


def block_delta(index: int, delta: str) -> str:
    return sse("content_block_delta", f'{{"type":"content_block_delta","index":{index},"delta":{delta}}}')


def block_stop(index: int) -> str:
    return sse("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}')


def message_end(stop_reason: str, input_tokens: int, output_tokens: int) -> str:
    """Process on Done: MessageDeltaEvent (delta, then usage) and MessageStopEvent."""
    return sse(
        "message_delta",
        f'{{"type":"message_delta","delta":{{"stop_reason":"{stop_reason}"}},'
        f'"usage":{{"input_tokens":{input_tokens},"output_tokens":{output_tokens}}}}}',
    ) + sse("message_stop", '{"type":"message_stop"}')


async def test_messages_stream_text_only() -> None:
    """StreamConverter.Process (anthropic/anthropic.go; TestStreamConverter_Basic): message_start, a text
    block opened with "text":"", one text_delta per chunk, stop, message_delta, message_stop.

    message_start's input_tokens is EstimateInputTokens (the chunks carry no prompt_eval_count):
    len("user") + len("Say hi") = 10 bytes, 10/4 = 2; message_delta has the real count.
    """
    request = {"model": "llama3.2", "max_tokens": 10, "messages": SAY_HI, "stream": True}
    async with running(**HI) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
        assert r.headers["Content-Type"] == "text/event-stream"
        assert (r.headers["Cache-Control"], r.headers["Connection"]) == ("no-cache", "keep-alive")
    ident = Draws().hex96("msg")
    assert body.decode() == (
        message_start(ident, 2)
        + block_start(0, '{"type":"text","text":""}')
        + block_delta(0, '{"type":"text_delta","text":"Hi"}')
        + block_delta(0, '{"type":"text_delta","text":"!"}')
        + block_stop(0)
        + message_end("end_turn", SAY_HI_PROMPT_TOKENS, 2)
    )


async def test_messages_stream_thinking_then_text() -> None:
    """Process with a thinking model (TestStreamConverter_ContentBlockStartIncludesEmptyFields): a
    thinking block at index 0 ("thinking":"" on start, thinking_delta), closed when content arrives,
    then the text block at index 1; output_tokens counts thinking too."""
    async with running(**HI, thinking_tokens=2) as s:
        native = {"model": "qwen3:8b", "messages": SAY_HI}
        async with s.post("/api/chat", native) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        request = {"model": "qwen3:8b", "max_tokens": 10, "messages": SAY_HI, "stream": True}
        async with s.post("/v1/messages", request) as r:
            body = await r.read()
    # The thinking words are the simulator's; the same prompt thinks the same two tokens.
    first, second = (line["message"]["thinking"] for line in lines[:2])
    ident = Draws().hex96("msg")
    assert body.decode() == (
        message_start(ident, 2, "qwen3:8b")
        + block_start(0, '{"type":"thinking","thinking":""}')
        + block_delta(0, f'{{"type":"thinking_delta","thinking":{json.dumps(first)}}}')
        + block_delta(0, f'{{"type":"thinking_delta","thinking":{json.dumps(second)}}}')
        + block_stop(0)
        + block_start(1, '{"type":"text","text":""}')
        + block_delta(1, '{"type":"text_delta","text":"Hi"}')
        + block_delta(1, '{"type":"text_delta","text":"!"}')
        + block_stop(1)
        + message_end("end_turn", QWEN_SAY_HI_PROMPT_TOKENS, 4)
    )


async def test_messages_stream_tool_use() -> None:
    """Process with a tool call (TestStreamConverter_WithToolCalls, ..._ContentBlockStartIncludesEmptyFields):
    the text block closes, a tool_use block starts with "input":{}, gets the whole arguments as one
    input_json_delta and stops; no second stop at Done; stop_reason tool_use.

    EstimateInputTokens counts tool name, description and len(input_schema) raw bytes too.
    """
    tools = [{"name": "get_weather", "input_schema": SCHEMA_OBJ}]
    request = {"model": "llama3.2", "max_tokens": 100, "messages": SAY_HI, "tools": tools, "stream": True}
    async with running(**HI, tool_call=True) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
    draws = Draws()
    ident, call_id = draws.hex96("msg"), draws.call_id()
    estimate = (len("user") + len("Say hi") + len("get_weather") + len(SCHEMA)) // 4
    assert estimate == 19
    assert body.decode() == (
        message_start(ident, estimate)
        + block_start(0, '{"type":"text","text":""}')
        + block_delta(0, '{"type":"text_delta","text":"Hi"}')
        + block_delta(0, '{"type":"text_delta","text":"!"}')
        + block_stop(0)
        + block_start(1, f'{{"type":"tool_use","id":"{call_id}","name":"get_weather","input":{{}}}}')
        + block_delta(1, f'{{"type":"input_json_delta","partial_json":"{ARGS_ESCAPED}"}}')
        + block_stop(1)
        + message_end("tool_use", SAY_HI_PROMPT_TOKENS + TOOLS_PROMPT_TOKENS, 2 + TOOL_TOKENS)
    )


async def test_messages_estimate_uses_input_schema_bytes_as_sent() -> None:
    """EstimateCountTokens adds len(tool.InputSchema), a json.RawMessage: the schema's bytes exactly as
    the client sent them, whitespace included (anthropic/anthropic.go EstimateCountTokens)."""
    spaced = b'{"type": "object", "properties": {"city": {"type": "string"}}}'
    body = (
        b'{"model":"llama3.2","max_tokens":10,"stream":true,'
        b'"messages":[{"role":"user","content":"Say hi"}],'
        b'"tools":[{"name":"get_weather","input_schema":' + spaced + b"}]}"
    )
    async with running(**HI) as s, s.post("/v1/messages", body) as r:
        first = (await r.content.readuntil(b"\n\n")).decode()
    estimate = (len("user") + len("Say hi") + len("get_weather") + len(spaced)) // 4
    assert estimate == 20  # (21 + 62) // 4; compacted (57 bytes) it would be 19
    assert f'"usage":{{"input_tokens":{estimate},"output_tokens":0}}' in first


async def test_messages_estimate_counts_system_and_blocks() -> None:
    """EstimateCountTokens: a string system counts its bytes; text and thinking blocks count their text;
    tool_use and tool_result blocks their whole marshalled ContentBlock."""
    messages = [
        {"role": "user", "content": "Say hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ]
    request = {"model": "llama3.2", "max_tokens": 10, "system": "Be brief.", "messages": messages}
    async with running(**HI) as s, s.post("/v1/messages", {**request, "stream": True}) as r:
        first = (await r.content.readuntil(b"\n\n")).decode()
    tool_use = len(b'{"type":"tool_use","id":"t1","name":"f","input":{}}')
    tool_result = len(b'{"type":"tool_result","tool_use_id":"t1","content":"ok"}')
    total = len("Be brief.") + 4 + 6 + len("assistant") + 3 + tool_use + 4 + tool_result
    assert f'"input_tokens":{total // 4},' in first


# --------------------------------------------------------------------------- /v1/messages errors


def anthropic_error(kind: str, message: str, request_id: str) -> str:
    """anthropic.ErrorResponse: type "error", error {type, message}, request_id."""
    return f'{{"type":"error","error":{{"type":"{kind}","message":"{message}"}},"request_id":"{request_id}"}}'


async def test_messages_validation_errors_in_middleware_order() -> None:
    """AnthropicMessagesMiddleware (middleware/anthropic.go; TestAnthropicMessagesMiddleware): model, then
    max_tokens, then messages, then FromMessagesRequest's errors; AbortWithStatusJSON is gin's JSON
    (charset, no trailing newline)."""
    cases = [
        ({"max_tokens": 0, "messages": []}, "model is required"),
        ({"model": "llama3.2", "messages": []}, "max_tokens is required and must be positive"),
        (
            {"model": "llama3.2", "max_tokens": -1, "messages": SAY_HI},
            "max_tokens is required and must be positive",
        ),
        ({"model": "llama3.2", "max_tokens": 1024}, "messages is required"),
        ({"model": "llama3.2", "max_tokens": 1024, "messages": []}, "messages is required"),
        (
            {
                "model": "llama3.2",
                "max_tokens": 1024,
                "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "test"}]}],
            },
            "tool_use block missing required 'id' field",
        ),
        (
            {
                "model": "llama3.2",
                "max_tokens": 1024,
                "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "call_123"}]}],
            },
            "tool_use block missing required 'name' field",
        ),
    ]
    async with running() as s:
        for request, message in cases:
            async with s.post("/v1/messages", request) as r:
                body = (await r.read()).decode()
                assert (r.status, r.headers["Content-Type"]) == (400, "application/json; charset=utf-8")
            request_id = json.loads(body)["request_id"]
            assert re.fullmatch(r"req_[0-9a-f]{24}", request_id)
            assert body == anthropic_error("invalid_request_error", message, request_id), message
        assert s.recorder.generations() == []


async def test_messages_unknown_model_is_not_found_error() -> None:
    """ChatHandler's 404 {"error":"model 'nope' not found"} through AnthropicWriter.writeError
    (TestAnthropicWriter_ErrorFromRoutes): NewError(404) is not_found_error, encoder newline,
    application/json; a stream request keeps the SSE Cache-Control set before c.Next()."""
    request = {"model": "nope", "max_tokens": 10, "messages": SAY_HI}
    async with running() as s:
        async with s.post("/v1/messages", request) as r:
            plain = (await r.read()).decode()
            assert (r.status, r.headers["Content-Type"]) == (404, "application/json")
        async with s.post("/v1/messages", {**request, "stream": True}) as r:
            streamed = (await r.read()).decode()
            assert (r.status, r.headers["Content-Type"]) == (404, "application/json")
            assert r.headers["Cache-Control"] == "no-cache"
    for body in (plain, streamed):
        request_id = json.loads(body)["request_id"]
        assert body == anthropic_error("not_found_error", "model 'nope' not found", request_id) + "\n"


async def test_messages_mid_stream_failure_just_ends() -> None:
    """streamResponse (server/routes.go) encodes {"error":...} into the written stream; AnthropicWriter
    unmarshals it as an empty api.ChatResponse, for which Process emits no event: the stream ends with
    no error event, no message_delta and no message_stop."""
    request = {"model": "llama3.2", "max_tokens": 10, "messages": SAY_HI, "stream": True}
    async with running(reply=("Hi",), completion_tokens=5, fail_after_chunks=1) as s:
        async with s.post("/v1/messages", request) as r:
            assert r.status == 200
            body = await r.read()
        generation = s.recorder.generations()[0]
    ident = Draws().hex96("msg")
    assert body.decode() == (
        message_start(ident, 2)
        + block_start(0, '{"type":"text","text":""}')
        + block_delta(0, '{"type":"text_delta","text":"Hi"}')
    )
    assert generation.outcome == "failed"


# --------------------------------------------------------------------------- /v1/responses non-stream


def response_struct(
    response_id: str, output: str, usage: str, *, max_output_tokens: str = "null", tools: str = "[]"
) -> str:
    """openai.ToResponse (openai/responses.go) as ResponsesResponse's field order, completed_at set by
    ResponsesWriter.writeResponse; floats 1.0 marshal as 1."""
    return (
        f'{{"id":"{response_id}","object":"response","created_at":{CREATED},"completed_at":{CREATED},'
        '"status":"completed","incomplete_details":null,"model":"llama3.2","previous_response_id":null,'
        f'"instructions":null,"output":{output},"error":null,"tools":{tools},"tool_choice":"auto",'
        '"truncation":"disabled","parallel_tool_calls":true,"text":{"format":{"type":"text"}},'
        '"top_p":1,"presence_penalty":0,"frequency_penalty":0,"top_logprobs":0,"temperature":1,'
        f'"reasoning":null,"usage":{usage},"max_output_tokens":{max_output_tokens},"max_tool_calls":null,'
        '"store":false,"background":false,"service_tier":"default","metadata":{},'
        '"safety_identifier":null,"prompt_cache_key":null}\n'
    )


def usage_struct(input_tokens: int, output_tokens: int) -> str:
    """ResponsesUsage: Ollama's ToResponse leaves the token details at zero (its source marks them
    as still to do)."""
    return (
        f'{{"input_tokens":{input_tokens},"output_tokens":{output_tokens},'
        f'"total_tokens":{input_tokens + output_tokens},"input_tokens_details":{{"cached_tokens":0}},'
        '"output_tokens_details":{"reasoning_tokens":0}}'
    )


def message_struct(item_id: str, text: str) -> str:
    """ResponsesOutputItem for the message (omitempty drops call_id, name, arguments, summary...)."""
    return (
        f'{{"id":"{item_id}","type":"message","status":"completed","role":"assistant",'
        f'"content":[{{"type":"output_text","text":"{text}","annotations":[],"logprobs":[]}}]}}'
    )


async def test_responses_non_stream_text() -> None:
    """ToResponse: one message output item, usage with zero details, Content-Type application/json and
    the encoder's newline (middleware/openai.go ResponsesWriter.writeResponse)."""
    async with running(**HI) as s, s.post("/v1/responses", {"model": "llama3.2", "input": "Say hi"}) as r:
        body = await r.read()
        assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    output = f"[{message_struct(item_id, 'Hi!')}]"
    assert body.decode() == response_struct(response_id, output, usage_struct(SAY_HI_PROMPT_TOKENS, 2))


async def test_responses_non_stream_cut_is_still_completed() -> None:
    """ToResponse always says status "completed" and incomplete_details null, even when generation
    stopped at max_output_tokens (num_predict); max_output_tokens is echoed."""
    request = {"model": "llama3.2", "input": "Say hi", "max_output_tokens": 1}
    async with running(**HI) as s, s.post("/v1/responses", request) as r:
        body = await r.read()
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    output = f"[{message_struct(item_id, 'Hi')}]"
    expected = response_struct(
        response_id, output, usage_struct(SAY_HI_PROMPT_TOKENS, 1), max_output_tokens="1"
    )
    assert body.decode() == expected


async def test_responses_non_stream_function_call_replaces_message() -> None:
    """ToResponse with tool calls: function_call items fc_<response id>_<i> and no message item; tools
    are echoed as ResponsesTool structs (description and strict null, parameters a sorted map)."""
    tool = {"type": "function", "name": "get_weather", "parameters": SCHEMA_OBJ}
    request = {"model": "llama3.2", "input": "Say hi", "tools": [tool]}
    async with running(**HI, tool_call=True) as s, s.post("/v1/responses", request) as r:
        body = await r.read()
    draws = Draws()
    response_id, _item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    call_id = draws.call_id()
    output = (
        f'[{{"id":"fc_{response_id}_0","type":"function_call","status":"completed",'
        f'"call_id":"{call_id}","name":"get_weather","arguments":"{ARGS_ESCAPED}"}}]'
    )
    tools = (
        '[{"type":"function","name":"get_weather","description":null,"strict":null,'
        '"parameters":{"properties":{"city":{"type":"string"}},"type":"object"}}]'
    )
    # convertTool makes it the same api.Tool as the other families' get_weather.
    usage = usage_struct(SAY_HI_PROMPT_TOKENS + TOOLS_PROMPT_TOKENS, 2 + TOOL_TOKENS)
    assert body.decode() == response_struct(response_id, output, usage, tools=tools)


# --------------------------------------------------------------------------- /v1/responses stream


def response_map(
    response_id: str, status: str, output: str, usage: str, completed_at: str, *, tools: str = "[]"
) -> str:
    """buildResponseObject (openai/responses.go): a map[string]any, so every level's keys are sorted."""
    return (
        f'{{"background":false,"completed_at":{completed_at},"created_at":{CREATED},"error":null,'
        f'"frequency_penalty":0,"id":"{response_id}","incomplete_details":null,"instructions":null,'
        '"max_output_tokens":null,"max_tool_calls":null,"metadata":{},"model":"llama3.2",'
        f'"object":"response","output":{output},"parallel_tool_calls":true,"presence_penalty":0,'
        '"previous_response_id":null,"prompt_cache_key":null,"reasoning":null,"safety_identifier":null,'
        f'"service_tier":"default","status":"{status}","store":false,"temperature":1,'
        f'"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto","tools":{tools},"top_logprobs":0,"top_p":1,'
        f'"truncation":"disabled","usage":{usage}}}'
    )


def usage_map(input_tokens: int, output_tokens: int) -> str:
    """processCompletion's usage map (sorted keys)."""
    return (
        f'{{"input_tokens":{input_tokens},"input_tokens_details":{{"cached_tokens":0}},'
        f'"output_tokens":{output_tokens},"output_tokens_details":{{"reasoning_tokens":0}},'
        f'"total_tokens":{input_tokens + output_tokens}}}'
    )


def opening(response_id: str, tools: str = "[]") -> str:
    """createResponseCreatedEvent and createResponseInProgressEvent (sequence 0 and 1)."""
    empty = response_map(response_id, "in_progress", "[]", "null", "null", tools=tools)
    return sse(
        "response.created", f'{{"response":{empty},"sequence_number":0,"type":"response.created"}}'
    ) + sse(
        "response.in_progress", f'{{"response":{empty},"sequence_number":1,"type":"response.in_progress"}}'
    )


def text_part(text: str) -> str:
    return f'{{"annotations":[],"logprobs":[],"text":"{text}","type":"output_text"}}'


def message_map(item_id: str, text: str) -> str:
    return (
        f'{{"content":[{text_part(text)}],"id":"{item_id}","role":"assistant","status":"completed",'
        '"type":"message"}'
    )


def text_events(item_id: str, index: int, seq: int, deltas: list[str]) -> str:
    """processTextContent: item added, content part added, one output_text.delta per chunk."""
    out = sse(
        "response.output_item.added",
        f'{{"item":{{"content":[],"id":"{item_id}","role":"assistant","status":"in_progress",'
        f'"type":"message"}},"output_index":{index},"sequence_number":{seq},"type":"response.output_item.added"}}',
    ) + sse(
        "response.content_part.added",
        f'{{"content_index":0,"item_id":"{item_id}","output_index":{index},"part":{text_part("")},'
        f'"sequence_number":{seq + 1},"type":"response.content_part.added"}}',
    )
    for offset, delta in enumerate(deltas, start=seq + 2):
        out += sse(
            "response.output_text.delta",
            f'{{"content_index":0,"delta":"{delta}","item_id":"{item_id}","logprobs":[],'
            f'"output_index":{index},"sequence_number":{offset},"type":"response.output_text.delta"}}',
        )
    return out


def text_done(item_id: str, index: int, seq: int, text: str) -> str:
    """processCompletion: output_text.done, content_part.done, output_item.done."""
    return (
        sse(
            "response.output_text.done",
            f'{{"content_index":0,"item_id":"{item_id}","logprobs":[],"output_index":{index},'
            f'"sequence_number":{seq},"text":"{text}","type":"response.output_text.done"}}',
        )
        + sse(
            "response.content_part.done",
            f'{{"content_index":0,"item_id":"{item_id}","output_index":{index},"part":{text_part(text)},'
            f'"sequence_number":{seq + 1},"type":"response.content_part.done"}}',
        )
        + sse(
            "response.output_item.done",
            f'{{"item":{message_map(item_id, text)},"output_index":{index},"sequence_number":{seq + 2},'
            '"type":"response.output_item.done"}',
        )
    )


def completed(response_id: str, seq: int, output: str, usage: str, tools: str = "[]") -> str:
    response = response_map(response_id, "completed", output, usage, str(CREATED), tools=tools)
    return sse(
        "response.completed", f'{{"response":{response},"sequence_number":{seq},"type":"response.completed"}}'
    )


async def test_responses_stream_text() -> None:
    """ResponsesStreamConverter.Process (openai/responses.go; TestResponsesStreamConverter_TextOnly,
    _SequenceNumbers): created, in_progress, item/part added, deltas, done events, completed; every
    event carries sequence_number 0..n and there is no [DONE]."""
    request = {"model": "llama3.2", "input": "Say hi", "stream": True}
    async with running(**HI) as s, s.post("/v1/responses", request) as r:
        body = await r.read()
        assert r.headers["Content-Type"] == "text/event-stream"
        assert (r.headers["Cache-Control"], r.headers["Connection"]) == ("no-cache", "keep-alive")
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    assert body.decode() == (
        opening(response_id)
        + text_events(item_id, 0, 2, ["Hi", "!"])
        + text_done(item_id, 0, 6, "Hi!")
        + completed(response_id, 9, f"[{message_map(item_id, 'Hi!')}]", usage_map(SAY_HI_PROMPT_TOKENS, 2))
    )
    assert b"[DONE]" not in body


async def test_responses_stream_reasoning_then_text() -> None:
    """processThinking / finishReasoning (TestResponsesStreamConverter_Reasoning): a reasoning item
    rs_<rand> with summary deltas, finished (summary_text.done + item done with encrypted_content) when
    text starts; the message then sits at output_index 1."""
    async with running(**HI, thinking_tokens=2) as s:
        async with s.post("/api/chat", {"model": "qwen3:8b", "messages": SAY_HI}) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        request = {"model": "qwen3:8b", "input": "Say hi", "stream": True}
        async with s.post("/v1/responses", request) as r:
            body = await r.read()
    first, second = (line["message"]["thinking"] for line in lines[:2])
    thought = first + second
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    rs_id = f"rs_{draws.intn(999999)}"
    qwen = body.decode().replace('"model":"qwen3:8b"', '"model":"llama3.2"')
    reasoning_item = (
        f'{{"encrypted_content":"{thought}","id":"{rs_id}",'
        f'"summary":[{{"text":"{thought}","type":"summary_text"}}],"type":"reasoning"}}'
    )
    expected = opening(response_id) + sse(
        "response.output_item.added",
        f'{{"item":{{"id":"{rs_id}","summary":[],"type":"reasoning"}},"output_index":0,'
        '"sequence_number":2,"type":"response.output_item.added"}',
    )
    for seq, delta in ((3, first), (4, second)):
        expected += sse(
            "response.reasoning_summary_text.delta",
            f'{{"delta":"{delta}","item_id":"{rs_id}","output_index":0,"sequence_number":{seq},'
            '"summary_index":0,"type":"response.reasoning_summary_text.delta"}',
        )
    expected += (
        sse(
            "response.reasoning_summary_text.done",
            f'{{"item_id":"{rs_id}","output_index":0,"sequence_number":5,"summary_index":0,'
            f'"text":"{thought}","type":"response.reasoning_summary_text.done"}}',
        )
        + sse(
            "response.output_item.done",
            f'{{"item":{reasoning_item},"output_index":0,"sequence_number":6,"type":"response.output_item.done"}}',
        )
        + text_events(item_id, 1, 7, ["Hi", "!"])
        + text_done(item_id, 1, 11, "Hi!")
        + completed(
            response_id,
            14,
            f"[{reasoning_item},{message_map(item_id, 'Hi!')}]",
            usage_map(QWEN_SAY_HI_PROMPT_TOKENS, 4),
        )
    )
    assert qwen == expected


async def test_responses_stream_function_call() -> None:
    """emitFunctionCallEvents (TestResponsesStreamConverter_ToolCalls, _FunctionCallStatus): added
    (in_progress, arguments ""), arguments delta and done, item done (completed); its output_index is
    the converter's, which text did not advance; toolCallsSent then skips the text done events and the
    final output lists the function call before the message (buildFinalOutput). buildResponseObject
    echoes the tools as maps: description and strict null, parameters with sorted keys."""
    tool = {"type": "function", "name": "get_weather", "parameters": SCHEMA_OBJ}
    request = {"model": "llama3.2", "input": "Say hi", "tools": [tool], "stream": True}
    async with running(**HI, tool_call=True) as s, s.post("/v1/responses", request) as r:
        body = (await r.read()).decode()
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    call_id = draws.call_id()
    fc_id = f"fc_{draws.intn(999999)}_0"
    tools = (
        '[{"description":null,"name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},'
        '"type":"object"},"strict":null,"type":"function"}]'
    )
    fc_item = (
        f'{{"arguments":"{ARGS_ESCAPED}","call_id":"{call_id}","id":"{fc_id}","name":"get_weather",'
        '"status":"completed","type":"function_call"}'
    )
    usage = usage_map(SAY_HI_PROMPT_TOKENS + TOOLS_PROMPT_TOKENS, 2 + TOOL_TOKENS)
    assert body == (
        opening(response_id, tools)
        + text_events(item_id, 0, 2, ["Hi", "!"])
        + sse(
            "response.output_item.added",
            f'{{"item":{{"arguments":"","call_id":"{call_id}","id":"{fc_id}","name":"get_weather",'
            '"status":"in_progress","type":"function_call"},"output_index":0,"sequence_number":6,'
            '"type":"response.output_item.added"}',
        )
        + sse(
            "response.function_call_arguments.delta",
            f'{{"delta":"{ARGS_ESCAPED}","item_id":"{fc_id}","output_index":0,"sequence_number":7,'
            '"type":"response.function_call_arguments.delta"}',
        )
        + sse(
            "response.function_call_arguments.done",
            f'{{"arguments":"{ARGS_ESCAPED}","item_id":"{fc_id}","output_index":0,"sequence_number":8,'
            '"type":"response.function_call_arguments.done"}',
        )
        + sse(
            "response.output_item.done",
            f'{{"item":{fc_item},"output_index":0,"sequence_number":9,"type":"response.output_item.done"}}',
        )
        + completed(response_id, 10, f"[{fc_item},{message_map(item_id, 'Hi!')}]", usage, tools)
    )


async def test_responses_errors() -> None:
    """Responses errors: bind errors are AbortWithStatusJSON (gin charset, no newline); ChatHandler's 400
    "model is required" and 404 go through BaseWriter.writeError (openai.NewError, encoder newline)."""
    async with running() as s:
        async with s.post("/v1/responses", b"") as r:
            assert (r.status, r.headers["Content-Type"]) == (400, "application/json; charset=utf-8")
            assert await r.read() == (
                b'{"error":{"message":"EOF","type":"invalid_request_error","param":null,"code":null}}'
            )
        async with s.post("/v1/responses", {"input": "Say hi"}) as r:
            assert (r.status, r.headers["Content-Type"]) == (400, "application/json")
            assert await r.read() == (
                b'{"error":{"message":"model is required","type":"invalid_request_error",'
                b'"param":null,"code":null}}\n'
            )
        async with s.post("/v1/responses", {"model": "nope", "input": "Say hi", "stream": True}) as r:
            assert (r.status, r.headers["Content-Type"]) == (404, "application/json")
            assert await r.read() == (
                b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
                b'"param":null,"code":null}}\n'
            )


async def test_responses_mid_stream_failure_just_ends() -> None:
    """The {"error":...} line streamResponse writes unmarshals as an empty ChatResponse; Process emits
    nothing for it: no response.failed, no response.completed, the stream just ends."""
    request = {"model": "llama3.2", "input": "Say hi", "stream": True}
    async with running(reply=("Hi",), completion_tokens=5, fail_after_chunks=1) as s:
        async with s.post("/v1/responses", request) as r:
            assert r.status == 200
            body = await r.read()
        generation = s.recorder.generations()[0]
    draws = Draws()
    response_id, item_id = f"resp_{draws.intn(999999)}", f"msg_{draws.intn(999999)}"
    assert body.decode() == opening(response_id) + text_events(item_id, 0, 2, ["Hi"])
    assert generation.outcome == "failed"


# --------------------------------------------------------------------------- streamed tool calls


async def test_native_chat_streams_the_tool_call_chunk() -> None:
    """ChatHandler (server/routes.go): the parsed call goes out in its own chunk with content "" and
    message.tool_calls [{id, function {index, name, arguments}}] (api.ToolCall field order); the done
    chunk follows with done_reason stop."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA_OBJ}}]
    request = {"model": "llama3.2", "messages": SAY_HI, "tools": tools}
    async with running(**HI, tool_call=True) as s, s.post("/api/chat", request) as r:
        lines = (await r.read()).decode().splitlines()
    call_id = Draws().call_id()
    head = f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant",'
    assert lines[:3] == [
        head + '"content":"Hi"},"done":false}',
        head + '"content":"!"},"done":false}',
        head + '"content":"","tool_calls":[{"id":"' + call_id + '","function":{"index":0,'
        '"name":"get_weather","arguments":' + ARGS + '}}]},"done":false}',
    ]
    final = json.loads(lines[3])
    assert (final["done"], final["done_reason"], final["eval_count"]) == (True, "stop", 2 + TOOL_TOKENS)
    assert len(lines) == 4


async def test_openai_chat_streams_delta_tool_calls() -> None:
    """ChatWriter / toChunk (middleware/openai.go, openai/openai.go;
    TestChatWriter_StreamToolCallsFinishReason): delta {"content":"","tool_calls":[{id, index,
    type "function", function {name, arguments string}}]}, then FinishChunk with delta {} and
    finish_reason tool_calls, then [DONE]."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA_OBJ}}]
    request = {"model": "llama3.2", "messages": SAY_HI, "tools": tools, "stream": True}
    async with running(**HI, tool_call=True) as s, s.post("/v1/chat/completions", request) as r:
        body = (await r.read()).decode()
    draws = Draws()
    chat_id = f"chatcmpl-{draws.intn(999)}"
    call_id = draws.call_id()
    head = (
        f'data: {{"id":"{chat_id}","object":"chat.completion.chunk","created":{CREATED},'
        '"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,'
    )
    assert body == (
        head + '"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n'
        + head + '"delta":{"content":"!"},"finish_reason":null}]}\n\n'
        + head + '"delta":{"content":"","tool_calls":[{"id":"' + call_id + '","index":0,"type":"function",'
        '"function":{"name":"get_weather","arguments":"' + ARGS_ESCAPED + '"}}]},"finish_reason":null}]}\n\n'
        + head + '"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        "data: [DONE]\n\n"
    )  # fmt: skip


# --------------------------------------------------------------------------- honour_limit


async def test_honour_limit_false_ignores_every_completion_limit() -> None:
    """Fault injection: with honour_limit false the model runs to its natural end (done_reason stop,
    all completion_tokens) whatever num_predict / max_tokens / max_output_tokens say; the record
    still shows the limit the request asked for. POST /_sim/settings sets it like the others."""
    async with running(completion_tokens=6) as s:
        async with s.post("/_sim/settings", {"honour_limit": False}) as r:
            assert (r.status, (await r.json())["honour_limit"]) == (200, False)
        native = {"model": "llama3.2", "messages": SAY_HI, "options": {"num_predict": 2}}
        async with s.post("/api/chat", native) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        chat = {"model": "llama3.2", "messages": SAY_HI, "max_tokens": 2}
        async with s.post("/v1/chat/completions", chat) as r:
            openai = json.loads(await r.read())
        messages = {"model": "llama3.2", "messages": SAY_HI, "max_tokens": 2}
        async with s.post("/v1/messages", messages) as r:
            anthropic = json.loads(await r.read())
        responses = {"model": "llama3.2", "input": "Say hi", "max_output_tokens": 2}
        async with s.post("/v1/responses", responses) as r:
            response = json.loads(await r.read())
        records = s.recorder.generations()
        async with s.post("/_sim/settings", {"honour_limit": True}) as r:
            assert r.status == 200
        async with s.post("/api/chat", native) as r:
            honoured = json.loads((await r.read()).splitlines()[-1])
    assert len(lines) == 7
    assert (lines[-1]["done_reason"], lines[-1]["eval_count"]) == ("stop", 6)
    assert (openai["choices"][0]["finish_reason"], openai["usage"]["completion_tokens"]) == ("stop", 6)
    assert (anthropic["stop_reason"], anthropic["usage"]["output_tokens"]) == ("end_turn", 6)
    assert (response["usage"]["output_tokens"], response["max_output_tokens"]) == (6, 2)
    assert [g.completion_limit for g in records] == [2, 2, 2, 2]
    assert [g.done_reason for g in records] == ["stop"] * 4
    assert (honoured["done_reason"], honoured["eval_count"]) == ("length", 2)
