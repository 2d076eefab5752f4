"""Client-derived strings made printable (shared/untrusted.py), and the JSON log formatter that never
raises on what a client sent (shared/logs.py)."""

from __future__ import annotations

import json
import logging

import orjson
from hypothesis import given
from hypothesis import strategies as st

from shared.logs import JsonFormatter
from shared.untrusted import printable


def test_bytes_above_0x7f_as_aiohttp_decodes_them_are_shown_as_escaped_bytes() -> None:
    """Header and request-target bytes 0x80..0xFF that are no UTF-8 arrive as surrogate escapes
    ('\\udcff'); each is shown as the byte it was, and the result is encodable."""
    raw = b"/api/chat\xff\x80\xc3".decode("utf-8", "surrogateescape")
    assert raw == "/api/chat\udcff\udc80\udcc3"
    assert printable(raw) == "/api/chat\\xff\\x80\\xc3"
    printable(raw).encode("utf-8")
    orjson.dumps(printable(raw))


def test_nul_controls_lone_surrogates_and_format_characters_are_escaped() -> None:
    """NUL, CR/LF (log-line forging), DEL, C1 controls, a lone high surrogate, zero-width and
    bidi-override characters are escaped; printable text, ASCII space and non-ASCII letters stay."""
    assert printable("a\x00b\r\nc\x7f\x85") == "a\\x00b\\x0d\\x0ac\\x7f\\x85"
    assert printable("\ud800x\u200b\u202e") == "\\ud800x\\u200b\\u202e"
    assert printable("grüße, 世界 ok") == "grüße, 世界 ok"
    assert printable(None) is None
    assert printable("") == ""


def test_the_result_is_bounded() -> None:
    """Input and output are both cut to the limit (an escape is longer than its character)."""
    assert printable("x" * 500, 10) == "x" * 10
    assert len(printable("\x00" * 500, 10)) == 10


@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF)))
def test_any_string_becomes_printable_utf8_encodable_json(value: str) -> None:
    """Whatever a client sends (lone surrogates included), the result is printable, encodes as
    UTF-8 and as JSON, and printable input of at most the limit comes back unchanged."""
    safe = printable(value, 400)
    assert safe.isprintable()
    safe.encode("utf-8")
    orjson.dumps(safe)
    if value.isprintable() and len(value) <= 400:
        assert safe == value


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("authz_sidecar.authz", logging.INFO, __file__, 1, msg, None, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_the_json_formatter_never_raises_on_surrogates_and_keeps_the_line() -> None:
    """A message and extra fields holding lone surrogates (orjson refuses them) still make one JSON
    line, with the same fields, the bad characters escaped."""
    line = JsonFormatter().format(
        _record("denied \udcff", path="/api/\udcfe", nested={"ua": ["\udc80"]}, status=404)
    )
    doc = json.loads(line)
    assert doc["msg"] == "denied \\xff"
    assert doc["path"] == "/api/\\xfe"
    assert doc["nested"] == {"ua": ["\\x80"]}
    assert doc["status"] == 404
    assert doc["level"] == "info"


def test_the_json_formatter_survives_a_bad_format_and_an_unprintable_object() -> None:
    """A %-format that does not match its arguments and a field whose str() raises still give a
    line (the formatter is the last thing that may fail in a background loop)."""

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    record = _record("%d items", field=Hostile())
    record.args = ("not a number",)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "%d items"
    assert doc["field"] == "<Hostile>"
