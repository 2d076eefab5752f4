"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any, Final

import attrs
from aiohttp import web

from ollama_simulator.api_types import Message, ToolCall, bind_arguments, bind_tools, go_text
from ollama_simulator.catalog import _lookup, _show
from ollama_simulator.chat import chat_job, check_capabilities, counter, today
from ollama_simulator.exceptions import (
    MSG_CLOUD_DISABLED,
    MSG_INVALID_NAME,
    MSG_MODEL_REQUIRED,
    ApiError,
    ClientGone,
)
from ollama_simulator.generation import (
    Generation,
    Job,
    ModelCall,
    Piece,
    Plan,
    _check_queue,
    _positive_min,
    offered_tool,
    resolve_think,
    tool_call_id,
)
from ollama_simulator.gojson import (
    Binder,
    BindError,
    EmptyBody,
    GoObject,
    _go_type_name,
    go_json,
    parse_go_json,
)
from ollama_simulator.names import (
    DEFAULT_NAMESPACE,
    _local_name,
    is_cloud_model,
    parse_model_name,
)
from ollama_simulator.native import _embed
from ollama_simulator.prompt import generate_prompt
from ollama_simulator.runner import runner_options
from ollama_simulator.state import Call
from ollama_simulator.wire import (
    _SSE_DONE,
    CT_SSE,
    Emitter,
    _sse,
    _stream_response,
    encoder_json,
    openai_error_body,
)


def openai_tool_calls(tool: ModelCall, call_id: str) -> list[dict[str, Any]]:
    """openai.ToToolCalls: id, index, type, and the arguments as a JSON string."""
    function = {"name": tool.name, "arguments": go_json(tool.arguments).decode()}
    return [{"id": call_id, "index": 0, "type": "function", "function": function}]


def finish_reason(plan: Plan) -> str:
    """FinishChunk / ToChatCompletion: "stop" becomes "tool_calls" once a call was sent."""
    if plan.done_reason == "stop" and plan.tool is not None:
        return "tool_calls"
    return plan.done_reason


def _chat_chunk(
    ident: str, created: int, model: str, choices: list[Any], usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def run_openai_chat(call: Call, job: Job, *, stream: bool, include_usage: bool) -> web.StreamResponse:
    """/v1/chat/completions in the current (v0.32.6+) chunk format (docs/OLLAMA.md#openai-api)."""
    ident = f"chatcmpl-{call.state.rng.randrange(999)}"
    gen = Generation(call, job, call.begin("/v1/chat/completions", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[Any] = []

        async def collect(piece: Piece) -> None:
            if piece.tool is not None:
                calls.extend(openai_tool_calls(piece.tool, tool_call_id(call.state.rng)))
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return encoder_json(gen.error_status, openai_error_body(gen.error_status, gen.error_message))
        finished_at = call.state.clock.time_ns() // 1_000_000_000
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if thoughts:
            message["reasoning"] = "".join(thoughts)
        if calls:
            message["tool_calls"] = calls
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": finished_at,
            "model": job.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(gen.plan)}],
            "usage": gen.usage(),
        }
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, body)

    emitter = Emitter(call, _stream_response(CT_SSE), gen.record)
    created: int | None = None

    def stamp() -> int:
        nonlocal created
        now = call.state.clock.time_ns() // 1_000_000_000
        if created is None:
            created = now
        return created

    def delta(content: str, reasoning: str = "", calls: list[Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {} if emitter.started else {"role": "assistant"}
        result["content"] = content
        if reasoning:
            result["reasoning"] = reasoning
        if calls:
            result["tool_calls"] = calls
        return result

    async def send(piece: Piece) -> None:
        ts = stamp()
        if piece.tool is not None:
            calls = openai_tool_calls(piece.tool, tool_call_id(call.state.rng))
            body = delta("", calls=calls)
        elif piece.thinking:
            body = delta("", piece.text)
        else:
            body = delta(piece.text)
        choice = {"index": 0, "delta": body, "finish_reason": None}
        await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [choice])))

    try:
        completed = await gen.run(send)
        if not completed:
            gen.fail()
            if not emitter.started:
                return encoder_json(gen.error_status, openai_error_body(gen.error_status, gen.error_message))
            # The native {"error"} line parses as an empty ChatResponse: one junk chunk.
            junk = {"index": 0, "delta": delta(""), "finish_reason": None}
            await emitter.send(_sse(_chat_chunk(ident, stamp(), "", [junk])))
            return emitter.response
        ts = stamp()
        if not emitter.started:
            opener = {"index": 0, "delta": delta(""), "finish_reason": None}
            await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [opener])))
        finish = {"index": 0, "delta": {}, "finish_reason": finish_reason(gen.plan)}
        await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [finish])))
        if include_usage:
            await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [], gen.usage())))
        await emitter.send(_SSE_DONE)
        gen.finish()
        if not include_usage:  # nothing reported the counts
            gen.record.prompt_eval_count = gen.record.eval_count = None
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


def _completion_chunk(
    ident: str, created: int, model: str, choices: list[Any], usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "choices": choices,
        "model": model,
        "system_fingerprint": "fp_ollama",
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


_ZERO_USAGE: Final = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def run_openai_completion(
    call: Call, job: Job, *, stream: bool, include_usage: bool, load: bool = False
) -> web.StreamResponse:
    """/v1/completions (docs/OLLAMA.md#openai-api), with the zero usage on every chunk when asked."""
    ident = f"cmpl-{call.state.rng.randrange(999)}"
    gen = Generation(call, job, call.begin("/v1/completions", job.model, stream=stream))
    if load:
        gen.plan = Plan(0, 0, "load", 0)
        gen.prompt_eval_count = 0

    def now_s() -> int:
        return call.state.clock.time_ns() // 1_000_000_000

    if not stream:
        texts: list[str] = []

        async def collect(piece: Piece) -> None:
            if not piece.thinking:
                texts.append(piece.text)

        if not load and not await gen.run(collect):
            gen.fail()
            return encoder_json(gen.error_status, openai_error_body(gen.error_status, gen.error_message))
        choice = {"text": "".join(texts), "index": 0, "finish_reason": gen.plan.done_reason}
        body = {
            "id": ident,
            "object": "text_completion",
            "created": now_s(),
            "model": job.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
            "usage": gen.usage(),
        }
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, body)

    emitter = Emitter(call, _stream_response(CT_SSE), gen.record)
    zero = dict(_ZERO_USAGE) if include_usage else None

    async def send(piece: Piece) -> None:
        choice = {"text": "" if piece.thinking else piece.text, "index": 0, "finish_reason": None}
        await emitter.send(_sse(_completion_chunk(ident, now_s(), job.model, [choice], zero)))

    try:
        if not load and not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return encoder_json(gen.error_status, openai_error_body(gen.error_status, gen.error_message))
            junk = {"text": "", "index": 0, "finish_reason": None}
            await emitter.send(_sse(_completion_chunk(ident, now_s(), "", [junk], zero)))
            return emitter.response
        ts = now_s()
        last = {"text": "", "index": 0, "finish_reason": gen.plan.done_reason}
        await emitter.send(_sse(_completion_chunk(ident, ts, job.model, [last], zero)))
        if include_usage:
            await emitter.send(_sse(_completion_chunk(ident, ts, job.model, [], gen.usage())))
        await emitter.send(_SSE_DONE)
        gen.finish()
        if not include_usage:
            gen.record.prompt_eval_count = gen.record.eval_count = None
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


async def _openai_json(call: Call, go_type: str) -> GoObject:
    """The /v1 middlewares bind with ShouldBindJSON too, but report io.EOF as "EOF"."""
    try:
        return await call.json(go_type, missing="EOF")
    except ApiError as e:
        raise ApiError(e.status, e.message, middleware=True) from None


def _cloud_passthrough(obj: GoObject) -> None:
    """cloudPassthroughMiddleware runs first on /v1 inference: cloud names get Ollama's 403."""
    model = obj.folded.get("model")
    if isinstance(model, str) and is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)


_IMAGE_PREFIXES: Final = tuple(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))


def decode_image_url(url: str) -> bytes:
    """decodeImageURL: a base64 data URI (jpeg, jpg, png, webp or a blank type)."""
    if url.startswith(("http://", "https://")):
        message = "image URLs are not currently supported, please use base64 encoded data instead"
        raise ApiError(400, message, middleware=True)
    prefix = next((p for p in ("data:;base64,", *_IMAGE_PREFIXES) if url.startswith(p)), None)
    if prefix is None:
        raise ApiError(400, "invalid image input", middleware=True)
    try:
        return base64.b64decode(url[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid image input", middleware=True) from None


def _openai_image(part: dict[str, Any]) -> bytes:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ApiError(400, "invalid message format", middleware=True)
    return decode_image_url(url)


def _openai_tool_calls(calls: list[Any] | None) -> tuple[ToolCall, ...]:
    """FromCompletionToolCall: each call's arguments string parsed into an ordered map."""
    converted: list[ToolCall] = []
    for raw in calls or ():
        call = raw if isinstance(raw, dict) else {}
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        try:
            arguments = parse_go_json(str(function.get("arguments") or "").encode())
        except (BindError, EmptyBody):
            raise ApiError(400, "invalid tool call arguments", middleware=True) from None
        converted.append(
            ToolCall(
                id=go_text(str(call.get("id") or "")),
                name=go_text(str(function.get("name") or "")),
                arguments=bind_arguments(arguments),
            )
        )
    return tuple(converted)


def _tool_name(messages: list[Any], call_id: str) -> str:
    """nameFromToolCallID: the last tool call with that id names the tool."""
    for message in reversed(messages):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in reversed(calls if isinstance(calls, list) else []):
            if isinstance(call, dict) and call.get("id") == call_id:
                function = call.get("function")
                return str(function.get("name") or "") if isinstance(function, dict) else ""
    return ""


def _openai_messages(bind: Binder, obj: GoObject) -> list[Message]:
    """openai.FromChatRequest: every content part becomes its own message, images included."""
    raw_messages = bind.array(obj, "messages", "[]openai.Message") or []
    inner = bind.nested("Message", "messages")
    messages: list[Message] = []
    for raw in raw_messages:
        message = bind.element(raw, "messages", "openai.Message")
        role = go_text(inner.string(message, "role") or "")
        reasoning = go_text(inner.string(message, "reasoning") or "")
        call_id = go_text(inner.string(message, "tool_call_id") or "")
        raw_calls = inner.array(message, "tool_calls", "[]openai.ToolCall")
        tool_name = ""
        if role.lower() == "tool":
            tool_name = go_text(inner.string(message, "name") or "") or _tool_name(raw_messages, call_id)
        content = message.folded.get("content")
        if isinstance(content, str):
            calls = _openai_tool_calls(raw_calls)
            messages.append(Message(role, go_text(content), reasoning, (), calls, tool_name, call_id))
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise ApiError(400, "invalid message format", middleware=True)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ApiError(400, "invalid message format", middleware=True)
                    messages.append(Message(role, go_text(text)))
                elif kind == "image_url":
                    messages.append(Message(role, images=(_openai_image(part),)))
                else:
                    raise ApiError(400, "invalid message format", middleware=True)
            if messages and raw_calls:
                messages[-1] = attrs.evolve(
                    messages[-1],
                    tool_calls=_openai_tool_calls(raw_calls),
                    tool_name=tool_name,
                    tool_call_id=call_id,
                    thinking=reasoning,
                )
        elif raw_calls is None:
            got = _go_type_name(content)
            raise ApiError(400, f"invalid message content type: {got}", middleware=True)
        else:
            calls = _openai_tool_calls(raw_calls)
            messages.append(Message(role, "", reasoning, (), calls, "", call_id))
    # ChatMiddleware re-encodes the request; ChatHandler's Message.UnmarshalJSON lowers roles.
    return [attrs.evolve(m, role=m.role.lower()) for m in messages]


# thinkFromReasoningEffort: the api.ThinkValue each reasoning effort becomes.
_EFFORTS: Final[dict[str, bool | str]] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def _openai_think(bind: Binder, obj: GoObject) -> bool | str | None:
    effort = bind.string(obj, "reasoning_effort")
    reasoning = bind.object(obj, "reasoning", "openai.Reasoning")
    if effort is None and reasoning is not None:
        effort = bind.nested("Reasoning", "reasoning").string(reasoning, "effort")
    if not effort:
        return None
    if effort not in _EFFORTS:
        message = f'invalid reasoning value: \'{effort}\' (must be "none", "minimal", "low", "medium", "high", "max")'  # noqa: E501 - one message
        raise ApiError(400, message, middleware=True)
    return _EFFORTS[effort]


def _include_usage(bind: Binder, obj: GoObject, stream: bool) -> bool:
    options = bind.object(obj, "stream_options", "openai.StreamOptions")
    if options is None:
        return False
    include = bind.nested("StreamOptions", "stream_options").boolean(options, "include_usage")
    return stream and bool(include)


def _structured(obj: GoObject) -> bool:
    """FromChatRequest's format: json_object, or json_schema with a schema (even null)."""
    response_format = obj.folded.get("response_format")
    if not isinstance(response_format, GoObject):
        return False
    kind = str(response_format.folded.get("type") or "").strip().lower()
    schema = response_format.folded.get("json_schema")
    return kind == "json_object" or (
        kind == "json_schema" and isinstance(schema, GoObject) and "schema" in schema.folded
    )


async def handle_openai_chat(call: Call) -> web.StreamResponse:
    """ChatMiddleware (openai.FromChatRequest) then ChatHandler."""
    obj = await _openai_json(call, "openai.ChatCompletionRequest")
    _cloud_passthrough(obj)
    bind = Binder("ChatCompletionRequest")
    model = bind.string(obj, "model") or ""
    stream = bool(bind.boolean(obj, "stream"))
    include_usage = _include_usage(bind, obj, stream)
    limit = _positive_min(bind.integer(obj, "max_tokens"), bind.integer(obj, "max_completion_tokens"))
    raw_messages = bind.array(obj, "messages", "[]openai.Message")
    if not raw_messages:
        raise ApiError(400, "[] is too short - 'messages'", middleware=True)
    messages = _openai_messages(bind, obj)
    tools = bind_tools(bind.array(obj, "tools", "[]api.Tool"), bind)
    think_value = _openai_think(bind, obj)
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(400, MSG_INVALID_NAME)
    entry = _lookup(call, model, f"model '{model}' not found")
    think = resolve_think(entry, model, think_value)
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support chat")
    _check_queue(call)
    job = chat_job(
        call,
        model=model,
        entry=entry,
        messages=messages,
        tools=tools,
        think=think,
        options=None,
        limit=limit,
        structured=_structured(obj),
        tool=offered_tool(call, obj.folded.get("tools"), "native"),
    )
    return await run_openai_chat(call, job, stream=stream, include_usage=include_usage)


async def handle_openai_completions(call: Call) -> web.StreamResponse:
    """CompletionsMiddleware (openai.FromCompleteRequest) then GenerateHandler."""
    obj = await _openai_json(call, "openai.CompletionRequest")
    _cloud_passthrough(obj)
    bind = Binder("CompletionRequest")
    model = bind.string(obj, "model") or ""
    prompt = go_text(bind.string(obj, "prompt") or "")
    suffix = go_text(bind.string(obj, "suffix") or "")
    stream = bool(bind.boolean(obj, "stream"))
    include_usage = _include_usage(bind, obj, stream)
    limit = _positive_min(bind.integer(obj, "max_tokens"), bind.integer(obj, "max_completion_tokens"))
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    entry = _lookup(call, model, f"model '{model}' not found")
    think = resolve_think(entry, model, None)
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support generate")
    if suffix:
        check_capabilities(entry, "insert")
    runner = runner_options(call.settings, entry.profile, None)
    _check_queue(call)
    rendered = generate_prompt(
        entry.profile,
        None,
        prompt=prompt,
        system="",
        suffix=suffix,
        images=(),
        context=None,
        think=think,
        num_ctx=runner.num_ctx,
        truncate=runner.truncate,
        count=counter(call),
        projector=call.settings.tokens_per_image > 0,
        today=today(call),
    )
    job = Job("generate", model, entry, rendered, think.enabled, limit, runner)
    return await run_openai_completion(call, job, stream=stream, include_usage=include_usage, load=not prompt)


async def handle_openai_embeddings(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "openai.EmbedRequest")
    _cloud_passthrough(obj)
    bind = Binder("EmbedRequest")
    model = bind.string(obj, "model") or ""
    dimensions = bind.integer(obj, "dimensions") or 0
    encoding = bind.string(obj, "encoding_format") or ""
    if encoding and encoding.lower() not in ("float", "base64"):
        message = f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64']."
        raise ApiError(400, message, middleware=True)
    value = obj.folded.get("input")
    if value == "":
        value = [""]
    if value is None or value == []:
        raise ApiError(400, "invalid input", middleware=True)
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        inputs = list(value)
    else:
        raise ApiError(400, "invalid input type")
    native = await _embed(call, model, inputs, dimensions=dimensions, keep_alive=None)
    if call.record.generation is not None:
        call.record.generation.endpoint = "/v1/embeddings"
    data = []
    for index, vector in enumerate(native["embeddings"]):
        embedding: Any = vector
        if encoding.lower() == "base64":
            packed = struct.pack(f"<{len(vector.values)}f", *vector.values)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "embedding": embedding, "index": index})
    count = native.get("prompt_eval_count", 0)
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }
    return encoder_json(200, body)


async def handle_openai_models(call: Call) -> web.StreamResponse:
    data = [
        {
            "id": entry.display,
            "object": "model",
            "created": entry.modified_at_ns // 1_000_000_000,
            "owned_by": entry.name.namespace,
        }
        for entry in call.state.models.values()
    ]
    return encoder_json(200, {"object": "list", "data": data or None})


async def handle_openai_model(call: Call) -> web.StreamResponse:
    raw = call.params["model"]
    entry = await _show(call, raw)
    name = parse_model_name(raw)
    body = {
        "id": raw,
        "object": "model",
        "created": entry.modified_at_ns // 1_000_000_000,
        "owned_by": name.namespace if name else DEFAULT_NAMESPACE,
    }
    return encoder_json(200, body)
