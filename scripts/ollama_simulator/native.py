"""Ollama's own inference API: /api/generate, /api/chat, /api/embed, /api/embeddings."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ollama_simulator.api_types import bind_messages, bind_tools, decode_images, go_text
from ollama_simulator.catalog import _lookup
from ollama_simulator.chat import chat_job, check_capabilities, counter, today
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
    ModelCall,
    Piece,
    _bind_think,
    _check_queue,
    _embedding,
    _limit_from_options,
    offered_tool,
    resolve_think,
    tool_call_id,
)
from ollama_simulator.gojson import Binder, Float32s, GoObject, bind_keep_alive, go_json
from ollama_simulator.gotemplate import TemplateError
from ollama_simulator.names import _local_name, is_cloud_model, parse_model_name
from ollama_simulator.prompt import Prompt, generate_prompt
from ollama_simulator.prompt_template import PromptTemplate, parse_template
from ollama_simulator.recorder import PassRecord
from ollama_simulator.runner import runner_options
from ollama_simulator.state import Call
from ollama_simulator.tokens import embed_prompt_tokens
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


def native_tool_calls(tool: ModelCall, call_id: str) -> list[dict[str, Any]]:
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
            return gin_json(gen.error_status, {"error": gen.error_message})
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
            error = {"error": gen.error_message}
            if not emitter.started:  # streamResponse: c.JSON(status) before anything was written
                body = go_json(error)
                return web.Response(status=gen.error_status, body=body, headers={"Content-Type": CT_JSON})
            await emitter.send(go_json(error) + b"\n")
            return emitter.response
        await emitter.send(go_json(_native_final(gen, call.now(), "", "")) + b"\n")
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


def _bind_options(bind: Binder, obj: GoObject) -> GoObject | None:
    return bind.object(obj, "options", "map[string]interface {}")


def _debug_answer(call: Call, kind: str, model: str, prompt: Prompt) -> web.Response:
    """_debug_render_only: the rendered prompt in _debug_info instead of a generation."""
    payload: dict[str, Any] = {"model": model, "created_at": call.now()}
    if kind == "generate":
        payload["response"] = ""
    else:
        payload["message"] = {"role": "", "content": ""}
    payload["done"] = False
    info: dict[str, Any] = {"rendered_template": prompt.text}
    if prompt.images:
        info["image_count"] = prompt.images
    payload["_debug_info"] = info
    return gin_json(200, payload)


def _override(template: str) -> PromptTemplate | None:
    """A request's `template` parsed like template.Parse (a parse error is a 500)."""
    if not template:
        return None
    try:
        return parse_template(template)
    except TemplateError as e:
        raise ApiError(500, str(e)) from None


async def handle_generate(call: Call) -> web.StreamResponse:
    """GenerateHandler (server/routes.go)."""
    obj = await call.json("api.GenerateRequest")
    bind = Binder("GenerateRequest")
    model = bind.string(obj, "model") or ""
    prompt = go_text(bind.string(obj, "prompt") or "")
    suffix = go_text(bind.string(obj, "suffix") or "")
    system = go_text(bind.string(obj, "system") or "")
    template = bind.string(obj, "template") or ""
    context = bind.array(obj, "context", "[]int")
    stream = bind.boolean(obj, "stream")
    raw = bool(bind.boolean(obj, "raw"))
    truncate = bind.boolean(obj, "truncate")
    shift = bind.boolean(obj, "shift")
    debug = bool(bind.boolean(obj, "_debug_render_only"))
    options = _bind_options(bind, obj)
    images = decode_images(bind.array(obj, "images", "[]api.ImageData"), bind)
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think_value = _bind_think(obj.folded.get("think"))
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
        call.state.touch_now(entry, 0, 0)
        return await _native_load(call, "generate", model, "unload")
    think = resolve_think(entry, model, think_value)
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support generate")
    if suffix:
        check_capabilities(entry, "insert")
    limit = _limit_from_options(options)
    runner = runner_options(call.settings, entry.profile, options, truncate=truncate, shift=shift)
    _check_queue(call)
    if not prompt:
        call.state.touch_now(entry, keep_alive, runner.num_ctx)
        return await _native_load(call, "generate", model, "load")
    if raw:
        rendered = Prompt(prompt, len(images))
    else:
        try:
            rendered = generate_prompt(
                entry.profile,
                _override(template),
                prompt=prompt,
                system=system,
                suffix=suffix,
                images=images,
                context=None if context is None else call.state.vocabulary.detokenize(context),
                think=think,
                num_ctx=runner.num_ctx,
                truncate=runner.truncate,
                count=counter(call),
                projector=call.settings.tokens_per_image > 0,
                today=today(call),
            )
        except TemplateError as e:
            raise ApiError(500, str(e)) from None
    if debug:
        call.state.touch_now(entry, keep_alive, runner.num_ctx)
        return _debug_answer(call, "generate", model, rendered)
    thinking = think.enabled and entry.thinks
    job = Job("generate", model, entry, rendered, thinking, limit, runner, keep_alive, raw)
    return await run_native(call, job, stream=stream is not False)


async def handle_chat(call: Call) -> web.StreamResponse:
    """ChatHandler (server/routes.go)."""
    obj = await call.json("api.ChatRequest")
    bind = Binder("ChatRequest")
    model = bind.string(obj, "model") or ""
    messages = bind_messages(bind.array(obj, "messages", "[]api.Message"), bind)
    stream = bind.boolean(obj, "stream")
    options = _bind_options(bind, obj)
    tools = bind_tools(bind.array(obj, "tools", "api.Tools"), bind)
    truncate = bind.boolean(obj, "truncate")
    shift = bind.boolean(obj, "shift")
    debug = bool(bind.boolean(obj, "_debug_render_only"))
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think_value = _bind_think(obj.folded.get("think"))
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
        call.state.touch_now(entry, 0, 0)
        return await _native_load(call, "chat", model, "unload")
    think = resolve_think(entry, model, think_value)
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support chat")
    limit = _limit_from_options(options)
    _check_queue(call)
    if not messages:
        runner = runner_options(call.settings, entry.profile, options)
        call.state.touch_now(entry, keep_alive, runner.num_ctx)
        return await _native_load(call, "chat", model, "load")
    try:
        job = chat_job(
            call,
            model=model,
            entry=entry,
            messages=messages,
            tools=tools,
            think=think,
            options=options,
            limit=limit,
            keep_alive_ns=keep_alive,
            truncate=truncate,
            shift=shift,
            structured="format" in obj.folded,
            tool=offered_tool(call, obj.folded.get("tools"), "native"),
        )
    except TemplateError as e:
        raise ApiError(500, str(e)) from None
    if debug:
        call.state.touch_now(entry, keep_alive, job.runner.num_ctx)
        return _debug_answer(call, "chat", model, job.prompt)
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
    call: Call,
    model: str,
    inputs: list[str],
    *,
    dimensions: int,
    keep_alive: int | None,
    options: GoObject | None = None,
) -> dict[str, Any]:
    """The /api/embed answer (also the source of /v1/embeddings)."""
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    runner = runner_options(call.settings, entry.profile, options)
    _check_queue(call)
    clock = call.state.clock
    started = clock.monotonic_ns()
    call.state.touch(entry, keep_alive, started, runner.num_ctx)
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
    generation.num_ctx = runner.num_ctx
    generation.passes.append(PassRecord(count))
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
    options = _bind_options(bind, obj)
    inputs = _embed_inputs(obj.folded.get("input"))
    return gin_json(
        200, await _embed(call, model, inputs, dimensions=dimensions, keep_alive=keep_alive, options=options)
    )


async def handle_embeddings(call: Call) -> web.StreamResponse:
    obj = await call.json("api.EmbeddingRequest")
    bind = Binder("EmbeddingRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    keep_alive = bind_keep_alive(obj)
    options = _bind_options(bind, obj)
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    runner = runner_options(call.settings, entry.profile, options)
    _check_queue(call)
    call.state.touch_now(entry, keep_alive, runner.num_ctx)
    generation = call.begin("/api/embeddings", model, stream=False)
    generation.outcome = "completed"
    generation.chunks_sent = 1
    if not prompt:
        return gin_json(200, {"embedding": []})
    vector = _embedding(prompt, call.settings.embedding_dimensions)
    return gin_json(200, {"embedding": list(vector)})
