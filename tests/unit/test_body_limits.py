"""One body cannot stall a process (docs/RELIABILITY.md#hostile-input): caps on values, messages
and input items checked before (values) or right after (items) parsing, and keys folded once per
object."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_proxy import body
from stream_proxy.exceptions import Refused


def _values(value: Any) -> int:
    """Every JSON value in a document, counted by walking it (keys not counted)."""
    if isinstance(value, dict):
        return 1 + sum(_values(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_values(v) for v in value)
    return 1


_tricky = st.text(st.sampled_from(list(',{}[]"\\:ab\u2028é')), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _tricky,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_tricky, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(document=_json)
def test_the_values_bound_is_never_below_the_values_of_the_document(document: Any) -> None:
    """Whatever commas, brackets, quotes and backslashes the strings hold, the byte-count bound is
    at least the number of values, in both its quick and its strings-cut-out form."""
    raw = json.dumps(document).encode()
    assert body.values_bound(raw) >= _values(document)
    padded = json.dumps({"pad": "," * (body.MAX_VALUES + 1), "doc": document}).encode()
    assert body.values_bound(padded) >= _values(document) + 2  # the strings-cut-out path
    assert body.values_bound(padded) < body.MAX_VALUES  # commas inside strings are not values


def test_a_body_of_too_many_values_is_refused_before_it_is_parsed() -> None:
    """660,000 empty messages in 2 MB (seconds of parsing before): 400, however it is spelled."""
    for raw in (
        orjson.dumps({"model": "m", "messages": [{}] * 660_000}),
        orjson.dumps({"model": "m", "context": [1] * (body.MAX_VALUES + 1)}),
        b'{"model":"m","x":[' + b'"a\\"",' * body.MAX_VALUES + b"1]}",
    ):
        with pytest.raises(Refused) as refused:
            body.parse(raw)
        assert refused.value.status == 400
        assert refused.value.message == f"request body has more than {body.MAX_VALUES} JSON values"


def test_a_context_of_262144_token_ids_is_still_read() -> None:
    """The largest legitimate value count: a generate's `context` for a 256k-token model."""
    document = body.parse(orjson.dumps({"model": "m", "context": list(range(262_144))}))
    assert len(document["context"]) == 262_144


@pytest.mark.parametrize("name", ["messages", "input", "MESSAGES", "\u0131nput"])
def test_more_messages_or_input_items_than_the_cap_are_refused(name: str) -> None:
    """10,001 messages or input items: 400 (Go folds MESSAGES to messages; the dotless i (U+0131) is not i
    to Go, so that key is not a field and is not capped)."""
    raw = orjson.dumps({"model": "m", name: [{"role": "user", "content": "x"}] * (body.MAX_ITEMS + 1)})
    if name == "\u0131nput":
        assert len(body.parse(raw)[name]) == body.MAX_ITEMS + 1
        return
    with pytest.raises(Refused) as refused:
        body.parse(raw)
    assert refused.value.status == 400
    assert refused.value.message == f"request body has more than {body.MAX_ITEMS} {name.lower()}"
    assert len(body.parse(orjson.dumps({"model": "m", name: ["x"] * body.MAX_ITEMS}))[name]) == body.MAX_ITEMS


def test_keys_are_folded_once_per_object_and_kept_right_by_put() -> None:
    """A parsed object finds a field by Go's matching through its index, also after `put` changed
    the spelling; a plain dict (made by the gateway itself) is still searched."""
    document = body.parse('{"MODEL": "m", "Options": {"NUM_ctx": 5}, "ſtream": true}'.encode())
    assert isinstance(document, body.GoObject)
    assert body.get(document, "model") == "m"
    assert body.get(document, "stream") is True
    assert body.get(body.get(document, "options"), "num_ctx") == 5
    body.put(document, "model", "other")
    assert document == {"model": "other", "Options": {"NUM_ctx": 5}, "ſtream": True}
    assert body.get(document, "Model") == "other"
    body.put(document, "keep_alive", "5m")
    assert body.get(document, "KEEP_ALIVE") == "5m"
    assert body.get({"Keep_Alive": 1}, "keep_alive") == 1
    assert orjson.loads(body.serialise(document)) == {
        "model": "other",
        "Options": {"NUM_ctx": 5},
        "ſtream": True,
        "keep_alive": "5m",
    }
