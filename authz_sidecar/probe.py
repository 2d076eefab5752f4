"""`python -m authz_sidecar.probe [URL]`: exit 0 when authz_sidecar is ready (a container healthcheck)."""

from __future__ import annotations

from shared.probe import main

if __name__ == "__main__":
    raise SystemExit(main(None, port_variable="GATEWAY_SIDECAR_PORT", default_port=8081))
