"""`python -m stream_proxy.probe [URL]`: exit 0 when stream_proxy is ready (a container healthcheck)."""

from __future__ import annotations

from shared.probe import main

if __name__ == "__main__":
    raise SystemExit(main(None, port_variable="GATEWAY_PROXY_PORT", default_port=8082))
