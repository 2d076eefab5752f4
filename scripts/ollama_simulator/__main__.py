"""The command line: `python -m ollama_simulator --port 0 ...` serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from ollama_simulator.app import create_app
from ollama_simulator.settings import DEFAULT_MODELS, OLLAMA_VERSION, SimulatorSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ollama_simulator", description="A protocol-faithful fake Ollama server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically)")
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument("--ttft", type=float, default=0.0, help="time to first token, seconds")
    parser.add_argument("--completion-tokens", type=int, default=12)
    parser.add_argument("--thinking-tokens", type=int, default=4)
    parser.add_argument("--fail-after-chunks", type=int, default=None)
    parser.add_argument("--models", help="comma-separated installed models")
    parser.add_argument("--ollama-version", default=OLLAMA_VERSION, help="for /api/version")
    parser.add_argument("--queue-full", action="store_true")
    parser.add_argument("--embedding-dimensions", type=int, default=384)
    parser.add_argument(
        "--tokenizer", choices=("words", "bytes"), default="words", help="how prompt tokens are counted"
    )
    parser.add_argument(
        "--default-num-ctx", type=int, default=4096, help="num_ctx when neither request nor model sets one"
    )
    parser.add_argument(
        "--host-check",
        choices=("auto", "on", "off"),
        default="auto",
        help="Ollama's Host check; auto = on when listening on loopback, like Ollama",
    )
    parser.add_argument("--no-cors-check", action="store_true")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """SimulatorSettings from parsed CLI arguments."""
    host_check = args.host_check == "on" or (args.host_check == "auto" and _is_loopback(args.host))
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    return SimulatorSettings(
        tokens_per_second=args.tokens_per_second,
        time_to_first_token=args.ttft,
        completion_tokens=args.completion_tokens,
        thinking_tokens=args.thinking_tokens,
        fail_after_chunks=args.fail_after_chunks,
        models=models if models is not None else DEFAULT_MODELS,
        version=args.ollama_version,
        queue_full=args.queue_full,
        embedding_dimensions=args.embedding_dimensions,
        tokenizer=args.tokenizer,
        default_num_ctx=args.default_num_ctx,
        host_check=host_check,
        cors_check=not args.no_cors_check,
    )


def write_port_file(path: Path, port: int) -> None:
    """Write the port so a reader never sees a partial file (temp file, then rename)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{port}\n")
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


SOMAXCONN = (
    int(Path("/proc/sys/net/core/somaxconn").read_text())
    if Path("/proc/sys/net/core/somaxconn").exists()
    else 4096
)


async def serve(host: str, port: int, port_file: Path | None, settings: SimulatorSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        # Go's net.Listen takes the kernel's somaxconn as its backlog (Ollama's listener is Go's).
        site = web.TCPSite(runner, host, port, backlog=SOMAXCONN)
        await site.start()
        bound = int(runner.addresses[0][1])
        if port_file is not None:
            write_port_file(port_file, bound)
        print(bound, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"ollama_simulator: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the handlers are installed
        asyncio.run(serve(args.host, args.port, args.port_file, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
