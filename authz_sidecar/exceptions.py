"""Denials the sidecar answers with; one middleware turns them into dialect-correct responses."""

from __future__ import annotations

from collections.abc import Mapping


class Denied(Exception):
    """A request refused with an HTTP status, a client-safe message and optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.code = code
        self.headers = dict(headers or {})
