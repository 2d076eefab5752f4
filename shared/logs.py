"""Structured logging: one JSON object per line on stderr; never a key, a secret or a prompt."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Message plus every `extra=` field, as compact JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info and record.exc_info[0] is not None:
            # The type and where it happened; never the message, which may quote input.
            doc["error"] = record.exc_info[0].__name__
            doc["trace"] = [
                f"{Path(f.filename).name}:{f.lineno}:{f.name}"
                for f in traceback.extract_tb(record.exc_info[2])
            ][-8:]
        return orjson.dumps(doc, default=str).decode()


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
