"""Container healthchecks without curl: `python -m authz_sidecar.probe`, `python -m stream_proxy.probe`.

Exits 0 when the service's /readyz (or the URL given) answers 200, else 1. Without a URL the port
comes from the service's GATEWAY_*_PORT variable.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def probe(url: str, timeout: float = 2.0) -> bool:
    """True when the URL answers 200 within the timeout."""
    if not url.startswith(("http://", "https://")):
        return False
    try:
        # The scheme was checked above: only http(s) URLs are opened.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  # nosec B310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def main(argv: Sequence[str] | None, *, port_variable: str, default_port: int) -> int:
    """Probe readiness; prints one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    url = args[0] if args else f"http://127.0.0.1:{os.environ.get(port_variable, str(default_port))}/readyz"
    ok = probe(url)
    sys.stdout.write(f"{'ready' if ok else 'not ready'}: {url}\n")
    return 0 if ok else 1
