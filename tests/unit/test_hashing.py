"""Argon2id hashing of keys at rest: the PHC string, fresh salts, and verification with the pepper."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import keys
from shared.hashing import OWASP, Argon2Params, hash_key, parse_phc, verify_key

PEPPER = "unit-test-pepper"
# Argon2 with OWASP parameters takes tens of milliseconds; property tests use cheap parameters.
CHEAP = Argon2Params(memory_kib=64, time_cost=1)
PHC_RE = re.compile(r"^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$")

tokens = st.text(min_size=1, max_size=80)
peppers = st.text(max_size=40)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _replace_part(phc: str, index: int, value: str) -> str:
    parts = phc.split("$")
    parts[index] = value
    return "$".join(parts)


def test_phc_string_shape() -> None:
    """hash_key with the defaults writes `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`: a 16-byte
    salt and a 32-byte digest, unpadded standard base64, readable back by parse_phc."""
    phc = hash_key(keys.generate_key().token, pepper=PEPPER)
    assert PHC_RE.match(phc), phc
    params, salt, digest = parse_phc(phc)
    assert params == OWASP == Argon2Params(memory_kib=19456, time_cost=2, parallelism=1)
    assert len(salt) == 16
    assert len(digest) == 32


def test_custom_parameters_are_recorded() -> None:
    """The PHC string records the parameters used, so verification recomputes with them."""
    params = Argon2Params(memory_kib=128, time_cost=3, parallelism=2)
    phc = hash_key("nz_token", params=params)
    assert phc.startswith("$argon2id$v=19$m=128,t=3,p=2$")
    assert parse_phc(phc)[0] == params
    assert verify_key("nz_token", phc)


def test_salts_differ_per_hash() -> None:
    """Hashing the same token twice gives different salts and different PHC strings, both valid."""
    token = keys.generate_key().token
    hashes = [hash_key(token, pepper=PEPPER) for _ in range(4)]
    assert len({parse_phc(h)[1] for h in hashes}) == 4
    assert len(set(hashes)) == 4
    assert all(verify_key(token, h, pepper=PEPPER) for h in hashes)


def test_verify_with_owasp_parameters() -> None:
    """With the production parameters: the right token and pepper verify; a token differing in one
    character, a wrong pepper or a missing pepper do not."""
    token = keys.generate_key().token
    other = token[:-1] + ("a" if token[-1] != "a" else "b")
    phc = hash_key(token, pepper=PEPPER)
    assert verify_key(token, phc, pepper=PEPPER)
    assert not verify_key(other, phc, pepper=PEPPER)
    assert not verify_key(token, phc, pepper=PEPPER + "x")
    assert not verify_key(token, phc)


def test_token_never_appears_in_the_phc_string() -> None:
    """The stored string contains neither the token nor its secret part."""
    for _ in range(3):
        token = keys.generate_key().token
        phc = hash_key(token, pepper=PEPPER)
        assert token not in phc
        assert token[11:] not in phc
        assert token[11:43] not in phc


@settings(max_examples=50)
@given(tokens, tokens, peppers, peppers)
def test_verify_accepts_only_the_right_token_and_pepper(
    token: str, other: str, pepper: str, other_pepper: str
) -> None:
    """For any token and pepper, verification succeeds exactly for the same token and pepper."""
    phc = hash_key(token, pepper=pepper, params=CHEAP)
    assert verify_key(token, phc, pepper=pepper)
    assert verify_key(other, phc, pepper=pepper) == (other == token)
    assert verify_key(token, phc, pepper=other_pepper) == (other_pepper == pepper)


@settings(max_examples=50)
@given(st.sampled_from([4, 5]), st.data())
def test_any_flipped_bit_in_salt_or_digest_fails(part: int, data: st.DataObject) -> None:
    """Flipping any single bit of the stored salt (part 4) or digest (part 5) makes the right token
    fail verification."""
    token = "nz_token-under-test"
    phc = hash_key(token, pepper=PEPPER, params=CHEAP)
    _, salt, digest = parse_phc(phc)
    raw = bytearray(salt if part == 4 else digest)
    index = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="byte")
    bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
    raw[index] ^= 1 << bit
    corrupted = _replace_part(phc, part, _b64(bytes(raw)))
    assert not verify_key(token, corrupted, pepper=PEPPER)


CORRUPTIONS: dict[str, str] = {
    "empty": "",
    "garbage": "not a phc string",
    "argon2i": "$argon2i$v=19$m=64,t=1,p=1$SALT$HASH",
    "argon2d": "$argon2d$v=19$m=64,t=1,p=1$SALT$HASH",
    "version-16": "$argon2id$v=16$m=64,t=1,p=1$SALT$HASH",
    "more-time": "$argon2id$v=19$m=64,t=2,p=1$SALT$HASH",
    "more-memory": "$argon2id$v=19$m=128,t=1,p=1$SALT$HASH",
    "missing-param": "$argon2id$v=19$m=64,t=1$SALT$HASH",
    "unnamed-param": "$argon2id$v=19$m=64,t=1,p=1,x$SALT$HASH",
    "non-numeric-param": "$argon2id$v=19$m=lots,t=1,p=1$SALT$HASH",
    "extra-part": "$argon2id$v=19$m=64,t=1,p=1$SALT$HASH$",
    "missing-digest": "$argon2id$v=19$m=64,t=1,p=1$SALT",
    "bad-base64-salt": "$argon2id$v=19$m=64,t=1,p=1$A$HASH",
    "truncated-digest": "$argon2id$v=19$m=64,t=1,p=1$SALT$SHORTHASH",
    "empty-digest": "$argon2id$v=19$m=64,t=1,p=1$SALT$",
    "no-leading-dollar": "argon2id$v=19$m=64,t=1,p=1$SALT$HASH",
    "empty-salt": "$argon2id$v=19$m=64,t=1,p=1$$HASH",
    "zero-memory": "$argon2id$v=19$m=0,t=1,p=1$SALT$HASH",
    "zero-time": "$argon2id$v=19$m=64,t=0,p=1$SALT$HASH",
    "zero-lanes": "$argon2id$v=19$m=64,t=1,p=0$SALT$HASH",
    "negative-memory": "$argon2id$v=19$m=-64,t=1,p=1$SALT$HASH",
}


@pytest.mark.parametrize("template", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_phc_strings_do_not_verify(template: str) -> None:
    """verify_key returns False (never raises) for a stored string that is not a well-formed
    argon2id v19 PHC string of this token: other variants, versions or parameters, missing,
    extra or undecodable parts, or parameters Argon2 refuses."""
    token = "nz_token-under-test"
    phc = hash_key(token, pepper=PEPPER, params=CHEAP)
    _, _, _, _, salt, digest = phc.split("$")
    truncated = digest[:20]
    corrupted = template.replace("SHORTHASH", truncated).replace("SALT", salt).replace("HASH", digest)
    assert corrupted != phc
    assert verify_key(token, corrupted, pepper=PEPPER) is False


def test_parse_phc_rejects_foreign_strings() -> None:
    """parse_phc raises ValueError for a string that is not an argon2id v19 PHC string."""
    for text in ("", "$argon2i$v=19$m=1,t=1,p=1$AA$AA", "$argon2id$v=18$m=1,t=1,p=1$AA$AA", "$$$$$"):
        with pytest.raises(ValueError, match="argon2id"):
            parse_phc(text)


# A PHC string made by the Argon2 reference implementation (Debian's `argon2` command, not the code
# under test): `echo -n "$TOKEN" | argon2 saltsaltsaltsalt -id -t 2 -k 19456 -p 1 -l 32 -e`.
REFERENCE_TOKEN = "nz_AbCdEfGh0123456789abcdefghijklmnopqrstuv"
REFERENCE_PHC = (
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$Q7g4prN/dl248VYtjw+6OgTq45nUf4GsEnUg0pru4sY"
)


def test_verifies_a_phc_string_from_the_reference_implementation() -> None:
    """A hash written by the reference Argon2id implementation (no pepper) verifies, and nothing
    else does: another token, a pepper, a changed digest."""
    assert verify_key(REFERENCE_TOKEN, REFERENCE_PHC)
    assert not verify_key(REFERENCE_TOKEN[:-1] + "w", REFERENCE_PHC)
    assert not verify_key(REFERENCE_TOKEN, REFERENCE_PHC, pepper="pepper")
    assert not verify_key(REFERENCE_TOKEN, REFERENCE_PHC.replace("Q7g4", "Q7g5"))
