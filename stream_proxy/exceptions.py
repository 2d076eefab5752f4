"""Refusals stream_proxy answers with before anything reaches Ollama."""

from __future__ import annotations

from collections.abc import Mapping


class Refused(Exception):
    """A request refused with an HTTP status and a client-safe message."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class GrantSpent(Refused):
    """The grant was already used: the request it was issued for owns its lease and its usage, so
    refusing this copy must release and record nothing."""

    def __init__(self) -> None:
        super().__init__(403, "request not authorised by the gateway: grant already used")
