"""`python -m stream_proxy`: load the configuration from GATEWAY_* and serve."""

from __future__ import annotations

import os
import sys

from shared import logs, serve
from shared.config import ProxyConfig, load_config
from shared.exceptions import ConfigError
from stream_proxy.app import DRAINING, create_app


def main() -> int:
    """Run until SIGTERM/SIGINT, then drain."""
    try:
        config = load_config(ProxyConfig, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"stream_proxy: {exc}\n")
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
