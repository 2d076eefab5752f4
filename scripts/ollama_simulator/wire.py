"""Response framing: gin and encoder JSON, error bodies per dialect, NDJSON and SSE emitters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
from aiohttp import web

from ollama_simulator.exceptions import ApiError, ClientGone
from ollama_simulator.gojson import go_json
from ollama_simulator.recorder import GenerationRecord

if TYPE_CHECKING:  # state.py builds on the wire helpers; the emitter only names the Call type
    from ollama_simulator.state import Call

CT_GIN_JSON: Final = "application/json; charset=utf-8"


CT_JSON: Final = "application/json"


CT_NDJSON: Final = "application/x-ndjson"


CT_SSE: Final = "text/event-stream"


CT_TEXT: Final = "text/plain"


def gin_json(status: int, payload: Any) -> web.Response:
    """gin's c.JSON: charset in the Content-Type, no trailing newline."""
    return web.Response(status=status, body=go_json(payload), headers={"Content-Type": CT_GIN_JSON})


def encoder_json(status: int, payload: Any) -> web.Response:
    """json.NewEncoder(w).Encode as the OpenAI writers use it: trailing newline, no charset."""
    body = go_json(payload) + b"\n"
    return web.Response(status=status, body=body, headers={"Content-Type": CT_JSON})


def plain(status: int, text: str, content_type: str = CT_TEXT) -> web.Response:
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": content_type})


def empty(status: int = 200) -> web.Response:
    return web.Response(status=status)


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
    }.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


Dialect = Literal["native", "openai", "anthropic"]


def render_error(error: ApiError, dialect: Dialect) -> web.Response:
    """The error body in the caller's dialect, framed as the Go code that writes it frames it."""
    if error.native or dialect == "native":
        return gin_json(error.status, {"error": error.message, **error.extra})
    if dialect == "anthropic":
        return gin_json(error.status, anthropic_error_body(error.status, error.message))
    if error.middleware:
        return gin_json(error.status, openai_error_body(error.status, error.message))
    return encoder_json(error.status, openai_error_body(error.status, error.message))


@attrs.define
class Emitter:
    """Writes one stream, preparing the response only when the first chunk exists."""

    call: Call
    response: web.StreamResponse
    generation: GenerationRecord | None = None

    @property
    def started(self) -> bool:
        return self.response.prepared

    def _check(self) -> None:
        transport = self.call.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone

    async def send(self, data: bytes) -> None:
        self._check()
        try:
            if not self.response.prepared:
                await self.response.prepare(self.call.request)
            await self.response.write(data)
        except ConnectionError as e:
            raise ClientGone from e
        self.call.record.response_body += data
        if self.generation is not None:
            self.generation.chunks_sent += 1


def _stream_response(content_type: str, **headers: str) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.headers["Content-Type"] = content_type
    response.headers.update(headers)
    return response


def _sse(payload: Any) -> bytes:
    return b"data: " + go_json(payload) + b"\n\n"


_SSE_DONE: Final = b"data: [DONE]\n\n"


def _sse_event(event: str, payload: Any) -> bytes:
    return f"event: {event}\ndata: ".encode() + go_json(payload) + b"\n\n"
