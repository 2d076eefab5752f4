"""The API key format: generation, parsing, checksum rejection and prefix handling, with no I/O."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import keys
from shared.exceptions import KeyFormatError

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase

base62_chars = st.sampled_from(BASE62)
prefixes = st.text(alphabet=BASE62, min_size=keys.PREFIX_LEN, max_size=keys.PREFIX_LEN)
random_parts = st.text(alphabet=BASE62, min_size=keys.RANDOM_LEN, max_size=keys.RANDOM_LEN)
# Replacement characters: mostly other base62 characters (the hard case for a checksum), plus
# anything else Unicode has to offer.
replacements = st.one_of(base62_chars, st.characters())


def _token(prefix: str, random_part: str) -> str:
    """A well-formed token built the documented way: scheme, prefix, random part, CRC32 checksum."""
    body = prefix + random_part
    return "nz_" + body + keys.checksum(body)


well_formed_tokens = st.builds(_token, prefixes, random_parts)


def test_alphabet_is_base62() -> None:
    """The key alphabet is exactly the 62 digits and ASCII letters, each once."""
    assert len(keys.ALPHABET) == 62
    assert set(keys.ALPHABET) == set(BASE62)


@given(prefixes)
def test_generated_key_parses_back_to_its_prefix(prefix: str) -> None:
    """generate_key(prefix) yields `nz_` + prefix + 32 random + 6 checksum characters, and
    parse_key returns the same prefix and token."""
    generated = keys.generate_key(prefix)
    token = generated.token
    assert generated.prefix == prefix
    assert len(token) == 3 + 8 + 32 + 6 == keys.KEY_LEN
    assert token.startswith("nz_" + prefix)
    assert set(token[3:]) <= set(BASE62)
    # the generated key has exactly the documented structure (so it is one of well_formed_tokens)
    assert token == _token(prefix, token[11:43])
    parsed = keys.parse_key(token)
    assert parsed.prefix == prefix
    assert parsed.token == token


def test_generate_key_picks_a_fresh_prefix_and_secret() -> None:
    """Without a prefix, generate_key draws a valid random prefix; two keys never share a secret."""
    first, second = keys.generate_key(), keys.generate_key()
    assert keys.is_prefix(first.prefix)
    assert keys.parse_key(first.token).prefix == first.prefix
    assert first.token != second.token
    assert first.token[11:] != second.token[11:]


@given(st.text(alphabet=BASE62).filter(lambda s: len(s) != keys.PREFIX_LEN))
def test_generate_key_rejects_a_bad_prefix(prefix: str) -> None:
    """generate_key refuses a prefix that is not exactly 8 base62 characters."""
    with pytest.raises(KeyFormatError):
        keys.generate_key(prefix)


@given(well_formed_tokens)
def test_well_formed_tokens_parse(token: str) -> None:
    """Every token with the documented structure is accepted (the checksum is over prefix+random)."""
    assert keys.parse_key(token).prefix == token[3:11]


@given(well_formed_tokens, st.data())
def test_any_single_substitution_is_rejected(token: str, data: st.DataObject) -> None:
    """Changing any one character of a valid key (scheme, prefix, random part or checksum) to any
    other character makes parse_key raise KeyFormatError: typos never reach the database."""
    position = data.draw(st.integers(min_value=0, max_value=len(token) - 1), label="position")
    replacement = data.draw(replacements.filter(lambda c: c != token[position]), label="replacement")
    mutated = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(KeyFormatError):
        keys.parse_key(mutated)


def test_substitution_in_generated_keys_is_rejected_at_every_position() -> None:
    """For a key from generate_key, every position with every other base62 character is rejected."""
    token = keys.generate_key().token
    for position in range(len(token)):
        for replacement in BASE62:
            if replacement == token[position]:
                continue
            with pytest.raises(KeyFormatError):
                keys.parse_key(token[:position] + replacement + token[position + 1 :])


near_tokens = st.one_of(
    st.text(),
    st.text(min_size=keys.KEY_LEN - 3, max_size=keys.KEY_LEN - 3).map(lambda s: "nz_" + s),
    st.builds(
        lambda body, tail: "nz_" + body + tail,
        st.text(alphabet=BASE62, min_size=40, max_size=40),
        st.text(min_size=6, max_size=6),
    ),
    well_formed_tokens.map(lambda t: t[:-1]),
    well_formed_tokens.map(lambda t: t + "0"),
    well_formed_tokens.map(lambda t: " " + t),
    well_formed_tokens.map(str.upper),
)


@given(near_tokens)
def test_parse_key_never_crashes(text: str) -> None:
    """Arbitrary text either raises KeyFormatError or parses to a key whose checksum is right."""
    try:
        parsed = keys.parse_key(text)
    except KeyFormatError:
        return
    assert text == _token(text[3:11], text[11:43])
    assert parsed.prefix == text[3:11]


headers = st.one_of(
    st.none(),
    st.text(),
    st.builds(
        lambda scheme, value: scheme + value,
        st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "Basic ", "Bearer", "Token ", ""]),
        st.one_of(st.text(), near_tokens),
    ),
)


@given(headers)
def test_parse_bearer_never_crashes(header: str | None) -> None:
    """Any Authorization value either raises KeyFormatError or yields a checksum-valid key."""
    try:
        parsed = keys.parse_bearer(header)
    except KeyFormatError:
        return
    assert header is not None
    assert keys.parse_key(parsed.token) == parsed


@given(well_formed_tokens, st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"]), st.booleans())
def test_parse_bearer_accepts_the_scheme_case_insensitively(token: str, scheme: str, pad: bool) -> None:
    """`Bearer <key>` is accepted with any case of the scheme and surrounding whitespace."""
    header = f"{scheme} {token}"
    if pad:
        header = f"  {header}  "
    assert keys.parse_bearer(header).token == token


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer ", "Basic abc", "nz_abc"])
def test_parse_bearer_rejects_missing_or_foreign_schemes(header: str | None) -> None:
    """A missing header, an empty value or another scheme is a KeyFormatError."""
    with pytest.raises(KeyFormatError):
        keys.parse_bearer(header)


@given(prefixes, st.booleans(), st.sampled_from(["", " ", "\t", "\n "]))
def test_normalise_prefix_accepts_with_and_without_scheme(prefix: str, scheme: bool, pad: str) -> None:
    """normalise_prefix returns the bare 8 characters for `abcdefgh` and `nz_abcdefgh` (padding
    whitespace ignored)."""
    text = pad + ("nz_" if scheme else "") + prefix + pad
    assert keys.normalise_prefix(text) == prefix
    assert keys.is_prefix(prefix)


@given(st.text(alphabet=BASE62, max_size=20).filter(lambda s: len(s) != keys.PREFIX_LEN), st.booleans())
def test_normalise_prefix_rejects_wrong_lengths(prefix: str, scheme: bool) -> None:
    """A prefix of any length other than 8 is rejected, with or without `nz_`."""
    assert not keys.is_prefix(prefix)
    with pytest.raises(KeyFormatError):
        keys.normalise_prefix(("nz_" if scheme else "") + prefix)


@given(
    prefixes,
    st.integers(min_value=0, max_value=keys.PREFIX_LEN - 1),
    st.characters().filter(lambda c: c not in BASE62 and not c.isspace()),
    st.booleans(),
)
def test_normalise_prefix_rejects_wrong_characters(
    prefix: str, position: int, bad: str, scheme: bool
) -> None:
    """Eight characters with one that is not base62 are rejected, with or without `nz_`."""
    candidate = prefix[:position] + bad + prefix[position + 1 :]
    assert not keys.is_prefix(candidate)
    with pytest.raises(KeyFormatError):
        keys.normalise_prefix(("nz_" if scheme else "") + candidate)


@pytest.mark.parametrize("text", ["nz_", "NZ_abcdefgh", "nz-abcdefgh", "nz_nz_abcdefgh", "abcd efg"])
def test_normalise_prefix_rejects_near_misses(text: str) -> None:
    """Only the exact lowercase `nz_` scheme is stripped, once."""
    with pytest.raises(KeyFormatError):
        keys.normalise_prefix(text)


def test_keys_use_the_whole_alphabet() -> None:
    """Prefixes and random parts are drawn from all 62 characters (no character is never used)."""
    generated = [keys.generate_key() for _ in range(400)]
    assert set("".join(k.prefix for k in generated)) == set(BASE62)
    assert set("".join(k.token[11:43] for k in generated)) == set(BASE62)


def test_parsed_key_repr_hides_the_token() -> None:
    """repr(ParsedKey) shows the prefix but never the token."""
    generated = keys.generate_key()
    assert generated.prefix in repr(generated)
    assert generated.token not in repr(generated)
    assert generated.token[11:] not in repr(generated)


# Fixed vectors, computed outside the code under test (CRC-32 of the body with binascii, written in
# base62 by hand: 0xecae51f4 = 3970847220 → "4KjGku"; 0x25787e19 → "0gXlW5").
CHECKSUM_VECTORS = [
    ("AbCdEfGh0123456789abcdefghijklmnopqrstuv", "4KjGku"),
    ("ZZZZZZZZzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "0gXlW5"),
]


@pytest.mark.parametrize(("body", "expected"), CHECKSUM_VECTORS)
def test_checksum_fixed_vectors(body: str, expected: str) -> None:
    """The checksum of a known body is the value written down by hand, and the key built from it
    parses; one changed checksum character does not."""
    assert keys.checksum(body) == expected
    assert keys.parse_key("nz_" + body + expected).prefix == body[:8]
    wrong = expected[:-1] + ("A" if expected[-1] != "A" else "B")
    with pytest.raises(KeyFormatError):
        keys.parse_key("nz_" + body + wrong)
