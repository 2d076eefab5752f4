"""Argon2id hashing of API keys at rest, stored as a PHC string, verified in constant time.

pyargon2 returns only the raw digest, so this module writes and reads the PHC string
(`$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`) itself. The default parameters are OWASP's
recommendation for Argon2id (m=19 MiB, t=2, p=1). An optional pepper (a server-side secret) is
mixed in as Argon2's secret input, so a database dump alone cannot be brute-forced offline.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

import attrs
import pyargon2

SALT_BYTES = 16
HASH_BYTES = 32
VERSION = 19
MAX_MEMORY_KIB = 1 << 20  # 1 GiB
MAX_TIME_COST = 64


@attrs.frozen
class Argon2Params:
    """Cost parameters; memory in KiB."""

    memory_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1


OWASP = Argon2Params()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _digest(token: str, salt: bytes, params: Argon2Params, pepper: str) -> bytes:
    raw = pyargon2.hash_bytes(
        token.encode("utf-8"),
        salt,
        pepper=pepper.encode("utf-8"),
        hash_len=HASH_BYTES,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        variant="id",
        version=0x13,
        encoding="raw",
    )
    if not isinstance(raw, bytes):  # pyargon2 is untyped; "raw" encoding returns bytes
        raise TypeError("pyargon2 returned no raw digest")
    return raw


def hash_key(token: str, *, pepper: str = "", params: Argon2Params = OWASP) -> str:
    """Hash a token with a fresh salt; returns the PHC string to store."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _digest(token, salt, params, pepper)
    return (
        f"$argon2id$v={VERSION}$m={params.memory_kib},t={params.time_cost},"
        f"p={params.parallelism}${_b64(salt)}${_b64(digest)}"
    )


def parse_phc(phc: str) -> tuple[Argon2Params, bytes, bytes]:
    """Split a PHC string into parameters, salt and digest; ValueError if it is not ours."""
    parts = phc.split("$")
    if len(parts) != 6 or parts[0] or parts[1] != "argon2id" or parts[2] != f"v={VERSION}":
        raise ValueError("not an argon2id v19 PHC string")
    fields = dict(item.split("=", 1) for item in parts[3].split(","))
    params = Argon2Params(
        memory_kib=int(fields["m"]), time_cost=int(fields["t"]), parallelism=int(fields["p"])
    )
    # Argon2's own limits, plus ceilings so a tampered row cannot make verification hog the host.
    if not (
        1 <= params.parallelism <= 16
        and 8 * params.parallelism <= params.memory_kib <= MAX_MEMORY_KIB
        and 1 <= params.time_cost <= MAX_TIME_COST
    ):
        raise ValueError("argon2 parameters out of range")
    salt, digest = _unb64(parts[4]), _unb64(parts[5])
    if len(salt) < 8 or len(digest) != HASH_BYTES:
        raise ValueError("argon2 salt or digest of the wrong size")
    return params, salt, digest


def verify_key(token: str, phc: str, *, pepper: str = "") -> bool:
    """Recompute with the stored salt and parameters; constant-time comparison."""
    try:
        params, salt, expected = parse_phc(phc)
    except (ValueError, KeyError, binascii.Error):
        return False
    return hmac.compare_digest(_digest(token, salt, params, pepper), expected)
