"""The API-family adapters of stream_proxy for /v1/messages and /v1/responses, and what every family
shares: which route goes to which adapter, refusals before any reservation, the completion limit,
the prompt bound's parts, and the readers that count tokens from answers and end cut streams.

Expected values are written by hand from Ollama's wire format (docs/OLLAMA.md), not computed with
the adapters themselves.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import policy
from stream_proxy import apis, body
from stream_proxy.apis.base import Framing
from stream_proxy.exceptions import Refused

MESSAGES: policy.Route = "anthropic_messages"
RESPONSES: policy.Route = "openai_responses"
NATIVE_CHAT: policy.Route = "chat"


def _doc(document: dict[str, Any]) -> body.Body:
    raw = orjson.dumps(document)
    return body.Body.read(raw)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def _feed(reader: apis.Reader, raw_events: list[bytes]) -> bytes:
    """Feed whole SSE events as the relay does; returns what would be relayed."""
    out = b""
    for raw in raw_events:
        lines = raw.rstrip(b"\n").split(b"\n")
        name = next((ln[7:].decode() for ln in lines if ln.startswith(b"event: ")), None)
        data = next((ln[6:] for ln in lines if ln.startswith(b"data: ")), b"")
        out += reader.event(name, data, raw)
    return out


def _events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    parsed = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        parsed.append((name_line[7:].decode(), orjson.loads(data_line[6:])))
    return parsed


# --- routing ------------------------------------------------------------------------------------


def test_every_route_has_a_family_and_every_family_an_adapter() -> None:
    """The route table names a family for every served route, and each family has its adapter."""
    routes = {route for methods in policy.ALLOWED.values() for route in methods.values()} | {"openai_model"}
    assert routes == set(policy.FAMILY)
    assert set(policy.FAMILY.values()) == set(apis.ADAPTERS)
    assert policy.FAMILY[MESSAGES] == "anthropic"
    assert policy.FAMILY[RESPONSES] == "responses"
    for route in policy.FAMILY:
        assert apis.adapter(route).family == policy.FAMILY[route]


@pytest.mark.parametrize(("path", "route"), [("/v1/messages", MESSAGES), ("/v1/responses", RESPONSES)])
def test_new_routes_are_served_and_metered(path: str, route: policy.Route) -> None:
    """POST /v1/messages and /v1/responses are admitted, metered; other methods get 405."""
    decision = policy.decide("POST", path)
    assert (decision.status, decision.route) == (200, route)
    assert route in policy.METERED
    assert policy.decide("GET", path).status == 405


# --- /v1/messages ---------------------------------------------------------------------------------


def test_messages_streams_only_when_asked() -> None:
    """Anthropic `stream` is a bool that defaults to false."""
    adapter = apis.adapter(MESSAGES)
    assert adapter.streams(MESSAGES, {"stream": True}) is True
    assert adapter.streams(MESSAGES, {}) is False
    assert adapter.streams(MESSAGES, {"stream": None}) is False
    assert adapter.streams(MESSAGES, {"STREAM": True}) is True  # Go matches keys case-insensitively


@pytest.mark.parametrize("value", [None, 0, -5, "100", 1.5, True])
def test_messages_without_a_positive_max_tokens_are_refused(value: Any) -> None:
    """`max_tokens` is required and > 0 (Ollama refuses the rest): refused before any reservation."""
    document: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if value is not None:
        document["max_tokens"] = value
    with pytest.raises(Refused) as refused:
        apis.adapter(MESSAGES).refuse(MESSAGES, document)
    assert refused.value.status == 400
    assert "max_tokens" in refused.value.message


def test_messages_absurd_max_tokens_is_refused() -> None:
    """A max_tokens above 2**31 - 1 is a 400, not a Lua number."""
    with pytest.raises(Refused) as refused:
        apis.adapter(MESSAGES).refuse(MESSAGES, {"max_tokens": 2**31})
    assert refused.value.status == 400
    apis.adapter(MESSAGES).refuse(MESSAGES, {"max_tokens": 2**31 - 1})


def test_messages_completion_limit_is_max_tokens_and_stays_positive() -> None:
    """The clamped limit replaces the client's max_tokens (whatever its spelling) and is never 0."""
    adapter = apis.adapter(MESSAGES)
    assert adapter.requested_completion(MESSAGES, {"max_tokens": 300}) == 300
    doc = _doc({"model": "m", "Max_Tokens": 300, "messages": []})
    adapter.write_completion(MESSAGES, doc, 40)
    assert orjson.loads(doc.encoded()) == {"model": "m", "messages": [], "max_tokens": 40}
    adapter.write_completion(MESSAGES, doc, 0)
    assert doc.document["max_tokens"] == 1


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "web_search_20260101", "name": "search"},
        {"TYPE": "web_search_20250305", "name": "web_search"},
        {"type": "Web_Search_x", "name": "w"},
    ],
)
def test_messages_web_search_tools_are_refused(tool: dict[str, Any]) -> None:
    """Any tool whose type starts with web_search: Ollama would search ollama.com itself."""
    document = {"model": "m", "max_tokens": 10, "messages": [], "tools": [{"name": "f"}, tool]}
    with pytest.raises(Refused) as refused:
        apis.adapter(MESSAGES).refuse(MESSAGES, document)
    assert refused.value.status == 400
    assert "web search" in refused.value.message


def test_messages_custom_tools_are_not_refused() -> None:
    """Client-defined tools (no type, or `custom`) pass, even one named web_search."""
    tools = [{"name": "web_search", "input_schema": {}}, {"type": "custom", "name": "f"}]
    apis.adapter(MESSAGES).refuse(MESSAGES, {"max_tokens": 5, "tools": tools})


def test_messages_prompt_counts_every_rendered_field() -> None:
    """System (string or blocks), text, thinking, tool_use input, tool_result content and tool
    definitions all add to the bound at least their UTF-8 bytes; images are counted apart."""
    adapter = apis.adapter(MESSAGES)
    base = adapter.prompt(MESSAGES, {"max_tokens": 5, "messages": []})
    assert (base.text_bytes, base.images, base.messages) == (0, 0, 0)
    system = "sys tém"  # 8 bytes
    assert adapter.prompt(MESSAGES, {"system": system, "messages": []}).text_bytes >= 8
    blocks = {"system": [{"type": "text", "text": system}], "messages": []}
    assert adapter.prompt(MESSAGES, blocks).text_bytes >= 8
    message = {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "t" * 10, "signature": "s" * 500},
            {"type": "text", "text": "x" * 20},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    result = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "y" * 30}],
            },
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 4000}},
        ],
    }
    size = adapter.prompt(MESSAGES, {"messages": [message, result]})
    # thinking 10 + text 20 + name 11 + input as JSON 16 + result 30
    assert size.text_bytes >= 10 + 20 + len("get_weather") + len('{"city":"Paris"}') + 30
    assert size.text_bytes < 500  # the signature and the image data are not rendered text
    assert (size.images, size.messages) == (1, 2)
    tools = [{"name": "f", "description": "d" * 50, "input_schema": {"type": "object"}}]
    assert adapter.prompt(MESSAGES, {"messages": [], "tools": tools}).text_bytes >= 50


def test_messages_reader_counts_from_message_delta_not_message_start() -> None:
    """message_start's input_tokens is an estimate; the final message_delta's usage is the count."""
    reader = apis.adapter(MESSAGES).reader(MESSAGES, Framing())
    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 999, "output_tokens": 0}},
    }
    events = [
        _sse("message_start", start),
        _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {}}),
        _sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        ),
    ]
    relayed = _feed(reader, events)
    assert relayed == b"".join(events)
    assert (reader.count.prompt_tokens, reader.count.content_chunks) == (None, 1)
    _feed(
        reader,
        [
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": 27, "output_tokens": 3},
                },
            ),
            _sse("message_stop", {"type": "message_stop"}),
        ],
    )
    assert (reader.count.prompt_tokens, reader.count.completion_tokens) == (27, 3)
    assert reader.count.finished


def test_messages_reader_counts_a_whole_message() -> None:
    """A non-streamed message carries its usage in the body."""
    reader = apis.adapter(MESSAGES).reader(MESSAGES, Framing())
    reader.whole(
        {
            "type": "message",
            "content": [{"type": "text", "text": "Hi!"}],
            "usage": {"input_tokens": 12, "output_tokens": 4},
        }
    )
    assert (reader.count.prompt_tokens, reader.count.completion_tokens) == (12, 4)
    errored = apis.adapter(MESSAGES).reader(MESSAGES, Framing())
    errored.whole({"type": "error", "error": {"type": "not_found_error", "message": "x"}})
    assert errored.count.error
    assert errored.count.prompt_tokens is None


def test_messages_cut_stream_ends_with_a_valid_final_sequence() -> None:
    """A stream cut at the limit closes its open block, then message_delta (max_tokens) and
    message_stop, as the SDK expects a message to end."""
    reader = apis.adapter(MESSAGES).reader(MESSAGES, Framing())
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}
    delta = {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "a"}}
    _feed(
        reader,
        [
            _sse("message_start", start),
            _sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {}}),
            _sse("content_block_delta", delta),
            _sse("content_block_delta", delta),
        ],
    )
    assert _events(reader.tail()) == [
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens"},
                "usage": {"input_tokens": 5, "output_tokens": 2},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


# --- /v1/responses --------------------------------------------------------------------------------


def test_responses_limit_and_streaming() -> None:
    """max_output_tokens is the limit (absent: unlimited); stream defaults to false."""
    adapter = apis.adapter(RESPONSES)
    assert adapter.requested_completion(RESPONSES, {}) is None
    assert adapter.requested_completion(RESPONSES, {"max_output_tokens": 64}) == 64
    assert adapter.streams(RESPONSES, {}) is False
    assert adapter.streams(RESPONSES, {"stream": True}) is True
    doc = _doc({"model": "m", "input": "hi"})
    adapter.write_completion(RESPONSES, doc, 16)
    assert orjson.loads(doc.encoded()) == {"model": "m", "input": "hi", "max_output_tokens": 16}
    with pytest.raises(Refused):
        adapter.refuse(RESPONSES, {"max_output_tokens": 10**12})


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "web_search_preview_2025_03_11", "search_context_size": "low"},
        {"type": "namespace", "name": "ns", "tools": [{"type": "web_search"}]},
    ],
)
def test_responses_web_search_tools_are_refused(tool: dict[str, Any]) -> None:
    """The built-in web_search tool (and its preview spellings, and inside a namespace) is refused."""
    with pytest.raises(Refused) as refused:
        apis.adapter(RESPONSES).refuse(RESPONSES, {"input": "q", "tools": [tool]})
    assert refused.value.status == 400


def test_responses_function_tools_pass() -> None:
    """Function tools (even one named web_search) are the client's own."""
    tools = [{"type": "function", "name": "web_search", "parameters": {}}]
    apis.adapter(RESPONSES).refuse(RESPONSES, {"input": "q", "tools": tools})


def test_responses_prompt_counts_instructions_items_and_tools() -> None:
    """instructions, string input, message items, function calls and their outputs, tools and the
    text format all add at least their bytes; images are counted apart."""
    adapter = apis.adapter(RESPONSES)
    assert adapter.prompt(RESPONSES, {"input": "why is the sky blue?"}).text_bytes >= 20
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "a" * 10}]},
        {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 3000},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "b" * 30},
    ]
    size = adapter.prompt(RESPONSES, {"instructions": "i" * 40, "input": items})
    assert size.text_bytes >= 40 + 10 + len("get_weather") + len('{"city":"Paris"}') + 30
    assert size.text_bytes < 3000
    assert size.images == 1
    fmt = {"format": {"type": "json_schema", "schema": {"type": "object", "title": "t" * 60}}}
    assert adapter.prompt(RESPONSES, {"input": "q", "text": fmt}).text_bytes >= 60


def test_responses_reader_counts_from_response_completed() -> None:
    """Counts come from response.completed's response.usage; deltas are output pieces."""
    reader = apis.adapter(RESPONSES).reader(RESPONSES, Framing())
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "status": "x"}}
    delta = {"type": "response.output_text.delta", "sequence_number": 4, "output_index": 0, "delta": "Hi"}
    completed = {
        "type": "response.completed",
        "sequence_number": 9,
        "response": {"id": "resp_1", "usage": {"input_tokens": 26, "output_tokens": 2, "total_tokens": 28}},
    }
    _feed(reader, [_sse("response.created", created), _sse("response.output_text.delta", delta)])
    assert (reader.count.prompt_tokens, reader.count.content_chunks) == (None, 1)
    _feed(reader, [_sse("response.completed", completed)])
    assert (reader.count.prompt_tokens, reader.count.completion_tokens) == (26, 2)
    assert reader.count.finished
    whole = apis.adapter(RESPONSES).reader(RESPONSES, Framing())
    whole.whole({"object": "response", "output": [{}], "usage": {"input_tokens": 3, "output_tokens": 1}})
    assert (whole.count.prompt_tokens, whole.count.completion_tokens) == (3, 1)


def test_responses_cut_stream_closes_open_items_then_completes() -> None:
    """A cut stream closes every open output item (with the text so far), then sends
    response.completed (status incomplete) with the next sequence numbers and the same id."""
    reader = apis.adapter(RESPONSES).reader(RESPONSES, Framing())
    item: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1", "model": "m"}},
        {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item},
        {"type": "response.output_text.delta", "sequence_number": 2, "output_index": 0, "delta": "He"},
        {"type": "response.output_text.delta", "sequence_number": 3, "output_index": 0, "delta": "llo"},
    ]
    _feed(reader, [_sse(e["type"], e) for e in events])
    closed: dict[str, Any] = {**item, "status": "incomplete"}
    closed["content"] = [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert _events(reader.tail()) == [
        (
            "response.output_item.done",
            {"type": "response.output_item.done", "sequence_number": 4, "output_index": 0, "item": closed},
        ),
        (
            "response.completed",
            {
                "type": "response.completed",
                "sequence_number": 5,
                "response": {
                    "id": "resp_1",
                    "model": "m",
                    "status": "incomplete",
                    "incomplete_details": {"reason": "max_output_tokens"},
                    "output": [closed],
                },
            },
        ),
    ]


# --- shared -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "field"),
    [("chat", "options.num_predict"), ("openai_chat", "max_tokens"), ("openai_completions", "max_tokens")],
)
def test_absurd_limits_are_refused_on_every_family(route: policy.Route, field: str) -> None:
    """A completion limit above 2**31 - 1 is refused with 400 on the native and OpenAI routes too."""
    document: dict[str, Any] = (
        {"options": {"num_predict": 2**40}} if field.startswith("options") else {field: 2**40}
    )
    with pytest.raises(Refused) as refused:
        apis.adapter(route).refuse(route, document)
    assert refused.value.status == 400


def test_new_families_never_ask_for_usage() -> None:
    """Anthropic and Responses answers always carry usage: the body is forwarded unchanged."""
    for route in (MESSAGES, RESPONSES):
        doc = _doc({"model": "m", "stream": True, "max_tokens": 5})
        framing = apis.adapter(route).prepare(route, doc, streaming=True, keep_text=True)
        assert framing == Framing(keep_text=True)
        assert not doc.changed


def test_prompt_log_keeps_generated_text() -> None:
    """With prompt logging on, readers keep the generated text of text deltas."""
    reader = apis.adapter(MESSAGES).reader(MESSAGES, Framing(keep_text=True))
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
    _feed(reader, [_sse("content_block_delta", delta)])
    assert reader.text == ["Hello"]


@given(st.lists(st.text(min_size=1, max_size=40), max_size=60), st.integers(min_value=0, max_value=400))
def test_prompt_log_text_is_cut_at_its_byte_limit_never_inside_a_character(
    pieces: list[str], limit: int
) -> None:
    """The kept text is the longest whole-character prefix of the output that fits in `limit`
    UTF-8 bytes: what is kept is a prefix of what was generated, within the limit, and only the
    next character (at most 4 bytes) would not have fitted."""
    reader = apis.adapter(NATIVE_CHAT).reader(NATIVE_CHAT, Framing(keep_text=True, text_limit=limit))
    for piece in pieces:
        reader.line({"message": {"role": "assistant", "content": piece}, "done": False})
    kept = "".join(reader.text).encode("utf-8", "surrogatepass")
    whole = "".join(pieces).encode("utf-8", "surrogatepass")
    assert whole.startswith(kept)
    assert len(kept) <= limit
    assert len(kept) == len(whole) or len(kept) > limit - 4
    assert reader.count.content_chunks == len(pieces)


@pytest.mark.parametrize(
    ("route", "document"),
    [
        (RESPONSES, {"max_output_tokens": "5"}),
        (RESPONSES, {"max_output_tokens": 5.0}),
        (RESPONSES, {"max_output_tokens": True}),
        (MESSAGES, {"max_tokens": "5"}),
        ("openai_chat", {"max_tokens": "5"}),
        ("openai_chat", {"max_completion_tokens": [5]}),
        ("openai_completions", {"max_tokens": 2.5}),
        ("chat", {"options": {"num_predict": "5"}}),
        ("generate", {"options": {"num_predict": {"x": 1}}}),
        ("openai_chat", {"stream": True, "stream_options": "yes"}),
    ],
)
def test_wrong_typed_limits_are_refused_not_replaced(route: policy.Route, document: dict[str, Any]) -> None:
    """A completion limit Ollama cannot read as an integer (a string, a float in a Go int field, a
    bool) is a 400 before any reservation: never read as "no limit" and overwritten with the
    gateway's default, which would serve a caller who asked for 5 tokens up to 2048."""
    with pytest.raises(Refused) as refused:
        apis.adapter(route).refuse(route, {"model": "m", **document})
    assert refused.value.status == 400


def test_native_num_predict_takes_any_number() -> None:
    """Go's options map takes any JSON number for num_predict (truncated), as the gateway reads it."""
    apis.adapter("chat").refuse("chat", {"options": {"num_predict": 7.9}})
    assert apis.adapter("chat").requested_completion("chat", {"options": {"num_predict": 7.9}}) == 7


def test_options_keys_are_exact() -> None:
    """`options` is a Go map: Ollama reads `num_predict` exactly, so does the gateway (a client's
    `NUM_PREDICT` is not a limit, and is dropped when the clamped limit is written)."""
    adapter = apis.adapter("chat")
    assert adapter.requested_completion("chat", {"options": {"NUM_PREDICT": 5}}) is None
    doc = _doc({"model": "m", "options": {"NUM_PREDICT": 5000}})
    adapter.write_completion("chat", doc, 9)
    assert doc.document["options"] == {"num_predict": 9}


def test_only_v1_models_names_its_model_in_the_path() -> None:
    """GET /v1/models/{model} is the one route whose model is in the path; the others have none."""
    assert apis.adapter("openai_model").path_model("openai_model", "/v1/models/llama3.2:latest") == (
        "llama3.2:latest"
    )
    for route in ("openai_models", "chat", RESPONSES, MESSAGES):
        assert apis.adapter(route).path_model(route, "/v1/models/x") is None
