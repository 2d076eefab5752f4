"""The grant: HMAC-signed, short-lived permission for one request; tampering, expiry, another
request, rotation and empty secrets are all refused, and refusals never reveal the secret."""

from __future__ import annotations

import string

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import grant as grants
from shared.grant import MAX_TTL, Grant, GrantError, RateInfo
from shared.models import Limits, ModelRule

NOW = 1_800_000_000.0
SECRET = "grant-secret-\u00e9-0123456789abcdef"
OLD_SECRET = "the-previous-secret-fedcba9876543210"

FULL = Grant(
    request_id="6f1c2f1e-0d7a-4c38-9c55-1f3b2a7d9e01",
    tenant_id=7,
    key_id=42,
    key_prefix="AbCd1234",
    method="POST",
    path="/api/chat",
    expires_at=NOW + 30.0,
    lease="6f1c2f1e-0d7a-4c38-9c55-1f3b2a7d9e01",
    allowed_models=("llama3.2:latest", "qwen3:8b"),
    max_body_bytes=1_048_576,
    max_num_ctx=8192,
    max_keep_alive_seconds=300,
    prompt_logging=True,
    prompt_log_ttl_seconds=86_400,
    allow_templates=True,
    allow_reload_options=True,
    key_limits=Limits(
        rpm=5, tpm=1000, max_concurrent=2, daily_tokens=10, monthly_tokens=100, total_tokens=-1
    ),
    tenant_limits=Limits(
        rpm=50, tpm=None, max_concurrent=20, daily_tokens=None, monthly_tokens=1, total_tokens=9
    ),
    rate=RateInfo(
        limit_requests=5,
        remaining_requests=4,
        reset_requests=12.5,
        limit_tokens=1000,
        remaining_tokens=900,
        reset_tokens=0.25,
    ),
    client_addr="203.0.113.9",
    metered=True,
    periods={"day": "2026-11-27", "month": "2026-11", "total": "1970-01-01"},
    model_rules=(ModelRule("big:*", Limits(rpm=2), Limits(rpm=5, daily_tokens=300)),),
    admitted_second=1_790_000_000,
    rollovers={"day": 1_790_050_000.0, "month": 1_791_000_000.0},
)
MINIMAL = Grant(
    request_id="r-1",
    tenant_id=1,
    key_id=2,
    key_prefix="ZZZZ9999",
    method="GET",
    path="/v1/models",
    expires_at=NOW + 1.0,
)


def _verify(token: str | None, **changes: object) -> Grant:
    args: dict[str, object] = {"secrets": (SECRET,), "method": "POST", "path": "/api/chat", "now": NOW}
    args.update(changes)
    return grants.verify(token, **args)  # type: ignore[arg-type]  # keyword overrides per test


def test_round_trip_keeps_every_field() -> None:
    """verify(sign(g)) returns a grant equal to g, every optional field included."""
    token = grants.sign(FULL, SECRET)
    assert token.startswith("v1.")
    assert token.count(".") == 2
    assert _verify(token) == FULL


def test_the_full_grant_sets_every_field() -> None:
    """FULL differs from a minimal grant (defaults only) in every field, so the round trip covers
    every field (a new Grant field must be added here)."""
    for field in attrs.fields(Grant):
        assert getattr(FULL, field.name) != getattr(MINIMAL, field.name), field.name


def test_round_trip_of_a_minimal_grant_keeps_the_defaults() -> None:
    """A grant with only the required fields comes back with the defaults (no models list means every
    model, prompt logging off, empty limits)."""
    token = grants.sign(MINIMAL, SECRET)
    back = _verify(token, method="GET", path="/v1/models")
    assert back == MINIMAL
    assert back.allowed_models is None
    assert back.prompt_logging is False


def test_token_does_not_contain_the_secret() -> None:
    """The signed token carries the claims and a MAC, never the secret itself."""
    token = grants.sign(FULL, SECRET)
    assert SECRET not in token
    assert SECRET.encode("utf-8").hex() not in token


@settings(max_examples=600)
@given(st.data())
def test_any_single_character_change_is_refused(data: st.DataObject) -> None:
    """Replacing any one character of a valid token by any other character is refused with
    GrantError: the version, the claims and the signature are all bound (no two spellings of one
    grant verify)."""
    token = grants.sign(FULL, SECRET)
    # anywhere, or (often) near the end, where the signature's last base64 character sits
    index = data.draw(
        st.one_of(st.integers(0, len(token) - 1), st.integers(len(token) - 4, len(token) - 1)), label="index"
    )
    alphabet = string.ascii_letters + string.digits + "-_+/=.!~ \u00e9"
    replacement = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[index]), label="char")
    tampered = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(GrantError):
        _verify(tampered)


B64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def test_the_last_signature_character_has_one_spelling() -> None:
    """The 32-byte MAC takes 43 base64 characters, the last carrying 4 bits plus 2 padding bits:
    the three other characters that differ only in the padding bits must not verify."""
    token = grants.sign(FULL, SECRET)
    head, last = token[:-1], token[-1]
    base = B64URL.index(last) & ~3
    for variant in (B64URL[base + k] for k in range(4)):
        if variant == last:
            continue
        with pytest.raises(GrantError):
            _verify(head + variant)


def test_the_signature_has_no_standard_base64_spelling() -> None:
    """The wire form is base64url: replacing `-` or `_` in the signature by its standard-base64
    twin (`+`, `/`) is a different token and must not verify."""
    for n in range(200):
        grant = attrs.evolve(FULL, request_id=f"req-{n}")
        token = grants.sign(grant, SECRET)
        signature = token.rsplit(".", 1)[1]
        if "-" in signature or "_" in signature:
            break
    else:  # pragma: no cover - 200 MACs without either character is astronomically unlikely
        pytest.fail("no signature with - or _ found")
    at = max(signature.find("-"), signature.find("_"))
    twin = {"-": "+", "_": "/"}[signature[at]]
    prefix = token[: len(token) - len(signature)]
    assert _verify(token, now=NOW) == grant
    with pytest.raises(GrantError):
        _verify(prefix + signature[:at] + twin + signature[at + 1 :])


@pytest.mark.parametrize("cut", [1, 2, 4, 10])
def test_truncated_or_extended_tokens_are_refused(cut: int) -> None:
    """Dropping characters from the end, or appending some, is refused."""
    token = grants.sign(FULL, SECRET)
    with pytest.raises(GrantError):
        _verify(token[:-cut])
    with pytest.raises(GrantError):
        _verify(token + "A" * cut)


@pytest.mark.parametrize(
    "token", [None, "", "v1", "v1..", "v2.e30.AAAA", "v1.e30.AAAA", "a.b.c.d", "v1.!!.??"]
)
def test_missing_and_garbage_tokens_are_refused(token: str | None) -> None:
    """A missing header, an empty value and junk are refused with GrantError, never another error."""
    with pytest.raises(GrantError):
        _verify(token)


def test_claims_re_signed_with_another_secret_are_refused() -> None:
    """Claims signed with any other secret (a forger's) are refused."""
    with pytest.raises(GrantError, match="signature"):
        _verify(grants.sign(FULL, "not-the-secret"))


def test_an_expired_grant_is_refused_from_expires_at_on() -> None:
    """A grant is valid strictly before expires_at: at now == expires_at and after, it is refused."""
    token = grants.sign(FULL, SECRET)
    assert _verify(token, now=FULL.expires_at - 0.001) == FULL
    with pytest.raises(GrantError, match="expired"):
        _verify(token, now=FULL.expires_at)
    with pytest.raises(GrantError, match="expired"):
        _verify(token, now=FULL.expires_at + 3600)


def test_a_ttl_of_max_ttl_is_accepted() -> None:
    """The sidecar may issue grants valid for up to MAX_TTL (60 s)."""
    assert MAX_TTL == 60.0
    grant = attrs.evolve(FULL, expires_at=NOW + MAX_TTL)
    assert _verify(grants.sign(grant, SECRET)) == grant


@pytest.mark.parametrize("ttl", [MAX_TTL + 10, 2 * MAX_TTL, 3600.0, 86_400.0 * 365, 1e15])
def test_a_ttl_beyond_max_ttl_is_refused(ttl: float) -> None:
    """A correctly signed grant that claims a lifetime well beyond MAX_TTL is refused, so a
    misconfigured or compromised signer cannot mint long-lived grants."""
    grant = attrs.evolve(FULL, expires_at=NOW + ttl)
    with pytest.raises(GrantError):
        _verify(grants.sign(grant, SECRET))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/chat"),
        ("post", "/api/chat"),
        ("PUT", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/chat/"),
        ("POST", "/API/chat"),
        ("POST", "/api/%63hat"),
        ("POST", "/api/pull"),
        ("POST", "/v1/chat/completions"),
    ],
)
def test_a_grant_for_another_method_or_path_is_refused(method: str, path: str) -> None:
    """A grant binds its exact method and raw path: any other (even a spelling variant) is refused."""
    with pytest.raises(GrantError, match="another request"):
        _verify(grants.sign(FULL, SECRET), method=method, path=path)


def test_rotation_previous_secret_verifies_while_listed() -> None:
    """During rotation a grant signed with the previous secret verifies when (current, previous)
    are given, and no longer once only the new secret is configured; new grants verify either way."""
    old_token = grants.sign(FULL, OLD_SECRET)
    assert _verify(old_token, secrets=(SECRET, OLD_SECRET)) == FULL
    with pytest.raises(GrantError, match="signature"):
        _verify(old_token, secrets=(SECRET,))
    with pytest.raises(GrantError, match="signature"):
        _verify(old_token, secrets=(SECRET, ""))
    new_token = grants.sign(FULL, SECRET)
    assert _verify(new_token, secrets=(SECRET, OLD_SECRET)) == FULL
    assert _verify(new_token, secrets=(SECRET, "")) == FULL
    assert _verify(new_token, secrets=(SECRET,)) == FULL


def test_no_secrets_verify_nothing() -> None:
    """With no configured secret at all, nothing verifies."""
    with pytest.raises(GrantError):
        _verify(grants.sign(FULL, SECRET), secrets=())


def test_an_empty_secret_never_verifies() -> None:
    """A grant signed with an empty secret is refused whatever secrets are configured, an empty one
    included: an unset secret must not turn into a known key."""
    token = grants.sign(FULL, "")
    for secrets in [("",), ("", ""), ("", SECRET), (SECRET, ""), (SECRET,)]:
        with pytest.raises(GrantError):
            _verify(token, secrets=secrets)


def _failures() -> list[GrantError]:
    token = grants.sign(FULL, SECRET)
    attempts: list[dict[str, object]] = [
        {"token": None},
        {"token": "v1.garbage"},
        {"token": token[:-10] + ("B" if token[-10] != "B" else "C") + token[-9:]},
        {"token": grants.sign(FULL, SECRET + "x")},
        {"token": token, "now": FULL.expires_at + 1},
        {"token": grants.sign(attrs.evolve(FULL, expires_at=NOW + 1e6), SECRET)},
        {"token": token, "path": "/api/generate"},
        {"token": token, "secrets": (OLD_SECRET,)},
    ]
    errors: list[GrantError] = []
    for attempt in attempts:
        args = dict(attempt)
        with pytest.raises(GrantError) as caught:
            _verify(args.pop("token"), **args)  # type: ignore[arg-type]  # test table values
        errors.append(caught.value)
    return errors


def test_grant_errors_never_contain_the_secret() -> None:
    """No refusal message (nor its args, repr, or chained cause) contains a configured secret or a
    recognisable part of it: the messages are safe to show to clients."""
    for error in _failures():
        texts = [str(error), repr(error), *map(str, error.args)]
        if error.__cause__ is not None:
            texts.append(repr(error.__cause__))
        for text in texts:
            for secret in (SECRET, OLD_SECRET):
                assert secret not in text
                assert secret[:12] not in text
