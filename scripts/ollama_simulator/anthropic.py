"""The Anthropic Messages API, /v1/messages, as Ollama 0.33's middleware/anthropic.go writes it."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final

import attrs
from aiohttp import web

from ollama_simulator.api_types import (
    Message,
    PropertyType,
    Tool,
    ToolCall,
    ToolFunctionParameters,
    ToolProperty,
    bind_arguments,
    bind_parameters,
    go_any,
    go_text,
)
from ollama_simulator.catalog import _lookup
from ollama_simulator.chat import chat_job
from ollama_simulator.exceptions import ApiError, ClientGone
from ollama_simulator.generation import (
    Generation,
    Job,
    Piece,
    _check_queue,
    offered_tool,
    resolve_think,
    tool_call_id,
)
from ollama_simulator.gojson import Binder, BindError, GoObject, _compact_json, go_json
from ollama_simulator.govalues import OrderedMap, marshal
from ollama_simulator.openai import _cloud_passthrough, _openai_json
from ollama_simulator.state import Call
from ollama_simulator.wire import CT_JSON, CT_SSE, Emitter, _sse_event, _stream_response

_STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "Connection": "keep-alive"}
_THINK_EFFORTS: Final = ("high", "medium", "low", "max")


def anthropic_error(call: Call, status: int, message: str) -> dict[str, Any]:
    """anthropic.NewError: the type by status, and a request id (crypto/rand there, seeded here)."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    request_id = f"req_{call.state.rng.getrandbits(96):024x}"
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def _refuse(call: Call, status: int, message: str) -> web.Response:
    """AbortWithStatusJSON in the middleware: gin's JSON (charset, no newline)."""
    body = go_json(anthropic_error(call, status, message))
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json; charset=utf-8"})


def _writer_error(call: Call, status: int, message: str, *, stream: bool) -> web.Response:
    """AnthropicWriter.writeError: the chat handler's error re-encoded (encoder, newline)."""
    body = go_json(anthropic_error(call, status, message)) + b"\n"
    headers = {"Content-Type": CT_JSON, **(_STREAM_HEADERS if stream else {})}
    return web.Response(status=status, body=body, headers=headers)


def _estimate_block(block: Any) -> int:
    """countContentBlock: text and thinking lengths, whole JSON for tool_use/tool_result."""
    if not isinstance(block, dict):
        return 0
    total = 0
    for key in ("text", "thinking"):
        if isinstance(block.get(key), str):
            total += len(block[key].encode())
    if block.get("type") in ("tool_use", "tool_result"):
        total += len(go_json(block))
    return total


_WS: Final = re.compile(r"[ \t\n\r]*")
_RAW: Final = json.JSONDecoder()


def _members(text: str, start: int) -> list[tuple[str, int, int]]:
    """(key, value start, value end) of the JSON object at text[start] == "{"."""
    members: list[tuple[str, int, int]] = []
    i = _WS.match(text, start + 1).end()  # type: ignore[union-attr]
    while text[i] != "}":
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # type: ignore[union-attr]
        end = _RAW.raw_decode(text, i)[1]
        members.append((key, i, end))
        i = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    return members


def _elements(text: str, start: int) -> list[int]:
    """Start offsets of the elements of the JSON array at text[start] == "["."""
    starts: list[int] = []
    i = _WS.match(text, start + 1).end()  # type: ignore[union-attr]
    while text[i] != "]":
        starts.append(i)
        i = _WS.match(text, _RAW.raw_decode(text, i)[1]).end()  # type: ignore[union-attr]
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    return starts


def raw_schema_lengths(body: bytes) -> list[int] | None:
    """len(tool.InputSchema) per tool: a json.RawMessage keeps the bytes as sent, whitespace too.

    Keys match case-insensitively and the last one wins, as Go binds them; None when the body
    has no tools array (the caller then falls back to the compact form).
    """
    try:
        text = body.decode("utf-8", "replace")
        text = text[_WS.match(text).end() :]  # type: ignore[union-attr]
        tools = [(a, b) for key, a, b in _members(text, 0) if key.lower() == "tools"]
        if not tools or text[tools[-1][0]] != "[":
            return None
        lengths: list[int] = []
        for at in _elements(text, tools[-1][0]):
            members = _members(text, at) if text[at] == "{" else []
            schema = [(a, b) for key, a, b in members if key.lower() == "input_schema"]
            schema_text = text[schema[-1][0] : schema[-1][1]] if schema else ""
            lengths.append(len(schema_text.encode("utf-8", "surrogatepass")))
        return lengths
    except (ValueError, IndexError, AttributeError):
        return None


def estimate_input_tokens(obj: GoObject, schema_lengths: list[int] | None = None) -> int:
    """anthropic.EstimateCountTokens: len/4 of system, roles, content and tools (min 1).

    `schema_lengths` are the raw input_schema byte lengths (raw_schema_lengths).
    """
    total = 0
    system = obj.folded.get("system")
    if isinstance(system, str):
        total += len(system.encode())
    elif isinstance(system, list):
        total += sum(_estimate_block(block) for block in system)
    elif system is not None:
        total += len(go_json(system))
    messages = obj.folded.get("messages") or []
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += len(str(message.get("role") or "").encode())
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            total += sum(_estimate_block(block) for block in content)
    tools = obj.folded.get("tools") or []
    for index, tool in enumerate(tools):
        if isinstance(tool, dict):
            total += len(str(tool.get("name") or "").encode())
            total += len(str(tool.get("description") or "").encode())
            if schema_lengths is not None and len(schema_lengths) == len(tools):
                total += schema_lengths[index]
            elif tool.get("input_schema") is not None:  # no raw bytes: the compact form
                total += len(_compact_json(tool["input_schema"]).encode())
    tokens = total // 4
    if tokens == 0 and (messages or system is not None):
        tokens = 1
    return tokens


def _image(source: Any) -> bytes:
    """resolveImageSource: only base64 sources."""
    if not isinstance(source, dict):
        raise ApiError(400, "invalid image source", middleware=True)
    if source.get("type") != "base64":
        message = f"invalid image source type: {source.get('type') or ''}. Only base64 images are supported."
        raise ApiError(400, message, middleware=True)
    try:
        return base64.b64decode(str(source.get("data") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid base64 image data", middleware=True) from None


def _tool_result(content: Any) -> tuple[str, tuple[bytes, ...]]:
    """convertToolResultContent: a string, or the text and images of content blocks."""
    if isinstance(content, str):
        return go_text(content), ()
    if not isinstance(content, list):
        return "", ()
    texts: list[str] = []
    images: list[bytes] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(go_text(block["text"]))
        elif block.get("type") == "image":
            if not isinstance(block.get("source"), dict):
                raise ApiError(400, "invalid tool_result image source", middleware=True)
            images.append(_image(block["source"]))
    return "".join(texts), tuple(images)


def _web_search_result(content: Any) -> str:
    """formatWebSearchToolResultContent for decoded JSON content."""
    if isinstance(content, str):
        return go_text(content)
    if isinstance(content, list):
        lines: list[str] = []
        for item in content:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "web_search_result":
                lines.append(f"- {item.get('title') or ''}: {item.get('url') or ''}\n")
            elif item.get("type") == "web_search_tool_result_error":
                code = item.get("error_code") or ""
                return f"web_search_tool_result_error: {code}" if code else "web_search_tool_result_error"
        return go_text("".join(lines))
    if isinstance(content, dict) and content.get("type") == "web_search_tool_result_error":
        code = content.get("error_code") or ""
        return f"web_search_tool_result_error: {code}" if code else "web_search_tool_result_error"
    return marshal(go_any(content))


def _convert_message(raw: Any) -> list[Message]:
    """anthropic.convertMessage: text, images, tool calls and thinking in one message; tool
    results as tool messages (before it for a user, after it otherwise)."""
    message = raw if isinstance(raw, dict) else {}
    role = str(message.get("role") or "").lower()
    content = message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    texts: list[str] = []
    images: list[bytes] = []
    calls: list[ToolCall] = []
    thinking = ""
    results: list[Message] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(go_text(block["text"]))
        elif kind == "image":
            images.append(_image(block.get("source")))
        elif kind in ("tool_use", "server_tool_use"):
            if kind == "tool_use" and not block.get("id"):
                raise ApiError(400, "tool_use block missing required 'id' field", middleware=True)
            if kind == "tool_use" and not block.get("name"):
                raise ApiError(400, "tool_use block missing required 'name' field", middleware=True)
            arguments = bind_arguments(block["input"]) if isinstance(block.get("input"), GoObject) else None
            calls.append(
                ToolCall(
                    id=go_text(str(block.get("id") or "")),
                    name=go_text(str(block.get("name") or "")),
                    arguments=arguments,
                )
            )
        elif kind == "tool_result":
            text, result_images = _tool_result(block.get("content"))
            call_id = go_text(str(block.get("tool_use_id") or ""))
            results.append(Message("tool", text, images=result_images, tool_call_id=call_id))
        elif kind == "web_search_tool_result":
            call_id = go_text(str(block.get("tool_use_id") or ""))
            results.append(Message("tool", _web_search_result(block.get("content")), tool_call_id=call_id))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking = go_text(block["thinking"])
    converted = list(results) if role == "user" and results else []
    text = "".join(texts)
    if text or images or calls or thinking:
        converted.append(Message(role, text, thinking, tuple(images), tuple(calls)))
    if role != "user" or not results:
        converted.extend(results)
    return converted


def _convert_messages(obj: GoObject) -> list[Message]:
    """anthropic.FromMessagesRequest's messages: the system first, then each message's."""
    messages: list[Message] = []
    system = obj.folded.get("system")
    if isinstance(system, str) and system:
        messages.append(Message("system", go_text(system)))
    elif isinstance(system, list):
        joined = "".join(
            b["text"]
            for b in system
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        if joined:
            messages.append(Message("system", go_text(joined)))
    for raw in obj.folded.get("messages") or []:
        messages.extend(_convert_message(raw))
    return messages


_WEB_SEARCH: Final = Tool(
    type="function",
    name="web_search",
    description=(
        "Search the web for current information. Use this to find up-to-date information about any topic."
    ),
    parameters=ToolFunctionParameters(
        type="object",
        required=("query",),
        properties=OrderedMap(
            query=ToolProperty(
                type=PropertyType("api.PropertyType", ("string",)),
                description="The search query to look up on the web",
            )
        ),
    ),
)


def _convert_tools(tools: list[Any] | None) -> tuple[Tool, ...] | None:
    """convertTool per tool: web_search built-ins become Ollama's web_search function, a
    custom tool named web_search beside one is dropped, input_schema binds as parameters."""
    if tools is None:
        return None
    builtin = any(isinstance(t, dict) and str(t.get("type") or "").startswith("web_search") for t in tools)
    converted: list[Tool] = []
    for raw in tools:
        tool = raw if isinstance(raw, dict) else {}
        kind = str(tool.get("type") or "")
        if kind.startswith("web_search"):
            converted.append(_WEB_SEARCH)
            continue
        name = go_text(str(tool.get("name") or ""))
        if builtin and name == "web_search":
            continue
        schema = tool.get("input_schema")
        try:
            parameters = (
                bind_parameters(schema, Binder("ToolFunctionParameters"))
                if schema is not None
                else ToolFunctionParameters()
            )
        except BindError as e:
            raise ApiError(
                400, f"invalid input_schema for tool {json.dumps(name)}: {e}", middleware=True
            ) from None
        description = go_text(str(tool.get("description") or ""))
        converted.append(Tool(type="function", name=name, description=description, parameters=parameters))
    return tuple(converted)


def _think(obj: GoObject) -> bool | str | None:
    """FromMessagesRequest's think: thinking.type, else output_config.effort as a level."""
    thinking = obj.folded.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        return True
    if kind == "disabled":
        return False
    config = obj.folded.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if isinstance(effort, str):
        level = effort.strip().lower().replace("xhigh", "high")
        if level in _THINK_EFFORTS:
            return level
    return None


async def handle_anthropic(call: Call) -> web.StreamResponse:
    """AnthropicMessagesMiddleware then ChatHandler; see middleware/anthropic.go."""
    try:
        obj = await _openai_json(call, "anthropic.MessagesRequest")
        _cloud_passthrough(obj)
        bind = Binder("MessagesRequest")
        model = bind.string(obj, "model") or ""
        max_tokens = bind.integer(obj, "max_tokens") or 0
        raw_messages = bind.array(obj, "messages", "[]anthropic.MessageParam") or []
        stream = bool(bind.boolean(obj, "stream"))
        raw_tools = bind.array(obj, "tools", "[]anthropic.Tool")
        bind.object(obj, "thinking", "anthropic.ThinkingConfig")
        if not model:
            raise ApiError(400, "model is required", middleware=True)
        if max_tokens <= 0:
            raise ApiError(400, "max_tokens is required and must be positive", middleware=True)
        if not raw_messages:
            raise ApiError(400, "messages is required", middleware=True)
        messages = _convert_messages(obj)
        tools = _convert_tools(raw_tools)
    except ApiError as error:
        if error.native:
            raise
        return _refuse(call, error.status, error.message)
    try:
        entry = _lookup(call, model, f"model '{model}' not found")
        think = resolve_think(entry, model, _think(obj), relax=True)
        _check_queue(call)
        job = chat_job(
            call,
            model=model,
            entry=entry,
            messages=messages,
            tools=tools,
            think=think,
            options=None,
            limit=max_tokens,
            tool=offered_tool(call, raw_tools, "anthropic"),
        )
    except ApiError as error:
        if error.native:
            raise
        return _writer_error(call, error.status, error.message, stream=stream)
    estimate = estimate_input_tokens(obj, raw_schema_lengths(await call.body()) if raw_tools else None)
    return await run_anthropic(call, job, stream=stream, estimate=estimate)


def _stop_reason(done_reason: str, tool_calls: bool) -> str:
    """anthropic.mapStopReason."""
    if tool_calls:
        return "tool_use"
    if done_reason == "stop":
        return "end_turn"
    if done_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done_reason else ""


@attrs.define
class StreamConverter:
    """anthropic.StreamConverter.Process, fed the chat handler's chunks one by one."""

    ident: str
    model: str
    estimate: int
    first: bool = True
    index: int = 0
    thinking_started: bool = False
    thinking_done: bool = False
    text_started: bool = False
    tools_sent: int = 0

    def _stop(self) -> tuple[str, dict[str, Any]]:
        return "content_block_stop", {"type": "content_block_stop", "index": self.index}

    def _start(self, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        event = {"type": "content_block_start", "index": self.index, "content_block": block}
        return "content_block_start", event

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def process(
        self,
        *,
        thinking: str = "",
        content: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
        done: bool = False,
        done_reason: str = "",
        prompt_eval_count: int = 0,
        eval_count: int = 0,
    ) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        if self.first:
            self.first = False
            input_tokens = prompt_eval_count or self.estimate
            message = {
                "id": self.ident,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "usage": {"input_tokens": input_tokens, "output_tokens": 0},
            }
            events.append(("message_start", {"type": "message_start", "message": message}))
        if thinking and not self.thinking_done:
            if self.text_started:
                events.append(self._stop())
                self.index += 1
                self.text_started = False
            if not self.thinking_started:
                self.thinking_started = True
                events.append(self._start({"type": "thinking", "thinking": ""}))
            events.append(self._delta({"type": "thinking_delta", "thinking": thinking}))
        if content:
            if self.thinking_started and not self.thinking_done:
                self.thinking_done = True
                events.append(self._stop())
                self.index += 1
            if not self.text_started:
                self.text_started = True
                events.append(self._start({"type": "text", "text": ""}))
            events.append(self._delta({"type": "text_delta", "text": content}))
        for tool_call in tool_calls or []:
            if self.thinking_started and not self.thinking_done:
                self.thinking_done = True
                events.append(self._stop())
                self.index += 1
            if self.text_started:
                events.append(self._stop())
                self.index += 1
                self.text_started = False
            function = tool_call["function"]
            block = {"type": "tool_use", "id": tool_call["id"], "name": function["name"], "input": {}}
            events.append(self._start(block))
            partial = go_json(function["arguments"]).decode()
            events.append(self._delta({"type": "input_json_delta", "partial_json": partial}))
            events.append(self._stop())
            self.tools_sent += 1
            self.index += 1
        if done:
            if self.text_started or (self.thinking_started and not self.thinking_done):
                events.append(self._stop())
            reason = _stop_reason(done_reason, self.tools_sent > 0)
            delta = {"stop_reason": reason} if reason else {}
            usage = {"input_tokens": prompt_eval_count, "output_tokens": eval_count}
            events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
            events.append(("message_stop", {"type": "message_stop"}))
        return events


def _tool_calls(call: Call, piece: Piece) -> list[dict[str, Any]]:
    """The native api.ToolCall the chat handler puts in its tool call chunk."""
    if piece.tool is None:
        raise TypeError("not a tool call piece")
    function = {"index": 0, "name": piece.tool.name, "arguments": piece.tool.arguments}
    return [{"id": tool_call_id(call.state.rng), "function": function}]


async def run_anthropic(call: Call, job: Job, *, stream: bool, estimate: int) -> web.StreamResponse:
    """AnthropicWriter over the chat handler's output (ToMessagesResponse or the converter)."""
    ident = f"msg_{call.state.rng.getrandbits(96):024x}"
    gen = Generation(call, job, call.begin("/v1/messages", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []

        async def collect(piece: Piece) -> None:
            if piece.tool is not None:
                calls.extend(_tool_calls(call, piece))
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return _writer_error(call, gen.error_status, gen.error_message, stream=False)
        content: list[Any] = []
        if thoughts:
            content.append({"type": "thinking", "thinking": "".join(thoughts)})
        if "".join(texts):
            content.append({"type": "text", "text": "".join(texts)})
        for tool_call in calls:
            function = tool_call["function"]
            block = {"type": "tool_use", "id": tool_call["id"], "name": function["name"]}
            block["input"] = function["arguments"]
            content.append(block)
        body: dict[str, Any] = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content or None,
        }
        reason = _stop_reason(gen.plan.done_reason, bool(calls))
        if reason:
            body["stop_reason"] = reason
        body["usage"] = {"input_tokens": gen.prompt_eval_count, "output_tokens": gen.plan.total}
        gen.finish()
        gen.record.chunks_sent = 1
        return web.Response(status=200, body=go_json(body) + b"\n", headers={"Content-Type": CT_JSON})

    emitter = Emitter(call, _stream_response(CT_SSE, **_STREAM_HEADERS), gen.record)
    converter = StreamConverter(ident, job.model, estimate)

    async def write(events: list[tuple[str, dict[str, Any]]]) -> None:
        for event, data in events:
            await emitter.send(_sse_event(event, data))

    async def send(piece: Piece) -> None:
        if piece.tool is not None:
            await write(converter.process(tool_calls=_tool_calls(call, piece)))
        elif piece.thinking:
            await write(converter.process(thinking=piece.text))
        else:
            await write(converter.process(content=piece.text))

    try:
        if not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return _writer_error(call, gen.error_status, gen.error_message, stream=True)
            # streamResponse encodes {"error":...} into the writer; it unmarshals as an empty
            # ChatResponse, for which Process emits nothing: the stream just ends.
            return emitter.response
        final = converter.process(
            done=True,
            done_reason=gen.plan.done_reason,
            prompt_eval_count=gen.prompt_eval_count,
            eval_count=gen.plan.total,
        )
        await write(final)
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response
