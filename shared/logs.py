"""Structured logging: one JSON object per line on stderr; never a key, a secret or a prompt."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from shared.untrusted import printable

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Message plus every `extra=` field, as compact JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad %-format must not lose the line
            message = str(record.msg)
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info and record.exc_info[0] is not None:
            # The type and where it happened; never the message, which may quote input.
            doc["error"] = record.exc_info[0].__name__
            doc["trace"] = [
                f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                for f in traceback.extract_tb(record.exc_info[2])
            ][-8:]
        try:
            return orjson.dumps(doc, default=str).decode()
        except (TypeError, ValueError):
            # A string orjson refuses (a lone surrogate from a client's byte above 0x7F, a dict
            # key that is no string, nesting too deep): the same line with every value made safe.
            try:
                return orjson.dumps({str(k): _safe(v) for k, v in doc.items()}).decode()
            except Exception:  # noqa: BLE001 - the formatter never raises: last resort below
                return orjson.dumps(
                    {"ts": doc["ts"], "level": doc["level"], "msg": "unloggable record"}
                ).decode()


def _safe(value: object, depth: int = 0) -> object:
    """A JSON-encodable copy of a log field: strings made printable, containers walked (bounded)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return printable(value, limit=2000)
    if depth < 8 and isinstance(value, dict):
        return {printable(str(k), limit=200): _safe(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, list | tuple):
        return [_safe(v, depth + 1) for v in value]
    try:
        return printable(str(value), limit=2000)
    except Exception:  # noqa: BLE001 - a field whose str() raises is named, not printed
        return f"<{type(value).__name__}>"


def setup(level: str = "INFO") -> None:
    """Route the root logger to stderr as JSON; quiet aiohttp's own access log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("coredis").setLevel(logging.WARNING)  # script-cache reloads are routine
    logging.Formatter.converter = time.gmtime
