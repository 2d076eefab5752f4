"""The protocol every API family implements, and the pieces the families share.

An adapter alone knows, for the routes of its family: which fields name models; whether the
request streams (as Ollama decides it); where the completion limit lives and how the clamped limit
is written; what the prompt's upper bound is made of; how usage is asked for and hidden; how counts
are read from a whole answer or from each piece of a stream; and how a stream cut at the limit
ends. stream_proxy/proxy.py calls these through `adapter(route)` and has no route switches of its
own (docs/ARCHITECTURE.md#api-families-and-adapters).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from shared import policy
from stream_proxy import body, meter
from stream_proxy.exceptions import Refused

# int32 max: the largest completion limit any Ollama runner accepts (num_predict is an int).
MAX_COMPLETION = 2**31 - 1


@attrs.frozen
class Framing:
    """What the adapter arranged for the answer before the request went upstream."""

    hide_usage: bool = False  # drop the usage piece the gateway asked for (the client did not)
    strip_zero_usage: bool = False  # /v1/completions: Ollama's zero usage on every chunk
    keep_text: bool = False  # keep the generated text for the prompt log
    text_limit: int = meter.MAX_LOGGED_TEXT  # UTF-8 bytes of it kept at most (GATEWAY_PROMPT_LOG_MAX_BYTES)


class Reader(Protocol):
    """Reads one answer as it passes: counts tokens, may rewrite or drop stream pieces."""

    count: meter.Count
    text: list[str]

    def whole(self, document: Any) -> None:
        """A complete (non-streamed) JSON answer."""

    def line(self, document: Any) -> None:
        """One NDJSON object of a stream (relayed byte for byte; only observed)."""

    def event(self, name: str | None, data: bytes, raw: bytes) -> bytes:
        """One SSE event (`raw` with its separator); returns the bytes to relay (b"" drops it)."""

    def tail(self) -> bytes:
        """The final piece of a stream cut at the completion limit, in the family's format."""


class Api(Protocol):
    """One API family's adapter."""

    @property
    def family(self) -> policy.Family:
        """The family this adapter speaks."""

    def models(self, route: policy.Route, document: dict[str, Any]) -> list[Any] | None:
        """The values naming models in the body (None: this route names no model in its body)."""

    def path_model(self, route: policy.Route, raw_path: str) -> str | None:
        """The model a route names in its path (None: it names none there)."""

    def refuse(self, route: policy.Route, document: dict[str, Any]) -> None:
        """Refuse (400) what this family must never forward (egress tools, invalid limits)."""

    def streams(self, route: policy.Route, document: dict[str, Any]) -> bool:
        """Whether Ollama will stream the answer, decided as Ollama decides it."""

    def requested_completion(self, route: policy.Route, document: dict[str, Any]) -> int | None:
        """The completion limit the client asked for (0: none is generated; None: unlimited)."""

    def write_completion(self, route: policy.Route, doc: body.Body, limit: int) -> None:
        """Forward the clamped completion limit in the field Ollama reads for this route."""

    def prompt(self, route: policy.Route, document: dict[str, Any]) -> meter.PromptSize:
        """What the prompt of a metered request is made of (for its upper bound)."""

    def prepare(self, route: policy.Route, doc: body.Body, *, streaming: bool, keep_text: bool) -> Framing:
        """Ask Ollama for what metering needs (usage on OpenAI streams) before the request goes."""

    def reader(self, route: policy.Route, framing: Framing) -> Reader:
        """A reader for one answer."""

    def listing(self, route: policy.Route) -> tuple[str, tuple[str, ...]] | None:
        """For a model listing: (field holding the entries, fields naming the model), else None."""


def positive_int(value: Any) -> int | None:
    """A JSON integer > 0 (bools excluded; integral floats accepted as Go's int fields accept them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    number = int(value)
    return number if number > 0 else None


def check_limit(value: Any, name: str, *, any_number: bool = False) -> None:
    """A completion limit Ollama would not read as sent is refused before any reservation (400):
    not an integer (`any_number`: Go's options map takes any number and truncates it), or above
    2**31 - 1. Absent is fine; negative means "no limit" to Ollama."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (isinstance(value, float) and not any_number):
        raise Refused(400, f"{name} must be an integer")
    if value > MAX_COMPLETION:
        raise Refused(400, f"{name} must be at most {MAX_COMPLETION}")


def text_bytes(value: Any) -> int:
    """UTF-8 bytes of a string (0 for anything else)."""
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def json_bytes(value: Any) -> int:
    """Bytes of a structured field (tools, tool calls, a schema) as JSON (0 when absent)."""
    return 0 if value is None else len(meter.dumps(value))


def field_text(value: Any) -> int:
    """A field that is text or structured: its text bytes, or its JSON bytes."""
    return text_bytes(value) if isinstance(value, str) else json_bytes(value)


@attrs.frozen
class ChatMiddleware:
    """What the families Ollama serves through middleware in front of its chat handler (Anthropic
    Messages, OpenAI Responses) share: one route, `model` in the body, `stream: true` streams, usage
    always in the answer, no listing."""

    def models(self, route: policy.Route, document: dict[str, Any]) -> list[Any] | None:
        """`model`."""
        return [body.get(document, "model")]

    def path_model(self, route: policy.Route, raw_path: str) -> str | None:
        """No model in the path."""
        return None

    def streams(self, route: policy.Route, document: dict[str, Any]) -> bool:
        """`stream: true` streams (a Go bool that defaults to false)."""
        return body.get(document, "stream") is True

    def prepare(self, route: policy.Route, doc: body.Body, *, streaming: bool, keep_text: bool) -> Framing:
        """The answer always carries its usage: nothing to ask for."""
        return Framing(keep_text=keep_text)

    def listing(self, route: policy.Route) -> tuple[str, tuple[str, ...]] | None:
        """No listing."""
        return None


@attrs.define
class CountingReader:
    """The part of every reader that keeps counts and the prompt-log text."""

    framing: Framing
    count: meter.Count = attrs.Factory(meter.Count)
    text: list[str] = attrs.Factory(list)
    text_bytes: int = 0

    def produced(self, text: str | None = None) -> None:
        """One piece of generated output passed (content, thinking or a tool call); its text is kept
        for the prompt log up to the framing's byte limit, cut at a character boundary."""
        self.count.content_chunks += 1
        if not (self.framing.keep_text and isinstance(text, str) and text):
            return
        room = self.framing.text_limit - self.text_bytes
        if room <= 0:
            return
        kept = meter.utf8_prefix(text, room)
        if kept:
            self.text.append(kept)
        # Once a piece is cut, nothing after it is kept (the log stays a prefix of the output).
        self.text_bytes = (
            self.framing.text_limit
            if kept != text
            else self.text_bytes + len(kept.encode("utf-8", "surrogatepass"))
        )
