"""`python -m authz_sidecar`: load the configuration from GATEWAY_* and serve."""

from __future__ import annotations

import os
import sys

from authz_sidecar.app import DRAINING, create_app
from shared import logs, serve
from shared.config import SidecarConfig, load_config
from shared.exceptions import ConfigError


def main() -> int:
    """Run until SIGTERM/SIGINT, then drain."""
    try:
        config = load_config(SidecarConfig, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"authz_sidecar: {exc}\n")
        return 2
    logs.setup(config.logging.level)
    app = create_app(config)
    serve.run(
        app,
        host=config.options.host,
        port=config.options.port,
        draining=app[DRAINING],
        drain_seconds=config.options.drain_seconds,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
