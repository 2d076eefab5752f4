"""API key format: `nz_<prefix><secret>`, generation with `secrets`, checksum checks with no I/O.

`prefix` is 8 base62 characters (unique, indexed, safe to show); the secret is 32 random base62
characters followed by a 6-character base62 CRC32 checksum over prefix and random part, so a typo or
a random guess is rejected before any database or Argon2 work.
"""

from __future__ import annotations

import secrets
import string
import zlib

import attrs

from shared.exceptions import KeyFormatError

KEY_SCHEME = "nz_"
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
PREFIX_LEN = 8
RANDOM_LEN = 32
CHECKSUM_LEN = 6
SECRET_LEN = RANDOM_LEN + CHECKSUM_LEN
KEY_LEN = len(KEY_SCHEME) + PREFIX_LEN + SECRET_LEN
_ALPHABET_SET = frozenset(ALPHABET)


@attrs.frozen
class ParsedKey:
    """A key that passed the format and checksum checks."""

    prefix: str
    token: str = attrs.field(repr=False)


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(ALPHABET[rem])
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    """The 6-character checksum of `prefix + random part`."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LEN)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def generate_prefix() -> str:
    """A fresh random prefix (uniqueness is enforced by the database)."""
    return _random_base62(PREFIX_LEN)


def generate_key(prefix: str | None = None) -> ParsedKey:
    """A new key; the full token is shown once and only its hash is stored."""
    prefix = prefix if prefix is not None else generate_prefix()
    if not is_prefix(prefix):
        raise KeyFormatError("bad prefix")
    body = prefix + _random_base62(RANDOM_LEN)
    return ParsedKey(prefix=prefix, token=KEY_SCHEME + body + checksum(body))


def is_prefix(value: str) -> bool:
    """True for exactly 8 base62 characters."""
    return len(value) == PREFIX_LEN and all(c in _ALPHABET_SET for c in value)


def normalise_prefix(value: str) -> str:
    """The CLI accepts a prefix with or without `nz_`; anything else is a KeyFormatError."""
    value = value.strip()
    if value.startswith(KEY_SCHEME):
        value = value[len(KEY_SCHEME) :]
    if not is_prefix(value):
        raise KeyFormatError(f"a key prefix is {PREFIX_LEN} letters or digits, optionally after nz_")
    return value


def parse_key(token: str) -> ParsedKey:
    """Check shape and checksum; raise KeyFormatError without touching any storage."""
    if len(token) != KEY_LEN or not token.startswith(KEY_SCHEME):
        raise KeyFormatError("malformed API key")
    body = token[len(KEY_SCHEME) : len(KEY_SCHEME) + PREFIX_LEN + RANDOM_LEN]
    given = token[len(KEY_SCHEME) + PREFIX_LEN + RANDOM_LEN :]
    if not all(c in _ALPHABET_SET for c in body) or not secrets.compare_digest(
        given.encode("ascii", "replace"), checksum(body).encode("ascii")
    ):
        raise KeyFormatError("malformed API key")
    return ParsedKey(prefix=body[:PREFIX_LEN], token=token)


def parse_bearer(header: str | None) -> ParsedKey:
    """Parse an `Authorization: Bearer nz_…` header value."""
    if not header:
        raise KeyFormatError("missing API key")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise KeyFormatError("malformed Authorization header")
    return parse_key(value.strip())
