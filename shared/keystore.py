"""Finding and verifying a presented key: checksum first (no I/O), then one query, then Argon2id."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

import asyncpg
import attrs

from shared import keys
from shared.db import KEY_COLUMNS, TENANT_COLUMNS, key_from_row, model_limits_sql, tenant_from_row
from shared.exceptions import KeyFormatError
from shared.hashing import verify_key
from shared.models import ApiKey, KeyContext, Tenant, resolve_context

# Assembled once from the fixed column lists of shared.db; only $1 carries input.
_KEY_SELECT = ", ".join(f"k.{c.strip()} AS k_{c.strip()}" for c in KEY_COLUMNS.split(","))
_TENANT_SELECT = ", ".join(f"t.{c.strip()} AS t_{c.strip()}" for c in TENANT_COLUMNS.split(","))
_LOOKUP_SQL = "SELECT " + _KEY_SELECT + ", k.hash AS k_hash, " + _TENANT_SELECT
_LOOKUP_SQL += f", {model_limits_sql('t.id', None)} AS t_model_limits"
_LOOKUP_SQL += f", {model_limits_sql('t.id', 'k.id')} AS k_model_limits"
_LOOKUP_SQL += " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.prefix = $1"

Verifier = Callable[[str, str, str], Awaitable[bool]]


@attrs.frozen
class StoredKey:
    """A key record with its tenant and its hash, as read for verification."""

    key: ApiKey
    tenant: Tenant
    hash: str = attrs.field(repr=False)


async def fetch_by_prefix(
    conn: asyncpg.Connection | asyncpg.Pool[asyncpg.Record], prefix: str
) -> StoredKey | None:
    """One query: the key with this prefix, its tenant and its hash."""
    row = await conn.fetchrow(_LOOKUP_SQL, prefix)
    if row is None:
        return None
    columns = list(row.keys())  # a Record iterates over values; keys() is a one-shot iterator
    key_part = {name[2:]: row[name] for name in columns if name.startswith("k_")}
    tenant_part = {name[2:]: row[name] for name in columns if name.startswith("t_")}
    return StoredKey(
        key=key_from_row(key_part),
        tenant=tenant_from_row(tenant_part),
        hash=str(key_part["hash"]),
    )


async def _verify_inline(token: str, phc: str, pepper: str) -> bool:
    return verify_key(token, phc, pepper=pepper)


@attrs.frozen
class Verdict:
    """The outcome of checking a presented token."""

    context: KeyContext | None
    reason: str  # "ok", "malformed", "unknown", "mismatch", "revoked", "expired", "suspended"


async def authenticate(
    conn: asyncpg.Connection | asyncpg.Pool[asyncpg.Record],
    token: str,
    *,
    pepper: str,
    now: dt.datetime,
    verifier: Verifier = _verify_inline,
) -> Verdict:
    """Check format and checksum without I/O, then look up the prefix and verify the hash.

    `verifier` lets the sidecar run Argon2id off the event loop with bounded concurrency.
    """
    try:
        parsed = keys.parse_key(token)
    except KeyFormatError:
        return Verdict(None, "malformed")
    stored = await fetch_by_prefix(conn, parsed.prefix)
    if stored is None:
        return Verdict(None, "unknown")
    if not await verifier(parsed.token, stored.hash, pepper):
        return Verdict(None, "mismatch")
    if stored.key.status != "active":
        return Verdict(None, "revoked")
    if stored.key.expires_at is not None and stored.key.expires_at <= now:
        return Verdict(None, "expired")
    if stored.tenant.status != "active":
        return Verdict(None, "suspended")
    return Verdict(resolve_context(stored.tenant, stored.key), "ok")
