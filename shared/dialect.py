"""Error bodies in the caller's dialect: Ollama `{"error": "…"}` under /api, OpenAI under /v1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from aiohttp import web

Dialect = Literal["ollama", "openai"]

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def dialect_of(path: str) -> Dialect:
    """OpenAI for `/v1/...`, Ollama for everything else."""
    return "openai" if path.startswith("/v1/") or path == "/v1" else "ollama"


def error_body(dialect: Dialect, status: int, message: str, *, code: str | None = None) -> bytes:
    """The JSON error document for one dialect."""
    if dialect == "ollama":
        return orjson.dumps({"error": message})
    err_type = (
        "insufficient_quota" if code == "insufficient_quota" else _OPENAI_TYPES.get(status, "api_error")
    )
    return (
        orjson.dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}}) + b"\n"
    )


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A complete error response in the dialect the request path implies."""
    dialect = dialect_of(path)
    content_type = "application/json; charset=utf-8" if dialect == "ollama" else "application/json"
    return web.Response(
        status=status,
        body=error_body(dialect, status, message, code=code),
        headers={"Content-Type": content_type, **(headers or {})},
    )
