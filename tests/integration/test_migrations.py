"""The dbmate migrations: up, down and up again against a real Postgres."""

from __future__ import annotations

import asyncpg
import pytest

import localstack
from shared.db import asyncpg_dsn

pytestmark = pytest.mark.integration

TABLES = {
    "tenants",
    "api_keys",
    "usage_ledger",
    "budget_periods",
    "audit_log",
    "prompt_logs",
    "model_limits",
    "model_budget_periods",
}


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows} - {"schema_migrations"}


async def test_migrations_up_down_up(database_url: str) -> None:
    """Every migration has a working migrate:down: all the way down leaves no table, up again
    restores every table."""
    assert await _tables(database_url) == TABLES
    for _ in sorted(localstack.MIGRATIONS.glob("*.sql")):
        localstack.dbmate(database_url, "rollback")
    assert await _tables(database_url) == set()
    localstack.dbmate(database_url, "up")
    assert await _tables(database_url) == TABLES


async def test_indexes_for_hot_queries(db: asyncpg.Connection) -> None:
    """The queries on the hot path have indexes: key prefix, ledger by tenant/key and time,
    audit by time, prompt logs by expiry."""
    names = {r["indexname"] for r in await db.fetch("SELECT indexname FROM pg_indexes")}
    assert {
        "api_keys_prefix_key",
        "usage_ledger_tenant_time_idx",
        "usage_ledger_key_time_idx",
        "audit_log_at_idx",
        "prompt_logs_expires_idx",
    } <= names
