"""The configuration loader: every problem reported at once, good values round-trip, secrets stay
secret. The tests walk the attrs classes, so a new variable is covered without editing them."""

from __future__ import annotations

import math
import string
import typing
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import (
    ALL_CONFIGS,
    MIN_SECRET,
    AdminConfig,
    SidecarConfig,
    all_variables,
    load_config,
)
from shared.exceptions import ConfigError

MAX_INT = 10**17  # the loader caps integers at 19 characters, sign included
MARKER = "s3cr3t~"


@attrs.frozen
class Leaf:
    """One variable a config class reads, and where its value lands."""

    path: tuple[str, ...]
    env: str
    type: Any
    default: Any
    secret: bool
    minimum: float | None
    maximum: float | None

    @property
    def required(self) -> bool:
        """No default: must be set (and not empty)."""
        return self.default is attrs.NOTHING


def leaves(cls: type[Any], path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every variable `cls` reads, depth first."""
    hints = typing.get_type_hints(cls)
    found: list[Leaf] = []
    for spec in attrs.fields(cls):
        field_type = hints[spec.name]
        if attrs.has(field_type):
            found.extend(leaves(field_type, (*path, spec.name)))
            continue
        found.append(
            Leaf(
                path=(*path, spec.name),
                env=spec.metadata["env"],
                type=field_type,
                default=spec.default,
                secret=spec.metadata["secret"],
                minimum=spec.metadata["min"],
                maximum=spec.metadata["max"],
            )
        )
    return found


def value_at(config: object, path: tuple[str, ...]) -> Any:
    """The value at an attribute path of a built config."""
    value: Any = config
    for name in path:
        value = getattr(value, name)
    return value


def _pad(text: str, padding: str) -> str:
    return padding + text + padding


paddings = st.sampled_from(["", " ", "\t"])


SECRETS_WITH_A_MINIMUM = {"GATEWAY_GRANT_SECRET", "GATEWAY_GRANT_SECRET_PREVIOUS", "GATEWAY_KEY_PEPPER"}


BACKEND_LISTS = {
    "GATEWAY_OLLAMA_URL": ["http://127.0.0.1:11434", "https://ollama.internal", "http://gpu-1:8080/"],
    "GATEWAY_OLLAMA_URLS": [
        "",
        "http://a:1,http://b:2",
        "gpu1=http://10.0.0.1:11434;weight=2;max_parallel=4, gpu2=https://b.internal",
    ],
}


def good_values(leaf: Leaf) -> st.SearchStrategy[tuple[str, Any]]:
    """(raw environment string, the value it must become)."""
    if leaf.env == "GATEWAY_BUDGET_TIMEZONE":
        return st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]).map(
            lambda s: (s, s)
        )
    if leaf.env in BACKEND_LISTS:  # read as backend lists (tests/unit/test_backends.py)
        return st.sampled_from(BACKEND_LISTS[leaf.env]).map(lambda s: (s, s))
    if typing.get_origin(leaf.type) is typing.Literal:
        return st.sampled_from(typing.get_args(leaf.type)).map(lambda s: (s, s))
    high_int = MAX_INT if leaf.maximum is None else math.floor(leaf.maximum)
    if leaf.type is int:
        low = -MAX_INT if leaf.minimum is None else math.ceil(leaf.minimum)
        return st.builds(lambda n, p: (_pad(str(n), p), n), st.integers(low, high_int), paddings)
    if leaf.type is float:
        high = 1e300 if leaf.maximum is None else leaf.maximum
        floats = st.floats(min_value=leaf.minimum, max_value=high, allow_nan=False, allow_infinity=False)
        low = -MAX_INT if leaf.minimum is None else math.ceil(leaf.minimum)
        return st.one_of(
            st.builds(lambda x, p: (_pad(repr(x), p), x), floats, paddings),
            st.integers(low, high_int).map(lambda n: (str(n), float(n))),
        )
    if leaf.type is bool:
        return st.one_of(
            st.sampled_from(["1", "true", "yes", "on", "TRUE", " On "]).map(lambda s: (s, True)),
            st.sampled_from(["0", "false", "no", "off", "False", " NO "]).map(lambda s: (s, False)),
        )
    assert leaf.type is str, f"no strategy for {leaf.type!r} ({leaf.env}); extend the test"
    if leaf.env in SECRETS_WITH_A_MINIMUM:  # at least MIN_SECRET characters (previous: or none)
        long = st.text(min_size=MIN_SECRET)
        return (long if leaf.required else st.just("") | long).map(lambda s: (s, s))
    return st.text(min_size=1 if leaf.required else 0).map(lambda s: (s, s))


letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)


def bad_values(leaf: Leaf) -> st.SearchStrategy[str] | None:
    """Strings the loader must refuse for this field's type (None: every string is acceptable)."""
    if typing.get_origin(leaf.type) is typing.Literal:
        allowed = typing.get_args(leaf.type)
        return st.one_of(letters, st.just("")).filter(lambda s: s not in allowed)
    if leaf.type is int:
        return st.one_of(
            letters,
            st.sampled_from(
                ["", " ", "1.5", "1e3", "0x10", "--5", "5-", "+-1", "12 34", "-", "99999999999999999999"]
            ),
        )
    if leaf.type is float:
        # every letters-only string is either unparsable or inf/nan (refused as not finite)
        return st.one_of(letters, st.sampled_from(["", "1,5", "1.2.3", "nan", "-inf", "1e999", "0x1p3"]))
    if leaf.type is bool:
        return letters.filter(lambda s: s.lower() not in {"true", "false", "yes", "no", "on", "off"})
    return None


def low_values(leaf: Leaf) -> st.SearchStrategy[str] | None:
    """Numbers below the declared minimum (None when there is no minimum)."""
    if leaf.minimum is None:
        return None
    if leaf.type is int:
        return st.integers(-MAX_INT, math.ceil(leaf.minimum) - 1).map(str)
    minimum = leaf.minimum
    return st.floats(min_value=-1e300, max_value=minimum).filter(lambda x: x < minimum).map(repr)


def test_unknown_budget_time_zone_is_reported() -> None:
    """A time zone name that is not an IANA zone is one problem line naming the variable."""
    environ = {**required_env(SidecarConfig), "GATEWAY_BUDGET_TIMEZONE": "Mars/Olympus"}
    with pytest.raises(ConfigError) as raised:
        load_config(SidecarConfig, environ)
    assert raised.value.problems == ["GATEWAY_BUDGET_TIMEZONE: unknown time zone (got 'Mars/Olympus')"]


def high_values(leaf: Leaf) -> st.SearchStrategy[str] | None:
    """Numbers above the declared maximum (None when there is no maximum)."""
    if leaf.maximum is None:
        return None
    if leaf.type is int:
        return st.integers(math.floor(leaf.maximum) + 1, MAX_INT).map(str)
    maximum = leaf.maximum
    return st.floats(min_value=maximum, max_value=1e300).filter(lambda x: x > maximum).map(repr)


def secret_values() -> st.SearchStrategy[str]:
    """Random secrets; the marker makes any leak easy to spot in a message."""
    return st.text(min_size=MIN_SECRET, max_size=60).map(lambda s: MARKER + s)


def required_env(cls: type[Any]) -> dict[str, str]:
    """The smallest valid environment: every required variable with a plain value."""
    return {leaf.env: f"value-of-{leaf.env}".ljust(MIN_SECRET, "-") for leaf in leaves(cls) if leaf.required}


configs = st.sampled_from(ALL_CONFIGS)


POOL_MIN, POOL_MAX = "GATEWAY_DATABASE_POOL_MIN", "GATEWAY_DATABASE_POOL_MAX"


def _order_pool_sizes(environ: dict[str, str], expected: dict[str, tuple[str, str]]) -> None:
    """Two valid pool sizes in the wrong order are a cross-variable problem, tested on its own."""
    if POOL_MIN in environ and POOL_MAX in environ and not {POOL_MIN, POOL_MAX} & set(expected):
        low, high = sorted((environ[POOL_MIN], environ[POOL_MAX]), key=lambda v: int(v.strip()))
        environ[POOL_MIN], environ[POOL_MAX] = low, high
    elif POOL_MIN in environ and POOL_MIN not in expected and POOL_MAX not in environ:
        environ[POOL_MIN] = str(min(int(environ[POOL_MIN].strip()), 10))
    elif POOL_MAX in environ and POOL_MAX not in expected and POOL_MIN not in environ:
        environ[POOL_MAX] = str(max(int(environ[POOL_MAX].strip()), 1))


def test_pool_minimum_above_maximum_is_reported() -> None:
    """A pool minimum above the maximum is one problem naming both variables."""
    environ = {**required_env(AdminConfig), POOL_MIN: "5", POOL_MAX: "2"}
    with pytest.raises(ConfigError) as raised:
        load_config(AdminConfig, environ)
    assert raised.value.problems == [f"{POOL_MIN}: must not exceed {POOL_MAX}"]


@given(configs, st.data())
def test_every_problem_is_reported_once_and_all_at_once(cls: type[Any], data: st.DataObject) -> None:
    """For any mix of missing required variables, unparsable numbers/booleans and values below
    their minimum, ConfigError lists exactly one line per offending variable, all in one error,
    saying what is wrong; with no offender the config loads."""
    environ: dict[str, str] = {}
    expected: dict[str, tuple[str, str]] = {}
    for leaf in leaves(cls):
        kinds = ["good", "missing" if leaf.required else "default"]
        bad, low, high = bad_values(leaf), low_values(leaf), high_values(leaf)
        if bad is not None:
            kinds.append("bad")
        if low is not None:
            kinds.append("low")
        if high is not None:
            kinds.append("high")
        kind = data.draw(st.sampled_from(kinds), label=leaf.env)
        if kind == "good":
            environ[leaf.env] = data.draw(good_values(leaf))[0]
        elif kind == "missing":
            if data.draw(st.booleans(), label=f"{leaf.env} set but empty"):
                environ[leaf.env] = ""
            expected[leaf.env] = (kind, "")
        elif kind == "bad":
            assert bad is not None
            environ[leaf.env] = raw = data.draw(bad, label=leaf.env)
            expected[leaf.env] = (kind, raw)
        elif kind == "low":
            assert low is not None
            environ[leaf.env] = raw = data.draw(low, label=leaf.env)
            expected[leaf.env] = (kind, raw)
        elif kind == "high":
            assert high is not None
            environ[leaf.env] = raw = data.draw(high, label=leaf.env)
            expected[leaf.env] = (kind, raw)
    _order_pool_sizes(environ, expected)
    if not expected:
        assert isinstance(load_config(cls, environ), cls)
        return
    with pytest.raises(ConfigError) as raised:
        load_config(cls, environ)
    problems = raised.value.problems
    named = [line.split(":", 1)[0] for line in problems]
    assert sorted(named) == sorted(expected), problems
    message = str(raised.value)
    assert message.splitlines()[1:] == [f"  - {line}" for line in problems]
    for line, name in zip(problems, named, strict=True):
        kind, raw = expected[name]
        if kind == "missing":
            assert line == f"{name}: required but not set"
        elif kind == "low":
            assert "must be at least" in line
        elif kind == "high":
            assert "must be at most" in line
        else:
            assert "must be at least" not in line
            assert "must be at most" not in line
            assert "required" not in line
            assert f"(got {raw!r})" in line


@given(configs, st.data())
def test_good_values_round_trip_into_a_frozen_config(cls: type[Any], data: st.DataObject) -> None:
    """Valid values for any subset of variables (the rest left to their defaults) land, converted,
    in the right attribute of the frozen attrs config."""
    environ: dict[str, str] = {}
    wanted: dict[tuple[str, ...], Any] = {}
    for leaf in leaves(cls):
        if leaf.required or data.draw(st.booleans(), label=f"set {leaf.env}"):
            raw, value = data.draw(good_values(leaf), label=leaf.env)
            environ[leaf.env] = raw
            wanted[leaf.path] = value
        else:
            wanted[leaf.path] = leaf.default
    _order_pool_sizes(environ, {})
    for leaf in leaves(cls):
        if leaf.env in (POOL_MIN, POOL_MAX) and leaf.env in environ:
            wanted[leaf.path] = int(environ[leaf.env].strip())
    config = load_config(cls, environ)
    for path, value in wanted.items():
        got = value_at(config, path)
        assert got == value, path
        assert type(got) is type(value), path
    first = attrs.fields(cls)[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(config, first, None)
    leaf = leaves(cls)[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(value_at(config, leaf.path[:-1]), leaf.path[-1], None)


def _secret_envs(cls: type[Any], data: st.DataObject) -> tuple[dict[str, str], dict[str, str]]:
    """Two assignments of different random values to every secret variable."""
    first: dict[str, str] = {}
    second: dict[str, str] = {}
    for leaf in leaves(cls):
        if leaf.secret:
            first[leaf.env] = data.draw(secret_values(), label=leaf.env)
            second[leaf.env] = data.draw(secret_values().filter(first[leaf.env].__ne__))
    return first, second


@given(configs, st.data())
def test_secrets_never_appear_in_repr(cls: type[Any], data: st.DataObject) -> None:
    """repr of a loaded config shows no secret value: it is identical whatever the secrets are."""
    base = required_env(cls)
    first, second = _secret_envs(cls, data)
    assert first, f"{cls.__name__} reads no secret"
    one = load_config(cls, {**base, **first})
    other = load_config(cls, {**base, **second})
    assert repr(one) == repr(other)
    assert MARKER not in repr(one)
    for leaf in leaves(cls):
        if leaf.secret:
            assert value_at(one, leaf.path) == first[leaf.env]


@given(configs, st.data())
def test_secrets_never_appear_in_errors(cls: type[Any], data: st.DataObject) -> None:
    """When other variables are missing or bad, the ConfigError text is identical whatever the
    secret values are, and contains none of them."""
    base = required_env(cls)
    first, second = _secret_envs(cls, data)
    broken = dict(base)
    candidates = [
        leaf for leaf in leaves(cls) if not leaf.secret and (leaf.required or bad_values(leaf) is not None)
    ]
    assert candidates, f"{cls.__name__} has no non-secret variable that can be wrong"
    for leaf in data.draw(st.lists(st.sampled_from(candidates), min_size=1, unique=True), label="broken"):
        bad = bad_values(leaf)
        if bad is None:
            broken.pop(leaf.env)
        else:
            broken[leaf.env] = data.draw(bad, label=leaf.env)
    # a secret may itself be the missing variable
    missing_secret = data.draw(st.sampled_from([None, *sorted(first)]), label="missing secret")
    if missing_secret is not None:
        del first[missing_secret], second[missing_secret]
    with pytest.raises(ConfigError) as raised:
        load_config(cls, {**broken, **first})
    message_one = str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config(cls, {**broken, **second})
    assert str(raised.value) == message_one
    assert MARKER not in message_one
    for value in (*first.values(), *second.values()):
        assert value not in message_one


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("GATEWAY_DATABASE_POOL_MIN", "0"),
        ("GATEWAY_ARGON2_CONCURRENCY", "-3"),
        ("GATEWAY_SIDECAR_PORT", "-1"),
        ("GATEWAY_KEY_CACHE_TTL", "-0.5"),
        ("GATEWAY_GRANT_TTL", "0.5"),
    ],
)
def test_values_below_minimum_are_reported(env: str, value: str) -> None:
    """A number below its declared minimum is one problem line naming the variable and the minimum."""
    leaf = next(leaf for leaf in leaves(SidecarConfig) if leaf.env == env)
    with pytest.raises(ConfigError) as raised:
        load_config(SidecarConfig, {**required_env(SidecarConfig), env: value})
    assert raised.value.problems == [f"{env}: must be at least {leaf.minimum}"]


def test_empty_environment_lists_every_required_variable() -> None:
    """With nothing set, the admin CLI's config reports its three required variables at once."""
    with pytest.raises(ConfigError) as raised:
        load_config(AdminConfig, {})
    assert sorted(raised.value.problems) == [
        "GATEWAY_DATABASE_URL: required but not set",
        "GATEWAY_KEY_PEPPER: required but not set",
        "GATEWAY_REDIS_URL: required but not set",
    ]


def test_all_variables_lists_each_variable_once() -> None:
    """all_variables() has one sorted row per GATEWAY_* variable any component reads, with its
    default (None when required), secret flag and a help text."""
    rows = all_variables()
    names = [row[0] for row in rows]
    assert names == sorted(set(names))
    every_leaf = {leaf.env: leaf for cls in ALL_CONFIGS for leaf in leaves(cls)}
    assert set(names) == set(every_leaf)
    for name, default, secret, help_text in rows:
        leaf = every_leaf[name]
        assert name.startswith("GATEWAY_")
        assert default == (None if leaf.required else leaf.default)
        assert secret == leaf.secret
        assert help_text
    secrets = {row[0] for row in rows if row[2]}
    assert {
        "GATEWAY_GRANT_SECRET",
        "GATEWAY_KEY_PEPPER",
        "GATEWAY_DATABASE_URL",
        "GATEWAY_REDIS_URL",
    } <= secrets


@pytest.mark.parametrize(
    "name", ["GATEWAY_GRANT_SECRET", "GATEWAY_GRANT_SECRET_PREVIOUS", "GATEWAY_KEY_PEPPER"]
)
def test_secrets_shorter_than_the_minimum_are_refused_without_showing_them(name: str) -> None:
    """A grant secret, previous grant secret or pepper of 31 characters is a configuration error
    naming the variable and the minimum, never the value; 32 characters are accepted."""
    short = MARKER + "x" * (MIN_SECRET - 1 - len(MARKER))
    with pytest.raises(ConfigError) as raised:
        load_config(SidecarConfig, {**required_env(SidecarConfig), name: short})
    assert raised.value.problems == [f"{name}: at least {MIN_SECRET} characters"]
    assert MARKER not in str(raised.value)
    load_config(SidecarConfig, {**required_env(SidecarConfig), name: short + "x"})
