"""A grant as the sidecar issues it, for unit tests of what stream_proxy does with one."""

from __future__ import annotations

import time
from typing import Any

from shared.grant import Grant


def grant(**changes: Any) -> Grant:
    """A valid grant for POST /api/chat (30 s to live), with `changes` applied."""
    fields: dict[str, Any] = {
        "request_id": "r",
        "tenant_id": 1,
        "key_id": 1,
        "key_prefix": "AAAAAAAA",
        "method": "POST",
        "path": "/api/chat",
        "expires_at": time.time() + 30,
    }
    return Grant(**(fields | changes))
