"""`python -m stream_proxy`: load the configuration from GATEWAY_* and serve."""

from __future__ import annotations

import os
import sys

import uvloop
from aiohttp import web

from shared import logs
from shared.config import ProxyConfig, load_config
from shared.exceptions import ConfigError
from stream_proxy.app import create_app


def main() -> int:
    """Run until SIGTERM/SIGINT."""
    try:
        config = load_config(ProxyConfig, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"stream_proxy: {exc}\n")
        return 2
    logs.setup(config.logging.level)
    uvloop.install()
    web.run_app(
        create_app(config),
        host=config.options.host,
        port=config.options.port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
