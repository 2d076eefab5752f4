"""`python -m authz_sidecar`: load the configuration from GATEWAY_* and serve."""

from __future__ import annotations

from authz_sidecar.app import DRAINING, create_app
from shared import serve
from shared.config import SidecarConfig

if __name__ == "__main__":
    raise SystemExit(serve.main("authz_sidecar", SidecarConfig, create_app, DRAINING))
