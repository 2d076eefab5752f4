"""The simulator's errors: an API answer to render, or a client that went away."""

from __future__ import annotations

from typing import Any, Final

# Ollama's error texts, shared by the routes that answer them.
MSG_MISSING_BODY: Final = "missing request body"
MSG_MODEL_REQUIRED: Final = "model is required"
MSG_INVALID_NAME: Final = "invalid model name"
MSG_QUEUE_FULL: Final = "server busy, please try again.  maximum pending requests exceeded"
MSG_CLOUD_DISABLED: Final = "ollama cloud is disabled: remote model is unavailable"
MSG_RAW_CONFLICT: Final = "raw mode does not support template, system, or context"


class ApiError(Exception):
    """An error answer; the route's dialect decides its shape unless `native` forces Ollama's.

    `middleware` marks /v1 validation errors, which gin writes (charset, no newline).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        native: bool = False,
        middleware: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.native = native
        self.middleware = middleware
        self.extra = extra or {}


class ClientGone(Exception):
    """The client closed the connection; generation stops like Ollama's does."""
