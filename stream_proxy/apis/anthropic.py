"""Ollama's Anthropic Messages API: POST /v1/messages, what Claude Code speaks
(docs/OLLAMA.md#anthropic-messages-api).

`stream: true` streams SSE (`event:` + `data:`), ending with `message_stop` and no `[DONE]`. The
completion limit is `max_tokens`, required and > 0. The real counts are in the final
`message_delta`'s `usage` (`message_start`'s `input_tokens` is a length/4 estimate, not a count).
Tools whose `type` starts with `web_search` make Ollama search ollama.com itself under the operator's
identity and run follow-up generations outside the reservation: refused (docs/DECISIONS.md).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from shared import policy
from stream_proxy import body, meter
from stream_proxy.apis.base import (
    ChatMiddleware,
    CountingReader,
    Framing,
    check_limit,
    json_bytes,
    positive_int,
    text_bytes,
)
from stream_proxy.exceptions import Refused

# Block fields that are identifiers or markers, not text the template renders.
_NOT_RENDERED = frozenset({"type", "id", "tool_use_id", "signature", "cache_control", "is_error"})


def _content(value: Any) -> tuple[int, int]:
    """(text bytes, images) of a string or a list of content blocks (text, image, tool_use,
    tool_result, thinking): every rendered string, tool inputs as JSON, images counted apart."""
    if isinstance(value, str):
        return text_bytes(value), 0
    if isinstance(value, list):
        size = images = 0
        for item in value:
            more, pictures = _content(item)
            size, images = size + more, images + pictures
        return size, images
    if not isinstance(value, dict):
        return (json_bytes(value), 0) if value is not None else (0, 0)
    if body.get(value, "type") == "image" or body.get(value, "source") is not None:
        return 0, 1
    size = images = 0
    for key, item in value.items():
        if key.lower() in _NOT_RENDERED:
            continue
        if key.lower() == "input":
            size += json_bytes(item)
            continue
        more, pictures = _content(item)
        size, images = size + more, images + pictures
    return size, images


def is_web_search(tool: Any) -> bool:
    """Ollama's rule (`strings.HasPrefix(t.Type, "web_search")`), case-insensitive to be safe."""
    kind = body.get(tool, "type")
    return isinstance(kind, str) and kind.strip().lower().startswith("web_search")


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE event."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@attrs.define
class AnthropicReader(CountingReader):
    """Reads Messages answers: one `message` body, or the event stream."""

    message_id: str | None = None
    model: str | None = None
    estimate: int = 0
    open_block: int | None = None

    def whole(self, document: Any) -> None:
        """A complete message: counts from `usage`."""
        if not isinstance(document, dict):
            return
        if document.get("type") == "error" or "error" in document:
            self.count.error = True
            return
        self._usage(document.get("usage"))
        for block in document.get("content") or []:
            if isinstance(block, dict) and block.get("type") in ("text", "thinking", "tool_use"):
                self.produced(block.get("text"))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.count.prompt_tokens, self.count.completion_tokens = prompt, completion
            self.count.finished = True

    def line(self, document: Any) -> None:
        """Messages answers are never NDJSON; observed as a whole body."""
        self.whole(document)

    def event(self, name: str | None, data: bytes, raw: bytes) -> bytes:
        """Count one event; everything is relayed as it came."""
        document = meter.loads(data)
        if not isinstance(document, dict):
            return raw
        kind = document.get("type")
        if kind == "message_start":
            message = document.get("message")
            if isinstance(message, dict):
                self.message_id, self.model = message.get("id"), message.get("model")
                usage = message.get("usage")
                estimate = usage.get("input_tokens") if isinstance(usage, dict) else None
                self.estimate = estimate if isinstance(estimate, int) else 0
        elif kind == "content_block_start":
            index = document.get("index")
            self.open_block = index if isinstance(index, int) else None
        elif kind == "content_block_delta":
            delta = document.get("delta")
            self.produced(delta.get("text") if isinstance(delta, dict) else None)
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_delta":
            self._usage(document.get("usage"))
        elif kind == "error":
            self.count.error = True
        return raw

    def tail(self) -> bytes:
        """Close the open block, then `message_delta` (stop_reason `max_tokens`) and `message_stop`."""
        out = b""
        if self.open_block is not None:
            out += sse("content_block_stop", {"type": "content_block_stop", "index": self.open_block})
        usage = {"input_tokens": self.estimate, "output_tokens": self.count.content_chunks}
        delta = {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": usage}
        return out + sse("message_delta", delta) + sse("message_stop", {"type": "message_stop"})


@attrs.frozen
class Anthropic(ChatMiddleware):
    """The Anthropic Messages family's adapter."""

    family: policy.Family = "anthropic"

    def refuse(self, route: policy.Route, document: dict[str, Any]) -> None:
        """Web-search tools (egress), and a `max_tokens` that Ollama would refuse or that is absurd."""
        tools = body.get(document, "tools")
        if isinstance(tools, list) and any(is_web_search(tool) for tool in tools):
            raise Refused(400, "web search tools are not available on this gateway")
        limit = body.get(document, "max_tokens")
        check_limit(limit, "max_tokens")
        if positive_int(limit) is None:
            raise Refused(400, "max_tokens is required and must be positive")

    def requested_completion(self, route: policy.Route, document: dict[str, Any]) -> int | None:
        """`max_tokens` (required, so never unlimited)."""
        return positive_int(body.get(document, "max_tokens"))

    def write_completion(self, route: policy.Route, doc: body.Body, limit: int) -> None:
        """`max_tokens`, which must stay > 0 (the reservation never clamps below 1)."""
        body.put(doc.document, "max_tokens", max(1, limit))
        doc.changed = True

    def prompt(self, route: policy.Route, document: dict[str, Any]) -> meter.PromptSize:
        """System text, every message's blocks, tool definitions as JSON."""
        size, images = _content(body.get(document, "system"))
        messages = 1 if size else 0
        msgs = body.get(document, "messages")
        for message in msgs if isinstance(msgs, list) else []:
            more, pictures = _content(body.get(message, "content")) if isinstance(message, dict) else (0, 0)
            size, images, messages = size + more, images + pictures, messages + 1
        size += json_bytes(body.get(document, "tools"))
        return meter.PromptSize(text_bytes=size, messages=messages, images=images, context_tokens=0)

    def reader(self, route: policy.Route, framing: Framing) -> AnthropicReader:
        """A Messages reader."""
        return AnthropicReader(framing)
