"""Ollama's own inference API: /api/generate, /api/chat, /api/embed, /api/embeddings."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from aiohttp import web

from ollama_simulator.catalog import _lookup
from ollama_simulator.exceptions import (
    MSG_CLOUD_DISABLED,
    MSG_INVALID_NAME,
    MSG_MODEL_REQUIRED,
    MSG_RAW_CONFLICT,
    ApiError,
    ClientGone,
)
from ollama_simulator.generation import (
    Generation,
    Job,
    Piece,
    ToolCall,
    _bind_think,
    _check_queue,
    _embedding,
    _limit_from_options,
    _resolve_think,
    offered_tool,
    tool_call_id,
)
from ollama_simulator.gojson import (
    Binder,
    BindError,
    Float32s,
    GoObject,
    _compact_json,
    _json_kind,
    bind_keep_alive,
    go_json,
)
from ollama_simulator.names import _local_name, is_cloud_model, parse_model_name
from ollama_simulator.state import Call
from ollama_simulator.tokens import PromptShape, embed_prompt_tokens
from ollama_simulator.wire import (
    CT_JSON,
    CT_NDJSON,
    Emitter,
    _stream_response,
    gin_json,
)


async def _native_load(call: Call, kind: str, model: str, reason: str) -> web.Response:
    payload: dict[str, Any] = {"model": model, "created_at": call.now()}
    if kind == "generate":
        payload["response"] = ""
    else:
        payload["message"] = {"role": "assistant", "content": ""}
    payload["done"] = True
    payload["done_reason"] = reason
    return gin_json(200, payload)


def native_tool_calls(tool: ToolCall, call_id: str) -> list[dict[str, Any]]:
    """api.ToolCall as Ollama marshals it: id, then function index, name, arguments."""
    function = {"index": 0, "name": tool.name, "arguments": tool.arguments}
    return [{"id": call_id, "function": function}]


def _native_chunk(
    job: Job, created_at: str, text: str, thinking: str, tool_calls: list[Any] | None = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": job.model, "created_at": created_at}
    if job.kind == "generate":
        chunk["response"] = text
        if thinking:
            chunk["thinking"] = thinking
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        chunk["message"] = message
    chunk["done"] = False
    return chunk


def _native_final(
    gen: Generation, created_at: str, text: str, thinking: str, tool_calls: list[Any] | None = None
) -> dict[str, Any]:
    final = _native_chunk(gen.job, created_at, text, thinking, tool_calls)
    final["done"] = True
    final["done_reason"] = gen.plan.done_reason
    if gen.job.kind == "generate" and not gen.job.raw:
        final["context"] = gen.context()
    final.update(gen.metrics())
    return final


async def run_native(call: Call, job: Job, *, stream: bool) -> web.StreamResponse:
    """/api/generate and /api/chat: NDJSON stream, or one object with stream:false."""
    gen = Generation(call, job, call.begin(f"/api/{job.kind}", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[Any] = []

        async def collect(piece: Piece) -> None:
            if piece.tool is not None:
                calls.extend(native_tool_calls(piece.tool, tool_call_id(call.state.rng)))
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return gin_json(500, {"error": call.settings.failure_message})
        final = _native_final(gen, call.now(), "".join(texts), "".join(thoughts), calls)
        gen.finish()
        gen.record.chunks_sent = 1
        return gin_json(200, final)

    emitter = Emitter(call, _stream_response(CT_NDJSON), gen.record)

    async def send(piece: Piece) -> None:
        text, thinking = ("", piece.text) if piece.thinking else (piece.text, "")
        calls = native_tool_calls(piece.tool, tool_call_id(call.state.rng)) if piece.tool else None
        await emitter.send(go_json(_native_chunk(job, call.now(), text, thinking, calls)) + b"\n")

    try:
        completed = await gen.run(send)
        if not completed:
            gen.fail()
            error = {"error": call.settings.failure_message}
            if not emitter.started:
                body = go_json(error)
                return web.Response(status=500, body=body, headers={"Content-Type": CT_JSON})
            await emitter.send(go_json(error) + b"\n")
            return emitter.response
        await emitter.send(go_json(_native_final(gen, call.now(), "", "")) + b"\n")
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


def _bind_options(bind: Binder, obj: GoObject) -> GoObject | None:
    return bind.object(obj, "options", "map[string]interface {}")


def _bind_images(bind: Binder, obj: GoObject, key: str = "images") -> int:
    images = bind.array(obj, key, "[]api.ImageData") or []
    for image in images:
        if not isinstance(image, str):
            raise BindError(
                f"json: cannot unmarshal {_json_kind(image)} into Go struct field "
                f"{bind.struct}.{bind.path}{key} of type api.ImageData"
            )
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BindError("illegal base64 data at input byte 0") from None
    return len(images)


async def handle_generate(call: Call) -> web.StreamResponse:
    obj = await call.json("api.GenerateRequest")
    bind = Binder("GenerateRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    suffix = bind.string(obj, "suffix") or ""
    system = bind.string(obj, "system") or ""
    template = bind.string(obj, "template") or ""
    context = bind.array(obj, "context", "[]int") or []
    stream = bind.boolean(obj, "stream")
    raw = bool(bind.boolean(obj, "raw"))
    options = _bind_options(bind, obj)
    images = _bind_images(bind, obj)
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think = _bind_think(obj.folded.get("think"))
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    if raw and (template or system or context):
        raise ApiError(400, MSG_RAW_CONFLICT)
    if not 0 <= top_logprobs <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    entry = _lookup(call, model, f"model '{model}' not found")
    if not prompt and keep_alive == 0:
        call.state.touch_now(entry, 0)
        return await _native_load(call, "generate", model, "unload")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support generate")
    thinking = _resolve_think(entry, model, think)
    limit = _limit_from_options(options)
    _check_queue(call)
    if not prompt:
        call.state.touch_now(entry, keep_alive)
        return await _native_load(call, "generate", model, "load")
    if raw:
        shape = PromptShape(extra=(prompt, suffix), images=images, templated=False)
    else:
        messages = ((system,),) if system else ()
        shape = PromptShape(
            messages=(*messages, (prompt, suffix)), images=images, context_tokens=len(context)
        )
    job = Job("generate", model, entry, shape, thinking, limit, keep_alive, raw)
    return await run_native(call, job, stream=stream is not False)


def _bind_native_messages(bind: Binder, obj: GoObject) -> tuple[tuple[tuple[str, ...], ...], int]:
    """Counted texts per message and the image count of api.ChatRequest.messages."""
    messages = bind.array(obj, "messages", "[]api.Message") or []
    inner = bind.nested("Message", "messages")
    texts: list[tuple[str, ...]] = []
    images = 0
    for raw in messages:
        message = bind.element(raw, "messages", "api.Message")
        inner.string(message, "role")
        parts = [inner.string(message, "content") or "", inner.string(message, "thinking") or ""]
        calls = inner.array(message, "tool_calls", "[]api.ToolCall")
        if calls:
            parts.append(_compact_json(calls))
        images += _bind_images(inner, message)
        texts.append(tuple(part for part in parts if part))
    return tuple(texts), images


async def handle_chat(call: Call) -> web.StreamResponse:
    obj = await call.json("api.ChatRequest")
    bind = Binder("ChatRequest")
    model = bind.string(obj, "model") or ""
    messages, images = _bind_native_messages(bind, obj)
    stream = bind.boolean(obj, "stream")
    options = _bind_options(bind, obj)
    tools = bind.array(obj, "tools", "api.Tools")
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think = _bind_think(obj.folded.get("think"))
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(400, MSG_INVALID_NAME)
    if not 0 <= top_logprobs <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    entry = _lookup(call, model, f"model '{model}' not found")
    if not messages and keep_alive == 0:
        call.state.touch_now(entry, 0)
        return await _native_load(call, "chat", model, "unload")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support chat")
    thinking = _resolve_think(entry, model, think)
    limit = _limit_from_options(options)
    _check_queue(call)
    if not messages:
        call.state.touch_now(entry, keep_alive)
        return await _native_load(call, "chat", model, "load")
    extra = (_compact_json(tools),) if tools else ()
    shape = PromptShape(messages=messages, extra=extra, images=images)
    tool = offered_tool(call, tools, "native")
    job = Job("chat", model, entry, shape, thinking, limit, keep_alive, tool=tool)
    return await run_native(call, job, stream=stream is not False)


def _embed_inputs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")


async def _embed(
    call: Call, model: str, inputs: list[str], dimensions: int, keep_alive: int | None
) -> dict[str, Any]:
    """The /api/embed answer (also the source of /v1/embeddings)."""
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    _check_queue(call)
    clock = call.state.clock
    started = clock.monotonic_ns()
    call.state.touch(entry, keep_alive, started)
    if not inputs:
        return {"model": model, "embeddings": []}
    loaded = clock.monotonic_ns()
    await asyncio.sleep(call.settings.time_to_first_token)  # prompt processing
    size = call.settings.embedding_dimensions
    if 0 < dimensions < size:
        size = dimensions
    vectors = [Float32s(_embedding(text, size)) for text in inputs]
    count = embed_prompt_tokens(inputs)
    generation = call.begin("/api/embed", model, stream=False)
    generation.prompt_eval_count = count
    generation.outcome = "completed"
    generation.chunks_sent = 1
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": max(clock.monotonic_ns() - started, 1),
        "load_duration": max(loaded - started, 1),
        "prompt_eval_count": count,
    }


async def handle_embed(call: Call) -> web.StreamResponse:
    obj = await call.json("api.EmbedRequest")
    bind = Binder("EmbedRequest")
    model = bind.string(obj, "model") or ""
    dimensions = bind.integer(obj, "dimensions") or 0
    bind.boolean(obj, "truncate")
    keep_alive = bind_keep_alive(obj)
    _bind_options(bind, obj)
    inputs = _embed_inputs(obj.folded.get("input"))
    return gin_json(200, await _embed(call, model, inputs, dimensions, keep_alive))


async def handle_embeddings(call: Call) -> web.StreamResponse:
    obj = await call.json("api.EmbeddingRequest")
    bind = Binder("EmbeddingRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    keep_alive = bind_keep_alive(obj)
    _bind_options(bind, obj)
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    _check_queue(call)
    call.state.touch_now(entry, keep_alive)
    generation = call.begin("/api/embeddings", model, stream=False)
    generation.outcome = "completed"
    generation.chunks_sent = 1
    if not prompt:
        return gin_json(200, {"embedding": []})
    vector = _embedding(prompt, call.settings.embedding_dimensions)
    return gin_json(200, {"embedding": list(vector)})
