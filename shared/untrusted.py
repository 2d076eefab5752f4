"""Client-derived strings made safe before they reach a log line, an audit row or a metric label.

Caddy (Go) passes header and request-target bytes above 0x7F through; aiohttp decodes them with
surrogate escapes ('\\udcff'), which orjson, Postgres and UTF-8 encoders refuse. NUL is refused by
Postgres text columns, and other control characters forge log lines. `printable` turns any string
into a printable, encodable one: an escaped byte is shown as `\\xff`, any other non-printable
character as `\\x..` / `\\u....`. Printable strings (the common case) are returned as they are.
"""

from __future__ import annotations

from typing import overload

_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # how `surrogateescape` spells the bytes 0x80..0xFF


def _escape(char: str) -> str:
    code = ord(char)
    if code in _SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


@overload
def printable(value: str, limit: int = ...) -> str: ...
@overload
def printable(value: None, limit: int = ...) -> None: ...
@overload
def printable(value: str | None, limit: int = ...) -> str | None: ...


def printable(value: str | None, limit: int = 200) -> str | None:
    """`value` cut to `limit` characters, with every non-printable character escaped (ASCII space
    stays; tabs, newlines, NUL, C1 controls, lone surrogates, format characters do not)."""
    if value is None:
        return None
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _escape(c) for c in value)[:limit]
