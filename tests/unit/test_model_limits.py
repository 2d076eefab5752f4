"""Model patterns (normalised as names are, docs/OLLAMA.md#model-names), what they match, and how a
key's rules inherit from its tenant's."""

from __future__ import annotations

import pytest

from shared.model_limits import applicable, canonical_model, digest, matches
from shared.model_names import InvalidModelName, normalise_pattern, qualified, unqualified
from shared.models import Limits, ModelLimit, ModelRule, model_rules


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("big:*", "big:*"),
        ("big", "big:latest"),  # the tag defaults to latest, as in a name
        ("  Big:70B ", "big:70b"),
        ("library/big:*", "big:*"),
        ("registry.ollama.ai/library/big:*", "big:*"),
        ("REGISTRY.ollama.ai/library/big:*", "big:*"),
        (" big:*\n", "big:*"),  # trimmed, as a name is
        ("ns/big:*", "ns/big:*"),
        ("*/*:*", "*/*:*"),
        ("*", "*:latest"),
        ("host.io:5000/ns/m*:q4_*", "host.io:5000/ns/m*:q4_*"),
        ("llama3.3:*", "llama3.3:*"),
    ],
)
def test_patterns_normalise_as_names_do(given: str, canonical: str) -> None:
    assert normalise_pattern(given) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        ":tag",
        "big:",
        "a/b/c/d",
        "bïg:*",
        "big:7\x00b",
        "big:*\nx",
        "REGISTRY.ollama.ai/big:*",  # two parts are namespace/model, and a namespace has no dots
        "big:7b ; drop",
        "-big",
        ".big",
        "big/:x",
        "a" * 81,
        "big:" + "t" * 81,
        "big\u202e:*",
        "big:７０b",
    ],
)
def test_a_pattern_that_is_no_name_is_refused(bad: str) -> None:
    with pytest.raises(InvalidModelName):
        normalise_pattern(bad)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("big:*", "big:70b", True),
        ("big:*", "big:latest", True),
        ("big:*", "bigger:70b", False),
        ("big:latest", "big:70b", False),
        ("big*:*", "bigger:70b", True),
        ("*:*", "big:70b", True),
        ("*:*", "ns/big:70b", False),  # `*` stays inside one part: the default namespace only
        ("*/*:*", "ns/big:70b", True),
        ("*/*:*", "host.io/ns/big:1", False),
        ("*/*/*:*", "host.io/ns/big:1", True),
        ("*:latest", "big:latest", True),
        ("b*g:7*b", "bag:70b", True),
        ("b*g:7*b", "bag:80b", False),
        ("llama3.3:*", "llama3x3:70b", False),  # a dot is a dot
    ],
)
def test_a_star_matches_inside_one_part_of_the_qualified_name(
    pattern: str, name: str, expected: bool
) -> None:
    assert matches(pattern, name) is expected


def test_qualified_and_unqualified_are_inverse() -> None:
    for short in ("big:70b", "ns/big:1", "host.io/ns/big:1", "localhost:5000/ns/m:t"):
        assert unqualified(qualified(short)) == short
    assert qualified("big:70b") == "registry.ollama.ai/library/big:70b"


def test_the_model_a_request_names_is_canonical_or_none() -> None:
    assert canonical_model(" Big:70B") == "big:70b"
    assert canonical_model("big:70b:local") == "big:70b"
    for nothing in (None, "", "  ", 5, ["big"], {"name": "big"}, "bïg", "a/b/c/d"):
        assert canonical_model(nothing) is None


def test_digests_are_short_and_distinct() -> None:
    names = [normalise_pattern(p) for p in ("big:*", "big:latest", "*:*", "ns/big:*")]
    assert len({digest(n) for n in names}) == len(names)
    assert all(len(digest(n)) == 16 for n in names)


def test_a_keys_rule_inherits_the_tenants_rule_on_the_same_pattern_value_by_value() -> None:
    tenant = (
        ModelLimit("big:*", Limits(rpm=5, daily_tokens=300)),
        ModelLimit("small:*", Limits(tpm=1000)),
    )
    key = (
        ModelLimit("big:*", Limits(rpm=2, daily_tokens=-1)),  # own rpm; no key-level daily budget
        ModelLimit("mid:*", Limits(max_concurrent=1)),
    )
    rules = {r.pattern: r for r in model_rules(tenant, key)}
    assert rules["big:*"] == ModelRule("big:*", Limits(rpm=2), Limits(rpm=5, daily_tokens=300))
    assert rules["small:*"] == ModelRule("small:*", Limits(tpm=1000), Limits(tpm=1000))
    assert rules["mid:*"] == ModelRule("mid:*", Limits(max_concurrent=1), Limits())
    # A key rule that only says "unlimited" on a pattern the tenant does not limit is no rule.
    assert model_rules((), (ModelLimit("x:*", Limits(rpm=-1)),)) == ()


def test_every_rule_covering_the_model_applies() -> None:
    rules = model_rules(
        (
            ModelLimit("big:*", Limits(rpm=5)),
            ModelLimit("*:*", Limits(tpm=10)),
            ModelLimit("ns/*:*", Limits(rpm=1)),
        ),
        (),
    )
    assert [r.pattern for r in applicable(rules, "big:70b")] == ["*:*", "big:*"]
    assert [r.pattern for r in applicable(rules, "small:1b")] == ["*:*"]
    assert applicable(rules, None) == []


def test_a_rule_the_key_inherits_unchanged_is_counted_at_the_tenants_scope_only() -> None:
    """The tenant's counters include every key's requests, so a key scope with the tenant's very
    limits could never refuse first; one with limits of its own is counted too."""
    inherited = model_rules((ModelLimit("big:*", Limits(rpm=5)),), ())[0]
    assert inherited.scopes() == [("tenant", Limits(rpm=5))]
    own = model_rules((ModelLimit("big:*", Limits(rpm=5)),), (ModelLimit("big:*", Limits(tpm=100)),))[0]
    assert own.scopes() == [("key", Limits(rpm=5, tpm=100)), ("tenant", Limits(rpm=5))]
    key_only = model_rules((), (ModelLimit("big:*", Limits(max_concurrent=1)),))[0]
    assert key_only.scopes() == [("key", Limits(max_concurrent=1))]
