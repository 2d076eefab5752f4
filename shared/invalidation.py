"""Change notices the admin CLI publishes on Redis so every sidecar drops stale cached keys."""

from __future__ import annotations

from typing import Literal

import attrs
import cattrs
import orjson

ChangeKind = Literal["key", "tenant"]


@attrs.frozen
class Invalidation:
    """One change: a key (revoke, limits, models, logging) or a whole tenant (suspend, limits…)."""

    kind: ChangeKind
    tenant_id: int
    key_id: int | None = None
    reason: str = ""


_wire = cattrs.Converter()


def encode(notice: Invalidation) -> bytes:
    """JSON for the pub/sub channel."""
    return orjson.dumps(_wire.unstructure(notice))


def decode(raw: bytes | str) -> Invalidation:
    """Parse a notice; raises on anything malformed."""
    return _wire.structure(orjson.loads(raw), Invalidation)
