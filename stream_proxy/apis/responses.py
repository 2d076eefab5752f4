"""Ollama's OpenAI Responses API: POST /v1/responses, what Codex speaks (stateless, as Ollama
serves it) (docs/OLLAMA.md#openai-responses-api).

`stream: true` streams SSE (`event:` + `data:`, each with a `sequence_number`), ending with
`response.completed` and no `[DONE]`. The completion limit is `max_output_tokens`. Counts are the
`usage` of the response body or of `response.completed`. A `web_search` tool makes Ollama search
ollama.com itself and run follow-up generations outside the reservation: refused.
"""

from __future__ import annotations

from typing import Any

import attrs

from shared import policy
from stream_proxy import body, meter
from stream_proxy.apis.anthropic import sse
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

_NOT_RENDERED = frozenset({"type", "id", "call_id", "status", "role", "encrypted_content"})
_IMAGE_PARTS = frozenset({"input_image", "image", "input_file"})
_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
    }
)


def _content(value: Any) -> tuple[int, int]:
    """(text bytes, images) of `input` or `instructions`: every rendered string, images apart."""
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
    if body.get(value, "type") in _IMAGE_PARTS:
        return 0, 1
    size = images = 0
    for key, item in value.items():
        if key.lower() in _NOT_RENDERED:
            continue
        more, pictures = _content(item)
        size, images = size + more, images + pictures
    return size, images


def is_web_search(tool: Any) -> bool:
    """`web_search` (Ollama's rule), and the `web_search_preview` spellings, at any depth of a
    `namespace` tool."""
    kind = body.get(tool, "type")
    if isinstance(kind, str) and kind.strip().lower().startswith("web_search"):
        return True
    members = body.get(tool, "tools")
    return isinstance(members, list) and any(is_web_search(member) for member in members)


def _output_text(item: dict[str, Any]) -> str | None:
    """The text of a whole answer's `message` output item (its `output_text` parts)."""
    content = item.get("content") if item.get("type") == "message" else None
    parts = [
        part["text"]
        for part in (content if isinstance(content, list) else [])
        if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str)
    ]
    return "".join(parts) or None


@attrs.define
class ResponsesReader(CountingReader):
    """Reads Responses answers: one response object, or the event stream."""

    response: dict[str, Any] | None = None
    items: dict[int, dict[str, Any]] = attrs.Factory(dict)
    texts: dict[int, list[str]] = attrs.Factory(dict)
    sequence: int = -1

    def whole(self, document: Any) -> None:
        """A complete response: counts from `usage`."""
        if not isinstance(document, dict):
            return
        if "error" in document and document.get("object") != "response":
            self.count.error = True
            return
        self._usage(document.get("usage"))
        for item in document.get("output") or []:
            if isinstance(item, dict):
                self.produced(_output_text(item))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.count.prompt_tokens, self.count.completion_tokens = prompt, completion
            self.count.finished = True

    def line(self, document: Any) -> None:
        """Responses answers are never NDJSON; observed as a whole body."""
        self.whole(document)

    def event(self, name: str | None, data: bytes, raw: bytes) -> bytes:
        """Count one event, and remember what a cut stream must close; relayed as it came."""
        document = meter.loads(data)
        if not isinstance(document, dict):
            return raw
        kind = document.get("type")
        sequence = document.get("sequence_number")
        if isinstance(sequence, int):
            self.sequence = max(self.sequence, sequence)
        if kind in _DELTAS:
            delta = document.get("delta")
            index = document.get("output_index")
            if isinstance(index, int) and isinstance(delta, str):
                self.texts.setdefault(index, []).append(delta)
            self.produced(delta if kind == "response.output_text.delta" else None)
        elif kind in ("response.created", "response.in_progress"):
            response = document.get("response")
            self.response = response if isinstance(response, dict) else self.response
        elif kind == "response.output_item.added":
            index, item = document.get("output_index"), document.get("item")
            if isinstance(index, int) and isinstance(item, dict):
                self.items[index] = item
        elif kind == "response.output_item.done":
            index = document.get("output_index")
            if isinstance(index, int):
                self.items.pop(index, None)
        elif kind == "response.completed":
            response = document.get("response")
            self._usage(response.get("usage") if isinstance(response, dict) else None)
        elif kind in ("response.failed", "error"):
            self.count.error = True
        return raw

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def _closed(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self.texts.get(index, ()))
        done = {**item, "status": "incomplete"}
        if item.get("type") == "message":
            done["content"] = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        elif item.get("type") == "function_call":
            done["arguments"] = text
        return done

    def tail(self) -> bytes:
        """Close every open output item, then `response.completed` with status `incomplete`."""
        out = b""
        closed = []
        for index, item in sorted(self.items.items()):
            done = self._closed(index, item)
            closed.append(done)
            event = {
                "type": "response.output_item.done",
                "sequence_number": self._next(),
                "output_index": index,
                "item": done,
            }
            out += sse("response.output_item.done", event)
        response = {
            **(self.response or {"object": "response"}),
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "output": closed,
        }
        final = {"type": "response.completed", "sequence_number": self._next(), "response": response}
        return out + sse("response.completed", final)


@attrs.frozen
class Responses(ChatMiddleware):
    """The OpenAI Responses family's adapter."""

    family: policy.Family = "responses"

    def refuse(self, route: policy.Route, document: dict[str, Any]) -> None:
        """Web-search tools (egress) and an absurd `max_output_tokens`."""
        tools = body.get(document, "tools")
        if isinstance(tools, list) and any(is_web_search(tool) for tool in tools):
            raise Refused(400, "web search tools are not available on this gateway")
        check_limit(body.get(document, "max_output_tokens"), "max_output_tokens")

    def requested_completion(self, route: policy.Route, document: dict[str, Any]) -> int | None:
        """`max_output_tokens` (None: unlimited)."""
        return positive_int(body.get(document, "max_output_tokens"))

    def write_completion(self, route: policy.Route, doc: body.Body, limit: int) -> None:
        """`max_output_tokens` (Ollama's num_predict)."""
        body.put(doc.document, "max_output_tokens", limit)
        doc.changed = True

    def prompt(self, route: policy.Route, document: dict[str, Any]) -> meter.PromptSize:
        """Instructions, every input item, tools and the text format's schema as JSON."""
        size, images = _content(body.get(document, "instructions"))
        messages = 1 if size else 0
        value = body.get(document, "input")
        for item in value if isinstance(value, list) else [value]:
            more, pictures = _content(item)
            size, images, messages = size + more, images + pictures, messages + 1
        size += json_bytes(body.get(document, "tools")) + json_bytes(body.get(document, "text"))
        return meter.PromptSize(text_bytes=size, messages=messages, images=images, context_tokens=0)

    def reader(self, route: policy.Route, framing: Framing) -> ResponsesReader:
        """A Responses reader."""
        return ResponsesReader(framing)
