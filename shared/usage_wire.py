"""The usage event on the Redis stream: one cattrs converter for the wire, JSON in one field."""

from __future__ import annotations

import cattrs
import orjson

from shared.models import UsageEvent

FIELD = b"event"
_wire = cattrs.Converter(omit_if_default=True)


def encode(event: UsageEvent) -> dict[bytes, bytes]:
    """Stream entry fields for one event."""
    return {FIELD: orjson.dumps(_wire.unstructure(event))}


def decode(fields: dict[bytes, bytes]) -> UsageEvent:
    """Parse a stream entry; raises on anything malformed."""
    return _wire.structure(orjson.loads(fields[FIELD]), UsageEvent)
