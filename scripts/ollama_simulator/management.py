"""Model management and account routes: pull, push, create, copy, delete, blobs, me, transcriptions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import Any, Final

from aiohttp import web

from ollama_simulator.api_types import Message
from ollama_simulator.catalog import _lookup
from ollama_simulator.chat import chat_job
from ollama_simulator.exceptions import MSG_INVALID_NAME, ApiError, ClientGone
from ollama_simulator.generation import Generation, Piece, _check_queue, resolve_think
from ollama_simulator.gojson import Binder, go_json
from ollama_simulator.names import parse_model_name
from ollama_simulator.state import Call
from ollama_simulator.wire import (
    CT_NDJSON,
    Emitter,
    _stream_response,
    empty,
    encoder_json,
    gin_json,
    plain,
)


async def handle_root(call: Call) -> web.StreamResponse:
    return plain(200, "Ollama is running", "text/plain; charset=utf-8")


async def handle_version(call: Call) -> web.StreamResponse:
    return gin_json(200, {"version": call.settings.version})


async def handle_status(call: Call) -> web.StreamResponse:
    return gin_json(200, {"cloud": {"disabled": True, "source": "env"}})


def _progress_lines(kind: str, digest: str, size: int) -> list[dict[str, Any]]:
    short = digest[:12]
    layer = {"digest": f"sha256:{digest}", "total": size}
    if kind == "pull":
        return [
            {"status": "pulling manifest"},
            {"status": f"pulling {short}", **layer, "completed": size // 2},
            {"status": f"pulling {short}", **layer, "completed": size},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
    if kind == "push":
        return [
            {"status": "retrieving manifest"},
            {"status": f"pushing {short}", **layer, "completed": size},
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
    return [
        {"status": "gathering model components"},
        {"status": f"using existing layer sha256:{digest}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


async def _progress(call: Call, kind: str) -> web.StreamResponse:
    """/api/pull, /api/push, /api/create: NDJSON progress ending with {"status":"success"}."""
    obj = await call.json(f"api.{kind.capitalize()}Request")
    bind = Binder(f"{kind.capitalize()}Request")
    raw = bind.string(obj, "model") or bind.string(obj, "name") or ""
    stream = bind.boolean(obj, "stream")
    name = parse_model_name(raw)
    if name is None:
        raise ApiError(400, MSG_INVALID_NAME)
    if kind == "push" and call.state.find(name) is None:
        raise ApiError(404, f"model '{raw}' not found")
    lines = _progress_lines(kind, hashlib.sha256(name.key.encode()).hexdigest(), 2_019_393_189)
    if kind in ("pull", "create"):
        call.state.install(name.display())
    if stream is False:
        return gin_json(200, lines[-1])
    emitter = Emitter(call, _stream_response(CT_NDJSON))
    with contextlib.suppress(ClientGone):
        for line in lines:
            await emitter.send(go_json(line) + b"\n")
    return emitter.response


async def handle_pull(call: Call) -> web.StreamResponse:
    return await _progress(call, "pull")


async def handle_push(call: Call) -> web.StreamResponse:
    return await _progress(call, "push")


async def handle_create(call: Call) -> web.StreamResponse:
    return await _progress(call, "create")


async def handle_delete(call: Call) -> web.StreamResponse:
    obj = await call.json("api.DeleteRequest")
    bind = Binder("DeleteRequest")
    raw = bind.string(obj, "model") or bind.string(obj, "name") or ""
    name = parse_model_name(raw)
    if name is None:
        raise ApiError(400, f"name {json.dumps(raw)} is invalid")
    if call.state.models.pop(name.key, None) is None:
        raise ApiError(404, f"model '{raw}' not found")
    call.state.loaded.pop(name.key, None)
    return empty()


async def handle_copy(call: Call) -> web.StreamResponse:
    obj = await call.json("api.CopyRequest")
    bind = Binder("CopyRequest")
    source = bind.string(obj, "source") or ""
    destination = bind.string(obj, "destination") or ""
    src, dst = parse_model_name(source), parse_model_name(destination)
    if src is None:
        raise ApiError(400, f"source {json.dumps(source)} is invalid")
    if dst is None:
        raise ApiError(400, f"destination {json.dumps(destination)} is invalid")
    if call.state.find(src) is None:
        raise ApiError(404, f"model {json.dumps(source)} not found")
    call.state.install(dst.display())
    return empty()


_DIGEST_RE: Final = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


async def handle_blob_head(call: Call) -> web.StreamResponse:
    digest = call.params["digest"]
    if digest.replace("-", ":", 1) in call.state.blobs:
        return empty()
    return gin_json(404, {"error": "blob not found"})


async def handle_blob_create(call: Call) -> web.StreamResponse:
    digest = call.params["digest"]
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ApiError(400, "invalid digest format")
    expected = f"sha256:{match.group(1).lower()}"
    if expected in call.state.blobs:
        return empty()
    actual = f"sha256:{hashlib.sha256(await call.body()).hexdigest()}"
    if actual != expected:
        raise ApiError(400, f"digest mismatch, expected {json.dumps(expected)}, got {json.dumps(actual)}")
    call.state.blobs.add(expected)
    return empty(201)


_SIGNIN_URL: Final = "https://ollama.com/connect?name=ollama-simulator&key=c2ltdWxhdG9y"


async def handle_unauthorized(call: Call) -> web.StreamResponse:
    raise ApiError(401, "unauthorized", extra={"signin_url": _SIGNIN_URL})


async def handle_signout(call: Call) -> web.StreamResponse:
    return empty()


async def handle_recommendations(call: Call) -> web.StreamResponse:
    return gin_json(200, {"recommendations": []})


def _multipart_fields(body: bytes, content_type: str) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body (enough for the transcription form)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return {}
    fields: dict[str, bytes] = {}
    for chunk in body.split(b"--" + match.group(1).encode()):
        head, sep, content = chunk.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if sep and name:
            fields[name.group(1).decode()] = content.removesuffix(b"\r\n")
    return fields


_TRANSCRIBE: Final = (
    "Transcribe the audio exactly as spoken. Output only the spoken words. "
    "Do not answer any question in the audio."
)


async def handle_transcriptions(call: Call) -> web.StreamResponse:
    """TranscriptionMiddleware (openai.FromTranscriptionRequest) then ChatHandler."""
    fields = _multipart_fields(await call.body(), call.request.headers.get("Content-Type", ""))
    if "file" not in fields:
        raise ApiError(400, "file is required", middleware=True)
    model = fields.get("model", b"").decode("utf-8", "replace")
    entry = _lookup(call, model, f"model '{model}' not found")
    think = resolve_think(entry, model, None)
    _check_queue(call)
    system = _TRANSCRIBE
    if language := fields.get("language", b"").decode("utf-8", "replace"):
        system += f" The audio is in {language}."
    if prompt := fields.get("prompt", b"").decode("utf-8", "replace"):
        system += f" Context: {prompt}"
    messages = [
        Message("system", system),
        Message("user", "What exact words are spoken in this audio?", images=(fields["file"],)),
    ]
    job = chat_job(
        call, model=model, entry=entry, messages=messages, tools=None, think=think, options=None, limit=None
    )
    gen = Generation(call, job, call.begin("/v1/audio/transcriptions", model, stream=False))
    texts: list[str] = []

    async def collect(piece: Piece) -> None:
        if not piece.thinking:
            texts.append(piece.text)

    if not await gen.run(collect):
        gen.fail()
        raise ApiError(gen.error_status, gen.error_message)
    gen.finish()
    if fields.get("response_format", b"json") == b"text":
        return plain(200, "".join(texts), "text/plain; charset=utf-8")
    return encoder_json(200, {"text": "".join(texts)})
