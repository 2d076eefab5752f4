"""stream_proxy's reading of request bodies (docs/ARCHITECTURE.md#proxying): keys matched
case-insensitively as Go does, case collisions and non-objects refused; the prompt upper bound and
the streaming, completion-limit and usage decisions made as Ollama makes them (docs/OLLAMA.md#request-fields,
docs/OLLAMA.md#token-counts); the key's body policy (model allowlist normalised as in
docs/OLLAMA.md#model-names, num_ctx and keep_alive
caps, listing filters).

The prompt bound against the simulator's count of the same request is in
test_prompt_bound_simulated.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest

import ollama_simulator as sim
from shared.config import ProxyOptions
from shared.grant import Grant
from shared.policy import METERED, Route
from stream_proxy import apis, body, meter
from stream_proxy import policy as body_policy
from stream_proxy.exceptions import Refused
from tests.unit.grants import grant as _grant


def _size(route: Route, document: dict[str, Any]) -> meter.PromptSize:
    """The prompt size the route's adapter computes."""
    return apis.adapter(route).prompt(route, document)


def _streams(route: Route, document: dict[str, Any]) -> bool:
    return apis.adapter(route).streams(route, document)


def _requested(route: Route, document: dict[str, Any]) -> int | None:
    return apis.adapter(route).requested_completion(route, document)


def _write_completion(route: Route, doc: body.Body, limit: int) -> None:
    apis.adapter(route).write_completion(route, doc, limit)


def _client_asked_for_usage(doc: body.Body) -> bool:
    """Prepare an OpenAI chat stream; whether the client had asked for usage itself."""
    framing = apis.adapter("openai_chat").prepare("openai_chat", doc, streaming=True, keep_text=False)
    return not framing.hide_usage


def _filter(grant: Grant, route: Route, document: Any) -> Any:
    listing = apis.adapter(route).listing(route)
    assert listing is not None
    return body_policy.filter_listing(grant, listing, document)


def _check_body(grant: Grant, route: Route, doc: body.Body) -> None:
    body_policy.check_body(grant, route, apis.adapter(route).models(route, doc.document), doc)


OPTIONS = ProxyOptions()
PER_MESSAGE = OPTIONS.template_tokens_per_message
PER_IMAGE = OPTIONS.image_tokens
NON_METERED: tuple[Route, ...] = ("tags", "show", "ps", "version", "openai_models", "openai_model")


def _refused(raw: bytes) -> Refused:
    with pytest.raises(Refused) as caught:
        body.parse(raw)
    return caught.value


def _doc(document: dict[str, Any]) -> body.Body:
    raw = orjson.dumps(document)
    return body.Body.read(raw)


def _bound(route: Route, document: dict[str, Any]) -> int:
    return _size(route, document).bound(PER_MESSAGE, PER_IMAGE)


# ---------------------------------------------------------------------------------------------
# body: parsing and case-insensitive access


def test_get_matches_keys_case_insensitively() -> None:
    """`get` finds a field whatever its spelling (Go binds `"MODEL"` to `model`), returns None for
    an absent field and for a value that is not an object."""
    document = {"MODEL": "qwen3:8b", "Options": {"Num_Predict": 5}, "stream": False}
    assert body.get(document, "model") == "qwen3:8b"
    assert body.get(document, "Model") == "qwen3:8b"
    assert body.get(body.get(document, "options"), "num_predict") == 5
    assert body.get(document, "stream") is False
    assert body.get(document, "messages") is None
    assert body.get("not an object", "model") is None
    assert body.get(None, "model") is None
    assert body.get([{"model": "x"}], "model") is None


def test_put_replaces_the_clients_spelling() -> None:
    """`put` writes the canonical key and removes every other spelling of it, so the forwarded
    body never carries two spellings of one field."""
    document: dict[str, Any] = {"Num_Predict": 5000, "temperature": 0.5}
    body.put(document, "num_predict", 900)
    assert document == {"num_predict": 900, "temperature": 0.5}
    body.put(document, "NUM_PREDICT", 10)
    assert document == {"NUM_PREDICT": 10, "temperature": 0.5}
    body.put(document, "seed", 1)
    assert document == {"NUM_PREDICT": 10, "temperature": 0.5, "seed": 1}


def test_child_creates_missing_objects_and_refuses_non_objects() -> None:
    """`child` returns the nested object by any spelling, creates it when absent or null, and
    refuses (400) a value that is not an object."""
    document: dict[str, Any] = {"OPTIONS": {"seed": 1}}
    assert body.child(document, "options") is document["OPTIONS"]
    empty: dict[str, Any] = {"options": None}
    body.child(empty, "options")["num_predict"] = 3
    assert empty == {"options": {"num_predict": 3}}
    absent: dict[str, Any] = {}
    assert body.child(absent, "stream_options") == {}
    assert absent == {"stream_options": {}}
    with pytest.raises(Refused) as caught:
        body.child({"options": 5}, "options")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"llama3.2","MODEL":"qwen3:8b"}',
        b'{"Model":"llama3.2","model":"llama3.2"}',
        b'{"model":"llama3.2","options":{"num_ctx":1,"NUM_CTX":2}}',
        b'{"model":"m","messages":[{"role":"user","ROLE":"system","content":"x"}]}',
        b'{"stream":false,"Stream":true}',
    ],
)
def test_keys_that_collide_by_case_are_refused(raw: bytes) -> None:
    """Two spellings of one key (at any depth) are refused with 400: Go would take the last one,
    other readers the first, so the gateway and Ollama could disagree on the model."""
    refused = _refused(raw)
    assert refused.status == 400
    assert "case" in refused.message


# Go's encoding/json matches `{"<key>": …}` to the field `model` for exactly these spellings (ASCII
# case folding, plus U+017F LATIN SMALL LETTER LONG S for s and U+212A KELVIN SIGN for k), written
# by hand from Go's foldName (encoding/json/fold.go), not with the gateway's fold.
GO_MATCHES_STREAM = ["stream", "STREAM", "sTrEaM", "\u017ftream", "\u017fTREAM"]
GO_MATCHES_KEEP_ALIVE = ["keep_alive", "KEEP_ALIVE", "\u212aeep_alive", "\u212aEEP_ALIVE"]
# ... and never these, which Python's str.casefold() would fold onto the field name.
GO_NEVER_MATCHES = {
    "ﬆream": "stream",  # U+FB06 LATIN SMALL LIGATURE ST: casefold() gives "stream"
    "ſtreaﬁ": "streafi",
    "modeł": "model",
    "ⓜodel": "model",
    "ＭＯＤＥＬ": "model",  # fullwidth letters
    "maß": "mass",  # casefold() gives "mass"
}


@pytest.mark.parametrize("key", GO_MATCHES_STREAM)
def test_keys_go_folds_onto_a_field_are_that_field(key: str) -> None:
    """A key Go binds to `stream` is read as `stream` (so a long-s `stream: false` is no stream)."""
    raw = ('{"model":"m","' + key + '":false}').encode()
    document = body.parse(json.dumps(json.loads(raw)).encode())
    assert body.get(document, "stream") is False
    assert _streams("chat", document) is False


@pytest.mark.parametrize("key", GO_MATCHES_KEEP_ALIVE)
def test_kelvin_sign_folds_onto_k(key: str) -> None:
    """U+212A (Kelvin) is Go's one other non-ASCII fold: it names keep_alive's k."""
    document = body.parse(json.dumps({"model": "m", json.loads(f'"{key}"'): "5m"}).encode())
    assert body.get(document, "keep_alive") == "5m"


@pytest.mark.parametrize(("key", "field"), sorted(GO_NEVER_MATCHES.items()))
def test_keys_only_python_folds_are_not_fields(key: str, field: str) -> None:
    """Ligatures, sharp s and other letters Python's casefold() maps to ASCII are not the field for
    Go: the gateway does not read them as the field either (a ligature `stream` does not stream)."""
    document = body.parse(json.dumps({key: True}).encode())
    assert body.get(document, field) is None
    assert body.fold(key) != body.fold(field)


def test_two_go_spellings_of_one_field_are_refused() -> None:
    """`stream` and its long-s spelling are one field to Go: refused like any two spellings."""
    refused = _refused(json.dumps({"model": "m", "stream": False, "ſtream": True}).encode())
    assert refused.status == 400
    assert "case" in refused.message


def test_python_only_folds_do_not_collide() -> None:
    """`stream` and its st-ligature spelling are two keys to Go: accepted, only one is the field."""
    document = body.parse(json.dumps({"model": "m", "stream": False, "ﬆream": True}).encode())
    assert body.get(document, "stream") is False


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"llama3.2","model":"qwen3:8b"}',
        b'{"model":"m","options":{"num_predict":5},"options":{"num_ctx":99999}}',
        b'{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}',
        b'{"model":"m","stream":true,"stream":false}',
    ],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    """A key repeated in one object is refused (Go merges repeated objects, orjson keeps the last):
    the gateway and Ollama can never read different models, limits or options."""
    refused = _refused(raw)
    assert refused.status == 400
    assert "repeats" in refused.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","prompt":"\\ud800"}',  # a lone surrogate
        b'{"model":"m","prompt":"\xff\xfe"}',  # invalid UTF-8
        b'{"model":"m","options":{"temperature":NaN}}',
        b'{"model":"m","options":{"temperature":Infinity}}',
        b'{"model":"m","options":{"seed":123456789012345678901234567890}}',
    ],
)
def test_bodies_json_cannot_carry_are_refused(raw: bytes) -> None:
    """Lone surrogates, invalid UTF-8, NaN/Infinity and integers beyond 64 bits are refused with 400
    before anything is reserved, rather than forwarded in a form Go reads differently."""
    with pytest.raises(Refused) as caught:
        body.Body.read(raw)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "missing request body"),
        (b"  \n\t ", "missing request body"),
        (b"[]", "JSON object"),
        (b'[{"model":"llama3.2"}]', "JSON object"),
        (b'"llama3.2"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
        (b"true", "JSON object"),
        (b'{"model":', "not valid JSON"),
        (b"{'model': 'x'}", "not valid JSON"),
    ],
)
def test_bodies_that_are_not_json_objects_are_refused(raw: bytes, message: str) -> None:
    """Empty bodies, JSON that is not an object and invalid JSON are refused with 400."""
    refused = _refused(raw)
    assert refused.status == 400
    assert message in refused.message


def _containers(count: int) -> bytes:
    """A body of `count` nested containers: an object holding lists inside lists."""
    value: Any = 0
    for _ in range(count - 1):
        value = [value]
    return orjson.dumps({"a": value})


def test_nesting_is_bounded() -> None:
    """Bodies nest at most MAX_DEPTH containers deep; deeper ones (including ones deeper than the
    JSON parser's own limit) are refused with 400, never a crash."""
    assert body.parse(_containers(body.MAX_DEPTH)) is not None
    assert _refused(_containers(body.MAX_DEPTH + 1)).status == 400
    assert _refused(b"[" * 5000 + b"]" * 5000).status == 400
    assert _refused(b'{"a":' * 3000 + b"1" + b"}" * 3000).status == 400


def test_a_realistic_json_schema_is_not_too_deep() -> None:
    """A structured-output schema nested a few dozen levels deep is accepted."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(15):
        schema = {"type": "object", "properties": {"x": schema}}
    parsed = body.parse(orjson.dumps({"model": "llama3.2", "prompt": "x", "format": schema}))
    assert parsed["format"] == schema


def test_the_checked_document_is_what_is_forwarded() -> None:
    """What reaches Ollama is the document the gateway checked, re-serialised (compact, key order
    kept, escapes decoded), never the client's own bytes; a rewrite is re-serialised with it."""
    raw = b'{ "model" : "llama3.2",\n "prompt": "\\u003c&>", "options": {"seed": 1} }'
    doc = body.Body.read(raw)
    assert doc.encoded() == b'{"model":"llama3.2","prompt":"<&>","options":{"seed":1}}'
    _write_completion("generate", doc, 7)
    assert orjson.loads(doc.encoded()) == {
        "model": "llama3.2",
        "prompt": "<&>",
        "options": {"seed": 1, "num_predict": 7},
    }


# ---------------------------------------------------------------------------------------------
# meter: the prompt's upper bound


def test_chat_bound_counts_text_messages_and_the_assistant_turn() -> None:
    """A chat prompt is bounded by the UTF-8 bytes of its text plus the template allowance for
    every message and once more for the assistant turn; multi-byte text counts in bytes."""
    one: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": "héllo wörld"}]}
    size = _size("chat", one)
    assert size.messages == 1
    assert size.images == 0
    assert size.context_tokens == 0
    assert size.text_bytes >= len("héllo wörld".encode())
    assert size.bound(PER_MESSAGE, PER_IMAGE) == size.text_bytes + 2 * PER_MESSAGE
    three = {**one, "messages": one["messages"] * 3}
    assert _size("chat", three).messages == 3
    assert _bound("chat", three) >= 3 * len("héllo wörld".encode()) + 4 * PER_MESSAGE


def test_chat_bound_counts_tools_and_format() -> None:
    """Tool schemas and the structured-output format are part of the prompt's text."""
    base = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    description = "Get the current weather for a city, in degrees Celsius"
    tools = [{"type": "function", "function": {"name": "get_weather", "description": description}}]
    with_tools = _bound("chat", {**base, "tools": tools})
    assert with_tools >= _bound("chat", base) + len(description) + len("get_weather")
    schema = {"type": "object", "properties": {"answer_in_full_sentences": {"type": "string"}}}
    assert _bound("chat", {**base, "format": schema}) >= _bound("chat", base) + len(
        "answer_in_full_sentences"
    )


def test_images_cost_the_image_allowance_not_their_base64_bytes() -> None:
    """An attached image costs the per-image allowance, however large its base64 text is (a
    1 MB picture must not reserve a million tokens); native chat, generate and OpenAI content
    parts alike."""
    picture = base64.b64encode(bytes(300_000)).decode()
    message = {"role": "user", "content": "what is this?"}
    plain = _bound("chat", {"model": "m", "messages": [message]})
    two = _bound("chat", {"model": "m", "messages": [{**message, "images": [picture, picture]}]})
    assert two == plain + 2 * PER_IMAGE
    size = _size("chat", {"model": "m", "messages": [{**message, "images": [picture]}]})
    assert size.images == 1
    generate = {"model": "m", "prompt": "what is this?"}
    assert _bound("generate", {**generate, "images": [picture]}) == _bound("generate", generate) + PER_IMAGE
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{picture}"}},
    ]
    openai_size = _size("openai_chat", {"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert openai_size.images == 1
    assert openai_size.text_bytes < 1000


def test_openai_content_parts_count_as_messages() -> None:
    """Ollama's OpenAI layer turns every content part into its own message, so each part gets
    the template allowance."""
    parts = [
        {"type": "text", "text": "first"},
        {"type": "text", "text": "second"},
        {"type": "text", "text": "3"},
    ]
    document = {
        "model": "m",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": parts}],
    }
    size = _size("openai_chat", document)
    assert size.messages == 4
    assert size.text_bytes >= len("sys") + len("first") + len("second") + len("3")


@pytest.mark.parametrize("route", ["generate", "openai_completions"])
def test_generate_bound_counts_every_prompt_field(route: Route) -> None:
    """generate and /v1/completions count prompt, suffix, system, template and format, with the
    allowance for the system and user turns plus the assistant turn."""
    fields = {"prompt": "p" * 10, "suffix": "s" * 20, "system": "y" * 40, "template": "t" * 80}
    base = _bound(route, {"model": "m"})
    assert base >= 3 * PER_MESSAGE
    for name, text in fields.items():
        assert _bound(route, {"model": "m", name: text}) >= base + len(text), name
    everything = _bound(route, {"model": "m", **fields})
    assert everything >= base + 150


def test_generate_bound_counts_the_context_tokens() -> None:
    """The deprecated `context` of /api/generate is token ids: one token each."""
    document = {"model": "m", "prompt": "go on", "context": list(range(1000, 1500))}
    size = _size("generate", document)
    assert size.context_tokens == 500
    assert size.bound(PER_MESSAGE, PER_IMAGE) >= 500 + len("go on")


@pytest.mark.parametrize(
    ("route", "field"), [("embed", "input"), ("embeddings", "prompt"), ("openai_embeddings", "input")]
)
def test_embedding_bounds(route: Route, field: str) -> None:
    """Embedding inputs are bounded by their bytes plus an allowance per input."""
    single = _size(route, {"model": "m", field: "why is the sky blue?"})
    assert single.messages == 1
    assert single.text_bytes >= len("why is the sky blue?")
    if route != "embeddings":  # the legacy endpoint takes one prompt string only
        several = _size(route, {"model": "m", field: ["a" * 10, "b" * 20, "c" * 30]})
        assert several.messages == 3
        assert several.text_bytes >= 60


def test_embedding_bounds_ignore_other_routes_fields() -> None:
    """Only the route's own prompt field counts: an /api/embed body's `prompt` is not its input."""
    assert _size("embed", {"model": "m", "prompt": "x" * 500}).text_bytes < 500
    assert _size("embeddings", {"model": "m", "input": "x" * 500}).text_bytes < 500


# ---------------------------------------------------------------------------------------------
# meter: streaming, completion limits, usage


@pytest.mark.parametrize("route", ["chat", "generate"])
@pytest.mark.parametrize(
    ("document", "streams"),
    [
        ({}, True),
        ({"stream": None}, True),
        ({"stream": True}, True),
        ({"stream": False}, False),
        ({"Stream": False}, False),
        ({"STREAM": False}, False),
        ({"sTrEaM": True}, True),
    ],
)
def test_native_routes_stream_unless_told_not_to(
    route: Route, document: dict[str, Any], streams: bool
) -> None:
    """Native generate and chat stream when `stream` is absent or null; `false` (any spelling of
    the key) gives one object."""
    assert _streams(route, {"model": "m", **document}) is streams


@pytest.mark.parametrize("route", ["openai_chat", "openai_completions"])
@pytest.mark.parametrize(
    ("document", "streams"),
    [
        ({}, False),
        ({"stream": None}, False),
        ({"stream": False}, False),
        ({"Stream": False}, False),
        ({"stream": True}, True),
        ({"Stream": True}, True),
        ({"STREAM": True}, True),
    ],
)
def test_openai_routes_stream_only_when_asked(route: Route, document: dict[str, Any], streams: bool) -> None:
    """OpenAI chat and completions do not stream unless `stream` is true (any spelling)."""
    assert _streams(route, {"model": "m", **document}) is streams


@pytest.mark.parametrize("route", ["embed", "embeddings", "openai_embeddings", *NON_METERED])
def test_other_routes_never_stream(route: Route) -> None:
    """Embeddings and the read-only routes never stream, whatever the body says."""
    assert _streams(route, {"stream": True}) is False
    assert _streams(route, {}) is False


@pytest.mark.parametrize("route", ["chat", "generate"])
@pytest.mark.parametrize(
    ("options", "limit"),
    [
        (None, None),
        ({}, None),
        ({"num_predict": 100}, 100),
        ({"NUM_PREDICT": 100}, None),  # options is a Go map: Ollama reads its keys exactly
        ({"num_predict": 100.0}, 100),
        ({"num_predict": -1}, None),
        ({"num_predict": -2}, None),
        ({"num_predict": None}, None),
        ({"num_predict": True}, None),
        ({"num_predict": "100"}, None),
        ({"temperature": 0.2}, None),
    ],
)
def test_native_completion_limit(route: Route, options: dict[str, Any] | None, limit: int | None) -> None:
    """Native routes read `options.num_predict`; -1 (until the model stops) and -2 (fill the
    context) are no limit, as is anything that is not a number."""
    document: dict[str, Any] = {"model": "m"}
    if options is not None:
        document["options"] = options
    assert _requested(route, document) == limit


@pytest.mark.parametrize("route", ["openai_chat", "openai_completions"])
@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"MAX_TOKENS": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
        ({"max_tokens": 30, "max_completion_tokens": 50}, 30),
        ({"max_tokens": -1}, None),
        ({"max_completion_tokens": -2}, None),
        ({"max_tokens": 100, "max_completion_tokens": -1}, 100),
        ({"max_tokens": -1, "max_completion_tokens": 40}, 40),
        ({"max_tokens": True}, None),
        ({"max_tokens": "100"}, None),
        ({"options": {"num_predict": 5}}, None),
    ],
    ids=repr,
)
def test_openai_completion_limit(route: Route, fields: dict[str, Any], limit: int | None) -> None:
    """OpenAI routes read `max_tokens` and `max_completion_tokens` and, like Ollama (which keeps
    the smallest positive one), a negative value in one field does not cancel a real limit in the
    other; negative alone means no limit."""
    assert _requested(route, {"model": "m", **fields}) == limit


@pytest.mark.parametrize("route", ["embed", "embeddings", "openai_embeddings"])
def test_embeddings_complete_nothing(route: Route) -> None:
    """Embedding routes generate no completion tokens."""
    assert _requested(route, {"model": "m", "options": {"num_predict": 99}}) == 0


def test_set_completion_native_rewrites_the_clients_spelling() -> None:
    """The clamped limit replaces the client's num_predict (whatever its spelling) inside
    `options`, creating `options` when absent, and marks the body changed."""
    doc = _doc({"model": "m", "Options": {"NUM_PREDICT": 5000, "seed": 3}})
    _write_completion("chat", doc, 900)
    assert doc.changed
    assert orjson.loads(doc.encoded()) == {"model": "m", "Options": {"seed": 3, "num_predict": 900}}
    bare = _doc({"model": "m", "prompt": "x"})
    _write_completion("generate", bare, 12)
    assert orjson.loads(bare.encoded()) == {"model": "m", "prompt": "x", "options": {"num_predict": 12}}


def test_set_completion_openai_rewrites_every_limit_field() -> None:
    """On OpenAI routes the clamped limit goes into `max_tokens`, and into
    `max_completion_tokens` too when the client used it, replacing the client's spellings."""
    doc = _doc({"model": "m", "MAX_TOKENS": 5000})
    _write_completion("openai_chat", doc, 900)
    assert orjson.loads(doc.encoded()) == {"model": "m", "max_tokens": 900}
    both = _doc({"model": "m", "Max_Completion_Tokens": 5000, "prompt": "x"})
    _write_completion("openai_completions", both, 70)
    assert orjson.loads(both.encoded()) == {
        "model": "m",
        "prompt": "x",
        "max_tokens": 70,
        "max_completion_tokens": 70,
    }


@pytest.mark.parametrize("route", ["embed", "embeddings", "openai_embeddings"])
def test_set_completion_leaves_embeddings_alone(route: Route) -> None:
    """Embedding bodies carry no completion limit and are forwarded unchanged."""
    raw = b'{"model":"all-minilm","input":"x"}'
    doc = body.Body.read(raw)
    _write_completion(route, doc, 10)
    assert not doc.changed
    assert doc.encoded() == raw


def test_ask_for_usage_injects_include_usage() -> None:
    """Without stream_options, the gateway asks Ollama for usage itself and reports that the
    client did not."""
    doc = _doc({"model": "m", "stream": True})
    assert _client_asked_for_usage(doc) is False
    assert doc.changed
    assert orjson.loads(doc.encoded())["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "options",
    [{"stream_options": {"include_usage": True}}, {"Stream_Options": {"INCLUDE_USAGE": True}}],
)
def test_ask_for_usage_keeps_the_clients_request(options: dict[str, Any]) -> None:
    """A client that asked for usage (any spelling) gets it and its body is not rewritten."""
    doc = _doc({"model": "m", "stream": True, **options})
    assert _client_asked_for_usage(doc) is True
    assert not doc.changed


@pytest.mark.parametrize(
    "options",
    [
        {"stream_options": {"include_usage": False}},
        {"stream_options": None},
        {"stream_options": {}},
        {"STREAM_OPTIONS": {"Include_Usage": False}},
    ],
)
def test_ask_for_usage_overrides_a_refusal(options: dict[str, Any]) -> None:
    """include_usage false, null or missing is turned on upstream, with one spelling only, and
    reported as not asked for (so the usage event is dropped before the client)."""
    doc = _doc({"model": "m", "stream": True, **options})
    assert _client_asked_for_usage(doc) is False
    forwarded = orjson.loads(doc.encoded())
    stream_options = body.get(forwarded, "stream_options")
    assert stream_options == {"include_usage": True}


def test_ask_for_usage_refuses_non_object_stream_options() -> None:
    """stream_options that is not an object is a 400 (Go could not bind it either)."""
    with pytest.raises(Refused) as caught:
        _client_asked_for_usage(_doc({"model": "m", "stream": True, "stream_options": "yes"}))
    assert caught.value.status == 400


def test_metered_routes_are_exactly_the_inference_routes() -> None:
    """Every inference route is metered and nothing else is."""
    assert set(METERED) == {
        "chat",
        "generate",
        "embed",
        "embeddings",
        "openai_chat",
        "openai_completions",
        "openai_embeddings",
        "openai_responses",
        "anthropic_messages",
    }


# ---------------------------------------------------------------------------------------------
# policy: models, caps, listings


ONLY_LLAMA = _grant(allowed_models=("llama3.2:latest",))


@pytest.mark.parametrize(
    "name",
    [
        "llama3.2",
        "LLama3.2",
        "llama3.2:latest",
        "LLAMA3.2:LATEST",
        "library/llama3.2",
        "Library/llama3.2:latest",
        "registry.ollama.ai/library/llama3.2:latest",
        "Registry.Ollama.AI/library/llama3.2",
        "  llama3.2  ",
        "llama3.2:local",
    ],
)
def test_allowlist_matches_every_spelling_of_an_allowed_model(name: str) -> None:
    """Names are compared as Ollama resolves them: case-insensitively, with the default host,
    namespace and tag filled in (docs/OLLAMA.md#model-names)."""
    body_policy.check_model(ONLY_LLAMA, name)
    assert body_policy.model_allowed(ONLY_LLAMA, name)


@pytest.mark.parametrize(
    "name",
    [
        "qwen3:8b",
        "llama3.2:1b",
        "llama3.1",
        "other/llama3.2",
        "example.com/library/llama3.2",
        "llama3.2:cloud",
        "llama3.2:latest-cloud",
    ],
)
def test_allowlist_refuses_other_models(name: str) -> None:
    """Any other model, namespace, host or tag is 403."""
    with pytest.raises(Refused) as caught:
        body_policy.check_model(ONLY_LLAMA, name)
    assert caught.value.status == 403


@pytest.mark.parametrize("name", ["llama3:cloud", "gpt-oss:20b-cloud", "GPT-OSS:120B-CLOUD", "ns/m:x-cloud"])
def test_cloud_models_need_an_explicit_allow(name: str) -> None:
    """`:cloud` names and `-cloud` tags (proxied off-box by Ollama) are refused even for a key
    that may use every model; naming them in the allowlist allows them."""
    with pytest.raises(Refused) as caught:
        body_policy.check_model(_grant(), name)
    assert caught.value.status == 403
    body_policy.check_model(_grant(allowed_models=(name.strip().lower(),)), name)


def test_local_names_that_merely_mention_cloud_are_not_cloud_models() -> None:
    """`cloud` in a model name (not its `:cloud` tag or `-cloud` tag suffix) stays local."""
    for name in ("cloud", "my-cloud", "cloud-model:7b", "llama3.2:cloudy"):
        body_policy.check_model(_grant(), name)


@pytest.mark.parametrize(
    "name", ["bad name", "a/b/c/d", "llama3.2:", ":latest", "-leading", "ns.with.dots/model", "x" * 81]
)
def test_invalid_model_names_are_400(name: str) -> None:
    """A name Ollama's grammar rejects is 400, with or without an allowlist."""
    for grant in (_grant(), ONLY_LLAMA):
        with pytest.raises(Refused) as caught:
            body_policy.check_model(grant, name)
        assert caught.value.status == 400


def test_missing_model_is_refused_only_under_an_allowlist() -> None:
    """A body without a usable model string is 403 for a key limited to some models (there is
    nothing to check it against) and left to Ollama otherwise."""
    for missing in (None, "", "   ", 5, ["llama3.2"]):
        with pytest.raises(Refused) as caught:
            body_policy.check_model(ONLY_LLAMA, missing)
        assert caught.value.status == 403
        body_policy.check_model(_grant(), missing)


@pytest.mark.parametrize(
    ("route", "document"),
    [
        ("chat", {"MODEL": "qwen3:8b", "messages": []}),
        ("generate", {"Model": "qwen3:8b", "prompt": "x"}),
        ("openai_chat", {"model": "qwen3:8b", "messages": []}),
        ("embed", {"model": "all-minilm", "input": "x"}),
        ("show", {"model": "qwen3:8b"}),
        ("show", {"name": "qwen3:8b"}),
        ("show", {"NAME": "qwen3:8b"}),
        ("show", {"model": "llama3.2", "name": "qwen3:8b"}),
    ],
)
def test_body_policy_checks_the_model_fields(route: Route, document: dict[str, Any]) -> None:
    """The model is read case-insensitively, and /api/show's deprecated `name` is checked too."""
    with pytest.raises(Refused) as caught:
        _check_body(ONLY_LLAMA, route, _doc(document))
    assert caught.value.status == 403


def test_body_policy_allows_the_allowed_model() -> None:
    """The allowed model passes on every body-carrying route."""
    for route in ("chat", "generate", "embed", "embeddings", "openai_chat", "openai_completions", "show"):
        _check_body(ONLY_LLAMA, route, _doc({"model": "llama3.2"}))
    _check_body(ONLY_LLAMA, "show", _doc({"model": "llama3.2:latest", "name": "LLAMA3.2"}))


@pytest.mark.parametrize(
    "document", [{"name": "llama3.2"}, {"NAME": "llama3.2:latest"}, {"model": "", "name": "llama3.2"}]
)
def test_show_by_its_deprecated_name_field_is_allowed(document: dict[str, Any]) -> None:
    """/api/show still takes the deprecated `name` when `model` is empty (Ollama reads
    `model`, else `name`): naming an allowed model that way is not refused."""
    _check_body(ONLY_LLAMA, "show", _doc(document))


CAPPED = _grant(max_num_ctx=4096, max_keep_alive_seconds=300)


@pytest.mark.parametrize("options", [{"num_ctx": 8192}, {"num_ctx": 4097}, {"num_ctx": 4096.5}])
def test_num_ctx_above_the_cap_is_400(options: dict[str, Any]) -> None:
    """num_ctx above the key's cap is refused (it decides the memory Ollama allocates); `NUM_CTX`
    is no option to Ollama (exact map keys), so it is not one to the cap either."""
    with pytest.raises(Refused) as caught:
        body_policy.apply_caps(CAPPED, _doc({"model": "m", "options": options}))
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "options", [{"num_ctx": 4096}, {"num_ctx": 512}, {}, {"num_ctx": None}, {"NUM_CTX": 99999}]
)
def test_num_ctx_within_the_cap_passes_unchanged(options: dict[str, Any]) -> None:
    """num_ctx at or under the cap, or absent, is forwarded as sent."""
    doc = _doc({"model": "m", "options": options})
    body_policy.apply_caps(CAPPED, doc)
    assert not doc.changed


def test_no_caps_no_checks() -> None:
    """A key without caps forwards any num_ctx and keep_alive."""
    doc = _doc({"model": "m", "options": {"num_ctx": 1_000_000}, "keep_alive": -1})
    body_policy.apply_caps(_grant(), doc)
    assert not doc.changed


@pytest.mark.parametrize(
    "keep_alive",
    [301, 3600, -1, -5, "10m", "1h", "1h30m", "301s", "-1m", "5m0.5s", "1.5h", "+10m", ".5h"],
    ids=repr,
)
def test_keep_alive_above_the_cap_is_lowered(keep_alive: Any) -> None:
    """keep_alive above the cap, or negative (forever), is lowered to the cap in seconds, for
    every form Go's duration parser accepts; the client's spelling of the key is replaced."""
    if isinstance(keep_alive, str):
        assert sim.parse_go_duration(keep_alive) != 0  # a valid Go duration, as Ollama reads it
    doc = _doc({"model": "m", "Keep_Alive": keep_alive})
    body_policy.apply_caps(CAPPED, doc)
    assert doc.changed
    forwarded = orjson.loads(doc.encoded())
    assert forwarded == {"model": "m", "keep_alive": 300}


@pytest.mark.parametrize("keep_alive", [0, 300, 299.5, "0", "5m", "300s", "1m30s", "250ms", None], ids=repr)
def test_keep_alive_within_the_cap_is_forwarded_as_sent(keep_alive: Any) -> None:
    """keep_alive within the cap (including 0, unload now, and Go's unit-less "0") is untouched."""
    doc = _doc({"model": "m", "keep_alive": keep_alive})
    body_policy.apply_caps(CAPPED, doc)
    assert not doc.changed


@pytest.mark.parametrize("keep_alive", ["10", "5 minutes", "m", True, [1], {"s": 1}], ids=repr)
def test_invalid_keep_alive_is_400(keep_alive: Any) -> None:
    """A keep_alive Ollama cannot parse (unit-less number strings, words, other types) is a 400."""
    with pytest.raises(Refused) as caught:
        body_policy.apply_caps(CAPPED, _doc({"model": "m", "keep_alive": keep_alive}))
    assert caught.value.status == 400


def _tags(*names: str) -> dict[str, Any]:
    return {"models": [{"name": n, "model": n, "size": 1, "details": {}} for n in names]}


def test_listing_filters_keep_only_allowed_models() -> None:
    """/api/tags and /api/ps keep only the allowed models (by `model`, else `name`), /v1/models
    only allowed `id`s; entries that are not objects or carry invalid names are dropped."""
    installed = ("llama3.2:latest", "qwen3:8b", "all-minilm:latest", "llama3:cloud")
    for route in ("tags", "ps"):
        listing = _tags(*installed)
        listing["models"] += ["junk", {"name": "bad name!"}, {"name": "LLAMA3.2"}]
        filtered = _filter(ONLY_LLAMA, route, listing)
        assert [m["name"] for m in filtered["models"]] == ["llama3.2:latest", "LLAMA3.2"]
    openai = {"object": "list", "data": [{"id": n, "object": "model"} for n in installed]}
    filtered = _filter(ONLY_LLAMA, "openai_models", openai)
    assert filtered == {"object": "list", "data": [{"id": "llama3.2:latest", "object": "model"}]}


def test_listing_filters_drop_cloud_models_unless_allowed() -> None:
    """Cloud entries disappear from listings unless the allowlist names them."""
    listing = _tags("llama3.2:latest", "gpt-oss:20b-cloud")
    both = _grant(allowed_models=("llama3.2:latest", "gpt-oss:20b-cloud"))
    assert len(_filter(both, "tags", listing)["models"]) == 2
    only = _filter(ONLY_LLAMA, "tags", _tags("llama3.2:latest", "gpt-oss:20b-cloud"))
    assert [m["name"] for m in only["models"]] == ["llama3.2:latest"]


def test_listing_filters_leave_other_shapes_alone() -> None:
    """Bodies that are not listings (errors, `"data": null`) pass through unchanged."""
    assert _filter(ONLY_LLAMA, "tags", {"error": "x"}) == {"error": "x"}
    empty = {"object": "list", "data": None}
    assert _filter(ONLY_LLAMA, "openai_models", empty) == empty
    assert _filter(ONLY_LLAMA, "tags", ["not", "a", "dict"]) == ["not", "a", "dict"]


@pytest.mark.parametrize(
    "raw",
    [
        b'\xef\xbb\xbf{"model":"m"}',  # a UTF-8 byte order mark
        '{"model":"m"}'.encode("utf-16"),
        '{"model":"m"}'.encode("utf-16-le"),
        b'{"model":"m","options":{"temperature":1e999}}',
        b'{"model":"m","options":{"temperature":-1e400}}',
    ],
)
def test_what_gos_decoder_refuses_is_refused(raw: bytes) -> None:
    """A byte order mark, UTF-16, and a number that overflows a float64 are errors for Go's
    encoding/json; Python's json would read them (as a document, or as infinity)."""
    with pytest.raises(Refused) as caught:
        body.Body.read(raw)
    assert caught.value.status == 400
