"""The simulator's /v1/messages, /v1/responses and streamed tool calls match Ollama 0.33's source.

Fixtures are transcribed from Ollama v0.33.0-rc2 (fb3076099); each cites the Go function whose
output it reproduces. The ids come from the seeded rng of `running`, so they are stable.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_ollama_simulator import SAY_HI, STAMP, running, settings

HI = settings(reply=("Hi", "!"), completion_tokens=2)
TOOLY = settings(reply=("Hi", "!"), completion_tokens=2, thinking_tokens=2, tool_call=True)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
ANTHROPIC_TOOLS = [{"name": "get_weather", "input_schema": SCHEMA}]
NATIVE_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]


def events(body: bytes) -> list[tuple[str, Any]]:
    """The (event, data) pairs of an SSE body written by writeSSE / ResponsesWriter.writeEvent."""
    out = []
    for frame in body.decode().split("\n\n"):
        if frame:
            head, data = frame.split("\n", 1)
            out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_messages_non_stream_body() -> None:
    """ToMessagesResponse: no stop_sequence, text block only, encoder framing (newline, no charset)."""
    request = {"model": "llama3.2", "max_tokens": 10, "messages": SAY_HI}
    async with running(HI) as s, s.post("/v1/messages", request) as r:
        body = await r.read()
        assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
    # anthropic/anthropic.go ToMessagesResponse + MessagesResponse field order; stop_sequence omitempty.
    assert body.endswith(b'"content":[{"type":"text","text":"Hi!"}],"stop_reason":"end_turn",'
                         b'"usage":{"input_tokens":10,"output_tokens":2}}\n')  # fmt: skip
    assert body.startswith(b'{"id":"msg_')
    assert b"stop_sequence" not in body


@pytest.mark.parametrize(
    ("request_body", "status", "kind", "message", "charset"),
    [
        # middleware/anthropic.go AnthropicMessagesMiddleware: checks in this order, AbortWithStatusJSON.
        ({"model": "llama3.2", "messages": SAY_HI}, 400, "invalid_request_error",
         "max_tokens is required and must be positive", True),
        ({"model": "llama3.2", "max_tokens": 0, "messages": SAY_HI}, 400, "invalid_request_error",
         "max_tokens is required and must be positive", True),
        ({"model": "llama3.2", "max_tokens": 5}, 400, "invalid_request_error", "messages is required", True),
        ({"max_tokens": 5, "messages": SAY_HI}, 400, "invalid_request_error", "model is required", True),
        # ChatHandler's 404, rewritten by AnthropicWriter.writeError (json.NewEncoder, application/json).
        ({"model": "nope", "max_tokens": 5, "messages": SAY_HI}, 404, "not_found_error",
         "model 'nope' not found", False),
    ],
)  # fmt: skip
async def test_messages_errors(
    request_body: dict[str, Any], status: int, kind: str, message: str, charset: bool
) -> None:
    """anthropic.NewError bodies with a req_ id; middleware errors gin-framed, handler errors encoded."""
    async with running(HI) as s, s.post("/v1/messages", request_body) as r:
        body = await r.read()
        assert r.status == status
        assert r.headers["Content-Type"] == (
            "application/json; charset=utf-8" if charset else "application/json"
        )
    decoded = json.loads(body)
    assert decoded["type"] == "error"
    assert decoded["error"] == {"type": kind, "message": message}
    assert decoded["request_id"].startswith("req_")
    assert len(decoded["request_id"]) == 28
    assert body.endswith(b"\n") is not charset
    assert s.recorder.records[0].path == "/v1/messages"


async def test_messages_stream_thinking_text_tool_use() -> None:
    """StreamConverter.Process: thinking block, text block, tool_use block, then real usage."""
    request = {"model": "qwen3:8b", "max_tokens": 100, "stream": True, "messages": SAY_HI,
               "tools": ANTHROPIC_TOOLS}  # fmt: skip
    async with running(TOOLY) as s, s.post("/v1/messages", request) as r:
        assert (r.headers["Content-Type"], r.headers["Cache-Control"]) == ("text/event-stream", "no-cache")
        got = events(await r.read())
    # anthropic/anthropic.go StreamConverter.Process (and anthropic_test.go's stream tests).
    assert [name for name, _ in got] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    start = got[0][1]["message"]
    assert set(start) == {"id", "type", "role", "model", "content", "usage"}  # no stop_reason
    assert start["usage"]["output_tokens"] == 0
    assert got[1][1]["content_block"] == {"type": "thinking", "thinking": ""}  # no signature
    assert got[5][1]["content_block"] == {"type": "text", "text": ""}
    tool = got[9][1]["content_block"]
    assert (tool["type"], tool["name"], tool["input"]) == ("tool_use", "get_weather", {})
    assert tool["id"].startswith("call_")
    assert got[10][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":"city-1"}'}
    final = got[12][1]
    assert final["delta"] == {"stop_reason": "tool_use"}
    record = s.recorder.generations()[0]
    assert final["usage"] == {"input_tokens": record.prompt_eval_count, "output_tokens": record.eval_count}


async def test_messages_mid_stream_failure_just_ends() -> None:
    """The chat handler's {"error"} line unmarshals as an empty ChatResponse: no further event."""
    request = {"model": "llama3.2", "max_tokens": 10, "stream": True, "messages": SAY_HI}
    failing = settings(reply=("Hi", "!"), completion_tokens=2, fail_after_chunks=1)
    async with running(failing) as s, s.post("/v1/messages", request) as r:
        got = events(await r.read())
    # middleware/anthropic.go AnthropicWriter.writeResponse + server/routes.go streamResponse.
    assert [name for name, _ in got] == ["message_start", "content_block_start", "content_block_delta"]


async def test_responses_stream_reasoning_and_function_call() -> None:
    """ResponsesStreamConverter: sorted-key maps, sequence_number on each event, function_call items."""
    tools = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]
    request = {"model": "qwen3:8b", "input": "Say hi", "stream": True, "tools": tools}
    async with running(TOOLY) as s, s.post("/v1/responses", request) as r:
        raw = await r.read()
        assert r.headers["Cache-Control"] == "no-cache"
    got = events(raw)
    # openai/responses.go Process, processThinking, finishReasoning, emitFunctionCallEvents,
    # processCompletion.
    assert [name for name, _ in got] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    assert [data["sequence_number"] for _, data in got] == list(range(len(got)))
    for frame in raw.split(b"\n\n")[:-1]:  # Go maps marshal with sorted keys
        data = json.loads(frame.split(b"data: ", 1)[1])
        assert list(data) == sorted(data)
    assert got[12][1]["delta"] == '{"city":"city-1"}'
    assert b"[DONE]" not in raw
    usage = got[-1][1]["response"]["usage"]
    assert usage["output_tokens"] == s.recorder.generations()[0].eval_count


async def test_responses_non_stream_text() -> None:
    """ToResponse: struct field order, completed status, one message item, usage."""
    async with running(HI) as s, s.post("/v1/responses", {"model": "llama3.2", "input": "Say hi"}) as r:
        body = await r.read()
        assert r.headers["Content-Type"] == "application/json"
    decoded = json.loads(body)
    # openai/responses.go ResponsesResponse field order.
    assert list(decoded)[:6] == ["id", "object", "created_at", "completed_at", "status", "incomplete_details"]
    assert decoded["status"] == "completed"
    assert decoded["output"][0]["content"] == [
        {"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}
    ]
    assert decoded["usage"]["input_tokens"] == 10


async def test_responses_mid_stream_failure_just_ends() -> None:
    """No response.failed and no response.completed when generation fails mid-stream."""
    request = {"model": "llama3.2", "input": "Say hi", "stream": True}
    failing = settings(reply=("Hi", "!"), completion_tokens=2, fail_after_chunks=1)
    async with running(failing) as s, s.post("/v1/responses", request) as r:
        got = events(await r.read())
    assert [name for name, _ in got][-1] == "response.output_text.delta"


async def test_responses_unknown_model_error() -> None:
    """BaseWriter.writeError: OpenAI error body, encoder-framed."""
    async with running(HI) as s, s.post("/v1/responses", {"model": "nope", "input": "x"}) as r:
        body = await r.read()
        assert r.status == 404
    assert body == (b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
                    b'"param":null,"code":null}}\n')  # fmt: skip


async def test_native_and_openai_stream_tool_calls() -> None:
    """api.ToolCall chunk on /api/chat; delta.tool_calls and finish_reason tool_calls on /v1."""
    chat = {"model": "llama3.2", "messages": SAY_HI, "tools": NATIVE_TOOLS}
    async with running(settings(reply=("Hi", "!"), completion_tokens=2, tool_call=True)) as s:
        async with s.post("/api/chat", chat) as r:
            lines = (await r.read()).decode().splitlines()
        async with s.post("/v1/chat/completions", {**chat, "stream": True}) as r:
            chunks = (await r.read()).decode().split("\n\n")
    # server/routes.go ChatHandler (toolParser branch) and api/types.go ToolCall field order.
    assert lines[2].startswith(
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"assistant","content":"",'
        '"tool_calls":[{"id":"call_'
    )
    assert lines[2].endswith('","function":{"index":0,"name":"get_weather","arguments":{"city":"city-1"}}}]},'
                             '"done":false}')  # fmt: skip
    assert '"done_reason":"stop"' in lines[3]
    # openai/openai.go toChunk / ToToolCalls / FinishChunk.
    assert '"delta":{"content":"","tool_calls":[{"id":"call_' in chunks[2]
    assert (
        '"index":0,"type":"function","function":{"name":"get_weather","arguments":"{\\"city\\":\\"city-1\\"}"}}]}'
        in chunks[2]
    )
    assert '"delta":{},"finish_reason":"tool_calls"' in chunks[3]
    assert chunks[4] == "data: [DONE]"
