"""Error bodies in the caller's dialect: Ollama `{"error": "…"}` under /api, OpenAI under /v1,
Anthropic under /v1/messages (docs/ARCHITECTURE.md#api-families-and-adapters).

The dialect follows the path, not the route table, so that a refusal of a path the gateway does
not serve (a 404, a blocked route, an ambiguous spelling) is still in the caller's dialect: a
client of /v1/messages/count_tokens is an Anthropic client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from aiohttp import web

Dialect = Literal["ollama", "openai", "anthropic"]

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# The types the Anthropic SDK knows (it raises by status; the type names the cause).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"


def dialect_of(path: str) -> Dialect:
    """Anthropic for `/v1/messages[/...]`, OpenAI for the rest of `/v1/...`, Ollama otherwise."""
    path = path.split("?", 1)[0]
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") or path == "/v1" else "ollama"


def _anthropic_type(status: int) -> str:
    if status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(
    dialect: Dialect, status: int, message: str, *, code: str | None = None, request_id: str | None = None
) -> bytes:
    """The JSON error document for one dialect."""
    if dialect == "ollama":
        return orjson.dumps({"error": message})
    if dialect == "anthropic":
        document: dict[str, object] = {
            "type": "error",
            "error": {"type": _anthropic_type(status), "message": message},
        }
        if request_id:
            document["request_id"] = request_id
        return orjson.dumps(document)
    err_type = (
        "insufficient_quota" if code == "insufficient_quota" else _OPENAI_TYPES.get(status, "api_error")
    )
    return (
        orjson.dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}}) + b"\n"
    )


def content_type(dialect: Dialect) -> str:
    """Ollama's gin writes a charset; its OpenAI and Anthropic writers do not."""
    return "application/json; charset=utf-8" if dialect == "ollama" else "application/json"


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> web.Response:
    """A complete error response in the dialect the request path implies."""
    dialect = dialect_of(path)
    return web.Response(
        status=status,
        body=error_body(dialect, status, message, code=code, request_id=request_id),
        headers={"Content-Type": content_type(dialect), **(headers or {})},
    )
