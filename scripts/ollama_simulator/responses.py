"""The OpenAI Responses API, /v1/responses, as Ollama 0.33's openai/responses.go writes it."""

from __future__ import annotations

import json
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
    go_text,
)
from ollama_simulator.catalog import _lookup
from ollama_simulator.chat import chat_job
from ollama_simulator.exceptions import MSG_MODEL_REQUIRED, ApiError, ClientGone
from ollama_simulator.generation import (
    Generation,
    Job,
    Piece,
    _check_queue,
    _positive_min,
    offered_tool,
    resolve_think,
    tool_call_id,
)
from ollama_simulator.gojson import Binder, BindError, EmptyBody, GoObject, go_json, parse_go_json
from ollama_simulator.govalues import OrderedMap
from ollama_simulator.openai import _cloud_passthrough, _openai_json, _openai_think, decode_image_url
from ollama_simulator.state import Call
from ollama_simulator.wire import CT_JSON, CT_SSE, Emitter, _sse_event, _stream_response, encoder_json

_STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "Connection": "keep-alive"}


def go_map(value: Any) -> Any:
    """A Go map[string]any marshals with its keys sorted, at every level."""
    if isinstance(value, dict):
        return {key: go_map(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [go_map(item) for item in value]
    return value


@attrs.frozen
class Echo:
    """The request fields a Responses answer echoes back."""

    instructions: str
    truncation: str | None
    tools: list[Any] | None
    text_format: Any
    top_p: Any
    temperature: Any
    effort: str
    summary: str
    max_output_tokens: int | None
    background: bool


def _echo(obj: GoObject) -> Echo:
    text = obj.folded.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    reasoning = obj.folded.get("reasoning")
    reasoning = reasoning if isinstance(reasoning, dict) else {}
    tools = obj.folded.get("tools")
    return Echo(
        instructions=str(obj.folded.get("instructions") or ""),
        truncation=obj.folded.get("truncation"),
        tools=tools if isinstance(tools, list) else None,
        text_format=fmt if isinstance(fmt, dict) else None,
        top_p=obj.folded.get("top_p"),
        temperature=obj.folded.get("temperature"),
        effort=str(reasoning.get("effort") or ""),
        summary=str(reasoning.get("summary") or ""),
        max_output_tokens=obj.folded.get("max_output_tokens"),
        background=bool(obj.folded.get("background")),
    )


def _tool_struct(tool: Any) -> dict[str, Any]:
    """openai.ResponsesTool marshalled as a struct (non-streaming answers)."""
    tool = tool if isinstance(tool, dict) else {}
    out: dict[str, Any] = {
        "type": tool.get("type", ""),
        "name": tool.get("name", ""),
        "description": tool.get("description"),
        "strict": tool.get("strict"),
        "parameters": go_map(tool.get("parameters")),
    }
    if tool.get("tools"):
        out["tools"] = [_tool_struct(inner) for inner in tool["tools"]]
    return out


def _usage(gen: Generation) -> dict[str, Any]:
    return {
        "input_tokens": gen.prompt_eval_count,
        "output_tokens": gen.plan.total,
        "total_tokens": gen.prompt_eval_count + gen.plan.total,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _text(part: str) -> dict[str, Any]:
    return {"type": "output_text", "text": part, "annotations": [], "logprobs": []}


def _arguments(piece: Piece) -> str:
    if piece.tool is None:
        raise TypeError("not a tool call piece")
    return go_json(piece.tool.arguments).decode()


def to_response(
    echo: Echo, *, model: str, response_id: str, item_id: str, created: int, completed: int,
    thinking: str, content: str, calls: list[tuple[str, str, str]], usage: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """openai.ToResponse plus the completed_at ResponsesWriter sets: struct field order."""
    output: list[Any] = []
    if thinking:
        summary = [{"type": "summary_text", "text": thinking}]
        output.append(
            {
                "id": f"rs_{response_id}",
                "type": "reasoning",
                "summary": summary,
                "encrypted_content": thinking,
            }
        )
    if calls:
        for index, (call_id, name, arguments) in enumerate(calls):
            item = {"id": f"fc_{response_id}_{index}", "type": "function_call", "status": "completed"}
            output.append({**item, "call_id": call_id, "name": name, "arguments": arguments})
    else:
        message = {"id": item_id, "type": "message", "status": "completed", "role": "assistant"}
        output.append({**message, "content": [_text(content)]})
    reasoning: dict[str, Any] | None = None
    if echo.effort or echo.summary:
        reasoning = {}
        if echo.effort:
            reasoning["effort"] = echo.effort
        if echo.summary:
            reasoning["summary"] = echo.summary
    text_format = go_map(echo.text_format) if echo.text_format is not None else {"type": "text"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "completed_at": completed,
        "status": "completed",
        "incomplete_details": None,
        "model": model,
        "previous_response_id": None,
        "instructions": echo.instructions or None,
        "output": output,
        "error": None,
        "tools": [_tool_struct(t) for t in echo.tools or []],
        "tool_choice": "auto",
        "truncation": echo.truncation if echo.truncation is not None else "disabled",
        "parallel_tool_calls": True,
        "text": {"format": text_format},
        "top_p": echo.top_p if echo.top_p is not None else 1.0,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": echo.temperature if echo.temperature is not None else 1.0,
        "reasoning": reasoning,
        "usage": usage,
        "max_output_tokens": echo.max_output_tokens,
        "max_tool_calls": None,
        "store": False,
        "background": echo.background,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


@attrs.define
class StreamConverter:
    """openai.ResponsesStreamConverter.Process; every event is a Go map (keys sorted)."""

    call: Call
    echo: Echo
    response_id: str
    item_id: str
    model: str
    first: bool = True
    output_index: int = 0
    content_started: bool = False
    tool_calls_sent: bool = False
    text: str = ""
    sequence: int = 0
    thinking: str = ""
    reasoning_id: str = ""
    reasoning_started: bool = False
    completed: list[Any] = attrs.field(factory=list)

    def _event(self, kind: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        data["type"] = kind
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return kind, go_map(data)

    def _now(self) -> int:
        return self.call.state.clock.time_ns() // 1_000_000_000

    def response(self, status: str, output: list[Any], usage: Any) -> dict[str, Any]:
        """buildResponseObject."""
        echo = self.echo
        tools = [
            {
                "type": t.get("type", ""),
                "name": t.get("name", ""),
                "description": t.get("description"),
                "strict": t.get("strict"),
                "parameters": t.get("parameters"),
            }
            for t in (echo.tools or [])
            if isinstance(t, dict)
        ]
        fmt: dict[str, Any] = {"type": "text"}
        if echo.text_format is not None:
            fmt = {"type": echo.text_format.get("type", "")}
            for key in ("name", "schema", "strict"):
                if echo.text_format.get(key) not in (None, ""):
                    fmt[key] = echo.text_format[key]
        reasoning = None
        if echo.effort or echo.summary:
            reasoning = {"effort": echo.effort or None, "summary": echo.summary or None}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self._now(),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "previous_response_id": None,
            "instructions": echo.instructions or None,
            "output": output,
            "error": None,
            "tools": tools,
            "tool_choice": "auto",
            "truncation": echo.truncation if echo.truncation is not None else "disabled",
            "parallel_tool_calls": True,
            "text": {"format": fmt},
            "top_p": echo.top_p if echo.top_p is not None else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": echo.temperature if echo.temperature is not None else 1.0,
            "reasoning": reasoning,
            "usage": usage,
            "max_output_tokens": echo.max_output_tokens,
            "max_tool_calls": None,
            "store": False,
            "background": echo.background,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def _finish_reasoning(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.reasoning_started:
            return []
        item_id, thinking, index = self.reasoning_id, self.thinking, self.output_index
        item = {
            "id": item_id,
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": thinking}],
            "encrypted_content": thinking,
        }
        self.completed.append(item)
        self.thinking, self.reasoning_id, self.reasoning_started = "", "", False
        self.output_index += 1
        where = {"item_id": item_id, "output_index": index, "summary_index": 0}
        return [
            self._event("response.reasoning_summary_text.done", {**where, "text": thinking}),
            self._event("response.output_item.done", {"output_index": index, "item": item}),
        ]

    def process(self, piece: Piece | None, *, done: bool = False, gen: Generation | None = None) -> list[Any]:
        events: list[Any] = []
        if self.first:
            self.first = False
            empty = self.response("in_progress", [], None)
            events.append(self._event("response.created", {"response": empty}))
            events.append(
                self._event("response.in_progress", {"response": dict(empty, created_at=self._now())})
            )
        if piece is not None and piece.thinking and piece.text:
            if not self.reasoning_started:
                self.reasoning_started = True
                self.reasoning_id = f"rs_{self.call.state.rng.randrange(999999)}"
                item = {"id": self.reasoning_id, "type": "reasoning", "summary": []}
                events.append(
                    self._event(
                        "response.output_item.added", {"output_index": self.output_index, "item": item}
                    )
                )
            self.thinking += piece.text
            where = {"item_id": self.reasoning_id, "output_index": self.output_index, "summary_index": 0}
            events.append(
                self._event("response.reasoning_summary_text.delta", {**where, "delta": piece.text})
            )
        if piece is not None and piece.tool is not None:
            events.extend(self._finish_reasoning())
            call_id = tool_call_id(self.call.state.rng)
            fc_id = f"fc_{self.call.state.rng.randrange(999999)}_0"
            arguments = _arguments(piece)
            base = {"id": fc_id, "type": "function_call"}
            item = {**base, "status": "completed", "call_id": call_id, "name": piece.tool.name}
            item["arguments"] = arguments
            self.completed.append(item)
            added = {**base, "status": "in_progress", "call_id": call_id, "name": piece.tool.name}
            added["arguments"] = ""
            index = self.output_index
            where = {"item_id": fc_id, "output_index": index}
            events.append(self._event("response.output_item.added", {"output_index": index, "item": added}))
            events.append(
                self._event("response.function_call_arguments.delta", {**where, "delta": arguments})
            )
            events.append(
                self._event("response.function_call_arguments.done", {**where, "arguments": arguments})
            )
            events.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
            self.output_index += 1
            self.tool_calls_sent = True
        elif piece is not None and not piece.thinking and piece.text and not self.tool_calls_sent:
            events.extend(self._finish_reasoning())
            where = {"item_id": self.item_id, "output_index": self.output_index, "content_index": 0}
            if not self.content_started:
                self.content_started = True
                item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant"}
                item["content"] = []
                events.append(
                    self._event(
                        "response.output_item.added", {"output_index": self.output_index, "item": item}
                    )
                )
                events.append(self._event("response.content_part.added", {**where, "part": _text("")}))
            self.text += piece.text
            delta = {**where, "delta": piece.text, "logprobs": []}
            events.append(self._event("response.output_text.delta", delta))
        if done and gen is not None:
            events.extend(self._complete(gen))
        return events

    def _message(self) -> dict[str, Any]:
        item = {"id": self.item_id, "type": "message", "status": "completed", "role": "assistant"}
        return {**item, "content": [_text(self.text)]}

    def _complete(self, gen: Generation) -> list[Any]:
        events = self._finish_reasoning()
        if not self.tool_calls_sent and self.content_started:
            where = {"item_id": self.item_id, "output_index": self.output_index, "content_index": 0}
            events.append(
                self._event("response.output_text.done", {**where, "text": self.text, "logprobs": []})
            )
            events.append(self._event("response.content_part.done", {**where, "part": _text(self.text)}))
            item = self._message()
            events.append(
                self._event("response.output_item.done", {"output_index": self.output_index, "item": item})
            )
        output = list(self.completed)
        if self.content_started:
            output.append(self._message())
        response = self.response("completed", output, _usage(gen))
        response["completed_at"] = self._now()
        events.append(self._event("response.completed", {"response": response}))
        return events


async def run_responses(call: Call, job: Job, echo: Echo, *, stream: bool) -> web.StreamResponse:
    """ResponsesWriter over the chat handler's output (ToResponse or the stream converter)."""
    response_id = f"resp_{call.state.rng.randrange(999999)}"
    item_id = f"msg_{call.state.rng.randrange(999999)}"
    gen = Generation(call, job, call.begin("/v1/responses", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[tuple[str, str, str]] = []

        async def collect(piece: Piece) -> None:
            if piece.tool is not None:
                calls.append((tool_call_id(call.state.rng), piece.tool.name, _arguments(piece)))
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return _error(gen.error_status, gen.error_message, stream=False)
        created = call.state.clock.time_ns() // 1_000_000_000
        completed = call.state.clock.time_ns() // 1_000_000_000
        body = to_response(
            echo, model=job.model, response_id=response_id, item_id=item_id, created=created,
            completed=completed, thinking="".join(thoughts), content="".join(texts), calls=calls,
            usage=_usage(gen),
        )  # fmt: skip
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, body)

    emitter = Emitter(call, _stream_response(CT_SSE, **_STREAM_HEADERS), gen.record)
    converter = StreamConverter(call, echo, response_id, item_id, job.model)

    async def write(events: list[Any]) -> None:
        for event, data in events:
            await emitter.send(_sse_event(event, data))

    async def send(piece: Piece) -> None:
        await write(converter.process(piece))

    try:
        if not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return _error(gen.error_status, gen.error_message, stream=True)
            # The {"error":...} line unmarshals as an empty ChatResponse: no events, no
            # response.failed, no response.completed; the stream just ends.
            return emitter.response
        await write(converter.process(None, done=True, gen=gen))
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


def _error(status: int, message: str, *, stream: bool) -> web.Response:
    """BaseWriter.writeError: the OpenAI error body, encoder-framed, application/json."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    headers = {"Content-Type": CT_JSON, **(_STREAM_HEADERS if stream else {})}
    return web.Response(status=status, body=go_json(body) + b"\n", headers=headers)


def _content(value: Any, where: str) -> tuple[str, tuple[bytes, ...]]:
    """ResponsesInputMessage content (a string or content items) as convertResponsesContent
    joins it: texts concatenated, images decoded, files refused."""
    if value is None:
        return "", ()
    if isinstance(value, str):
        return go_text(value), ()
    if not isinstance(value, list):
        raise ApiError(400, f"{where}content must be a string or array", middleware=True)
    texts: list[str] = []
    images: list[bytes] = []
    for index, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(go_text(str(item.get("text") or "")))
        elif kind == "input_image":
            url = str(item.get("image_url") or "")
            if url:
                images.append(decode_image_url(url))
        elif kind == "input_file":
            raise ApiError(400, "file inputs are not currently supported", middleware=True)
        else:
            raise ApiError(
                400, f"{where}content[{index}]: unknown content type: {kind or ''}", middleware=True
            )
    return "".join(texts), tuple(images)


def _call_arguments(text: str) -> OrderedMap | None:
    if not text:
        return None
    try:
        return bind_arguments(parse_go_json(text.encode()))
    except (BindError, EmptyBody) as e:
        raise ApiError(400, f"failed to parse function call arguments: {e}", middleware=True) from None


def _input_messages(items: list[Any]) -> list[Message]:
    """FromResponsesRequest's input items: messages, function calls merged into the assistant
    message before them, their outputs as tool messages, reasoning carried to the next one."""
    messages: list[Message] = []
    pending = ""
    kinds = [_item_type(item, index) for index, item in enumerate(items)]
    for index, item in enumerate(items):
        kind = kinds[index]
        if kind == "reasoning":
            pending = go_text(str(item.get("encrypted_content") or ""))
        elif kind == "message":
            text, images = _content(item.get("content"), f"input[{index}]: ")
            message = Message(go_text(str(item.get("role") or "")), text, images=images)
            if message.role == "assistant" and pending:
                message, pending = attrs.evolve(message, thinking=pending), ""
            output_id = ""
            if index + 1 < len(items) and kinds[index + 1] == "function_call_output":
                output_id = str(items[index + 1].get("call_id") or "")
            last = messages[-1] if messages else None
            if (
                message.role == "assistant"
                and output_id
                and last is not None
                and last.role == "assistant"
                and any(call.id == output_id for call in last.tool_calls)
            ):
                # An assistant message replayed between a function_call and its output joins
                # the call's message, so the tool result still follows the call.
                joiner = "\n" if last.content and message.content else ""
                messages[-1] = attrs.evolve(
                    last,
                    content=last.content + joiner + message.content,
                    images=last.images + message.images,
                    thinking=message.thinking or last.thinking,
                )
                continue
            messages.append(message)
        elif kind == "function_call":
            call = ToolCall(
                id=go_text(str(item.get("call_id") or "")),
                name=go_text(str(item.get("name") or "")),
                arguments=_call_arguments(str(item.get("arguments") or "")),
            )
            if messages and messages[-1].role == "assistant":
                last = messages[-1]
                messages[-1] = attrs.evolve(
                    last, tool_calls=(*last.tool_calls, call), thinking=pending or last.thinking
                )
            else:
                messages.append(Message("assistant", thinking=pending, tool_calls=(call,)))
            pending = ""
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                text, images = _content(output, f"input[{index}]: output")
            else:
                text, images = go_text(str(output or "")), ()
            call_id = go_text(str(item.get("call_id") or ""))
            messages.append(Message("tool", text, images=images, tool_call_id=call_id))
    if pending:
        messages.append(Message("assistant", thinking=pending))
    return messages


def _item_type(item: Any, index: int) -> str:
    """unmarshalResponsesInputItem's dispatch: the type, "message" when only a role is given."""
    if not isinstance(item, dict):
        raise ApiError(400, "invalid input item", middleware=True)
    kind = str(item.get("type") or "")
    if not kind and item.get("role"):
        kind = "message"
    if kind not in ("message", "function_call", "function_call_output", "reasoning", "web_search_call"):
        if not kind:
            raise ApiError(400, f"input[{index}]: input item missing required 'type' field", middleware=True)
        raise ApiError(400, f"input[{index}]: unknown input item type: {json.dumps(kind)}", middleware=True)
    return kind


_WEB_SEARCH: Final = Tool(
    type="function",
    name="web_search",
    description="Search the web for current information.",
    parameters=ToolFunctionParameters(
        type="object",
        required=("query",),
        properties=OrderedMap(
            query=ToolProperty(
                type=PropertyType("api.PropertyType", ("string",)), description="The search query."
            )
        ),
    ),
)


def _convert_tool(raw: Any, bind: Binder) -> list[Tool]:
    """convertTools: a namespace expands to its members with "namespace." names."""
    tool = raw if isinstance(raw, GoObject) else GoObject()
    kind = go_text(str(tool.folded.get("type") or ""))
    name = go_text(str(tool.folded.get("name") or ""))
    if kind == "namespace":
        members = [t for member in tool.folded.get("tools") or [] for t in _convert_tool(member, bind)]
        prefix = name + "."
        return [
            t if not name or t.name.startswith(prefix) else attrs.evolve(t, name=prefix + t.name)
            for t in members
        ]
    parameters = tool.folded.get("parameters")
    bound = bind_parameters(parameters, bind) if parameters is not None else ToolFunctionParameters()
    description = go_text(str(tool.folded.get("description") or ""))
    return [Tool(type=kind, name=name, description=description, parameters=bound)]


def _tools(raw: list[Any] | None) -> tuple[Tool, ...] | None:
    """FromResponsesRequest's tools: web_search becomes Ollama's web_search function, and a
    user function of that name beside it is dropped."""
    if not raw:
        return None
    web_search = any(isinstance(t, dict) and t.get("type") == "web_search" for t in raw)
    tools: list[Tool] = []
    for item in raw:
        if isinstance(item, dict) and item.get("type") == "web_search":
            tools.append(_WEB_SEARCH)
            continue
        tools.extend(
            t
            for t in _convert_tool(item, Binder("ResponsesTool"))
            if not (web_search and t.name == "web_search")
        )
    return tuple(tools)


def _structured(obj: GoObject) -> bool:
    """text.format of type json_schema with a schema sets the format."""
    text = obj.folded.get("text")
    fmt = text.folded.get("format") if isinstance(text, GoObject) else None
    return (
        isinstance(fmt, GoObject)
        and fmt.folded.get("type") == "json_schema"
        and fmt.folded.get("schema") is not None
    )


async def handle_responses(call: Call) -> web.StreamResponse:
    """ResponsesMiddleware (openai.FromResponsesRequest) then ChatHandler."""
    obj = await _openai_json(call, "openai.ResponsesRequest")
    _cloud_passthrough(obj)
    bind = Binder("ResponsesRequest")
    model = bind.string(obj, "model") or ""
    stream = bool(bind.boolean(obj, "stream"))
    limit = _positive_min(bind.integer(obj, "max_output_tokens"))
    instructions = go_text(bind.string(obj, "instructions") or "")
    raw_tools = bind.array(obj, "tools", "[]openai.ResponsesTool")
    think_value = _openai_think(bind, obj)
    messages = [Message("system", instructions)] if instructions else []
    value = obj.folded.get("input")
    if isinstance(value, str):
        if value:
            messages.append(Message("user", go_text(value)))
    elif isinstance(value, list):
        messages.extend(_input_messages(value))
    tools = _tools(raw_tools)
    try:
        if not model.strip():
            raise ApiError(400, MSG_MODEL_REQUIRED)
        entry = _lookup(call, model, f"model '{model}' not found")
        think = resolve_think(entry, model, think_value)
        _check_queue(call)
        job = chat_job(
            call,
            model=model,
            entry=entry,
            messages=[attrs.evolve(m, role=m.role.lower()) for m in messages],
            tools=tools,
            think=think,
            options=None,
            limit=limit,
            structured=_structured(obj),
            tool=offered_tool(call, raw_tools, "responses"),
        )
    except ApiError as error:
        if error.native:
            raise
        return _error(error.status, error.message, stream=stream)
    return await run_responses(call, job, _echo(obj), stream=stream)
