"""`python -m stream_proxy`: load the configuration from GATEWAY_* and serve."""

from __future__ import annotations

from shared import serve
from shared.config import ProxyConfig
from stream_proxy.app import DRAINING, create_app

if __name__ == "__main__":
    raise SystemExit(serve.main("stream_proxy", ProxyConfig, create_app, DRAINING))
