"""Tenants cannot disturb each other's models (docs/DECISIONS.md#tenants-cannot-disturb-each-others-models):
keep_alive has a floor as well as a cap, in every spelling Ollama reads (numbers of seconds, Go
duration strings, any Go-folded case of the key, on every route); the options that reload a model
are refused unless the key is allowed them; /api/ps entries lose the fields that time other
tenants' requests.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

import ollama_simulator as sim
from ollama_simulator.gojson import DEFAULT_KEEP_ALIVE_NS
from shared.config import ProxyOptions
from shared.grant import Grant
from shared.policy import METERED, Route
from stream_proxy import apis, body
from stream_proxy import policy as body_policy
from stream_proxy.exceptions import Refused
from tests.unit.grants import grant as _grant

FLOOR = 300
KEEP_ALIVE_KEYS = ["keep_alive", "KEEP_ALIVE", "Keep_Alive", "\u212aeep_alive"]  # U+212A: Go folds it to k
# Every route whose body the policy sees: Ollama reads keep_alive on the native ones; forks of the
# OpenAI and Anthropic layers pass it through, so the floor holds wherever it is sent.
BODY_ROUTES: tuple[Route, ...] = tuple(sorted(METERED))


def _doc(document: dict[str, Any]) -> body.Body:
    return body.Body.read(orjson.dumps(document))


def _forwarded(grant: Grant, route: Route, document: dict[str, Any], floor: int = FLOOR) -> Any:
    """What stream_proxy forwards after the key's body policy (the re-serialised document)."""
    doc = _doc(document)
    body_policy.check_body(
        grant, route, apis.adapter(route).models(route, doc.document), doc, keep_alive_floor=floor
    )
    return orjson.loads(doc.encoded())


def _go_seconds(value: Any) -> float:
    """keep_alive in seconds as Ollama's api.Duration reads it (negative: forever)."""
    if isinstance(value, str):
        return sim.parse_go_duration(value) / 1e9
    return float(value)


def test_the_default_floor_is_ollamas_default_keep_alive() -> None:
    """GATEWAY_KEEP_ALIVE_FLOOR defaults to 5 minutes, what Ollama keeps a model loaded for."""
    assert ProxyOptions().keep_alive_floor == 300 == DEFAULT_KEEP_ALIVE_NS // 1_000_000_000


SHORT = [0, 0.0, -0.0, 1, 299, 299.999, 1e-10, "0", "+0", "-0", "0s", "-0s", "0.0s", "1ns", "250ms",
         "4m59s", "4.99m", ".08h", "1us", "1µs", "+1m", "0h0m0s"]  # fmt: skip


@pytest.mark.parametrize("keep_alive", SHORT, ids=repr)
@pytest.mark.parametrize("key", KEEP_ALIVE_KEYS)
def test_keep_alive_below_the_floor_is_raised_to_it(key: str, keep_alive: Any) -> None:
    """A keep_alive Ollama reads as shorter than the floor (0 and "0s" unload the model for every
    tenant at once) is forwarded as the floor in whole seconds, in the one spelling `keep_alive`."""
    assert 0 <= _go_seconds(keep_alive) < FLOOR
    sent = {"model": "llama3.2", "messages": [], key: keep_alive}
    assert _forwarded(_grant(), "chat", sent) == {"model": "llama3.2", "messages": [], "keep_alive": FLOOR}


@pytest.mark.parametrize("route", BODY_ROUTES)
def test_the_floor_holds_on_every_route(route: Route) -> None:
    """The floor is enforced on /api/chat, /api/generate, /api/embed and every other family."""
    sent: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    sent["keep_alive"] = "0s"
    if route == "anthropic_messages":
        sent["max_tokens"] = 10
    assert _forwarded(_grant(), route, sent)["keep_alive"] == FLOOR


@pytest.mark.parametrize("keep_alive", [300, 301, 3600.5, "5m", "300s", "1h", "1h30m", "24h"], ids=repr)
def test_keep_alive_at_or_above_the_floor_is_forwarded_as_sent(keep_alive: Any) -> None:
    """A keep_alive at or above the floor (and under any cap) is left exactly as the client sent it."""
    doc = _doc({"model": "m", "keep_alive": keep_alive})
    body_policy.apply_caps(_grant(), doc, keep_alive_floor=FLOOR)
    assert not doc.changed


@pytest.mark.parametrize("keep_alive", [-1, -0.5, "-1m", "-1ns", "-24h"], ids=repr)
def test_negative_keep_alive_means_forever_not_short(keep_alive: Any) -> None:
    """Negative is Ollama's "keep loaded forever": it unloads nothing, so the floor leaves it alone
    (only a cap lowers it)."""
    doc = _doc({"model": "m", "keep_alive": keep_alive})
    body_policy.apply_caps(_grant(), doc, keep_alive_floor=FLOOR)
    assert not doc.changed
    capped = _forwarded(_grant(max_keep_alive_seconds=600), "chat", {"model": "m", "keep_alive": keep_alive})
    assert capped["keep_alive"] == 600


@pytest.mark.parametrize(
    ("cap", "keep_alive", "expected"),
    [
        (600, 0, 300),  # below the floor: raised
        (600, "1h", 600),  # above the cap: lowered
        (600, -1, 600),  # forever: lowered to the cap
        (600, 450, None),  # between: untouched
        (60, 30, 300),  # a cap under the floor: the floor wins
        (60, "2h", 300),
        (0, 0, 300),  # a cap of 0 cannot make a tenant unload shared models
    ],
    ids=repr,
)
def test_cap_and_floor_together(cap: int, keep_alive: Any, expected: int | None) -> None:
    """keep_alive is lowered to the key's cap, then raised to the floor, which wins over a cap below it."""
    forwarded = _forwarded(
        _grant(max_keep_alive_seconds=cap), "generate", {"model": "m", "keep_alive": keep_alive}
    )
    assert forwarded["keep_alive"] == (keep_alive if expected is None else expected)


def test_a_floor_of_zero_turns_it_off() -> None:
    """GATEWAY_KEEP_ALIVE_FLOOR=0: keep_alive 0 (unload) is forwarded as sent."""
    assert _forwarded(_grant(), "chat", {"model": "m", "keep_alive": 0}, floor=0) == {
        "model": "m",
        "keep_alive": 0,
    }


@pytest.mark.parametrize("keep_alive", [1e10, 9_223_372_037, 10**18, "2562048h", "9223372037s"], ids=repr)
def test_keep_alive_beyond_gos_duration_is_400(keep_alive: Any) -> None:
    """More seconds than an int64 of nanoseconds holds is a 400 when it would be forwarded as sent:
    Go converts such a number to a platform-dependent duration (negative on amd64, which unloads)
    and refuses such a string."""
    with pytest.raises(Refused) as caught:
        _forwarded(_grant(), "chat", {"model": "m", "keep_alive": keep_alive})
    assert caught.value.status == 400
    capped = _forwarded(_grant(max_keep_alive_seconds=600), "chat", {"model": "m", "keep_alive": keep_alive})
    assert capped["keep_alive"] == 600  # a cap rewrites it into range instead


@pytest.mark.parametrize("keep_alive", ["\u0665m", "\uff10", "\u0660s", "1\u0660m"], ids=repr)
def test_non_ascii_digits_are_no_duration(keep_alive: str) -> None:
    """Go's duration parser takes ASCII digits only; Python's \\d and float() take Arabic-Indic and
    full-width ones too, which must not be read as a duration Ollama would never see (400)."""
    with pytest.raises(Refused) as caught:
        _forwarded(_grant(max_keep_alive_seconds=600), "chat", {"model": "m", "keep_alive": keep_alive})
    assert caught.value.status == 400


def test_absent_or_null_keep_alive_is_left_to_ollama() -> None:
    """No keep_alive (or null, which Go leaves unset) is Ollama's own default: nothing is added."""
    assert _forwarded(_grant(), "chat", {"model": "m"}) == {"model": "m"}
    assert _forwarded(_grant(), "chat", {"model": "m", "keep_alive": None}) == {
        "model": "m",
        "keep_alive": None,
    }


# --- options that reload a model ---------------------------------------------------------------

RELOAD_SPELLINGS = [
    "num_gpu",
    "NUM_GPU",
    "Num_Gpu",
    "num_batch",
    "NUM_BATCH",
    "main_gpu",
    "MAIN_GPU",
    "use_mmap",
    "USE_MMAP",
    "u\u017fe_mmap",  # U+017F long s: Go folds it to s
    "num_thread",
    "Num_Thread",
]
OPTION_ROUTES: tuple[Route, ...] = ("chat", "generate", "embed", "embeddings", "openai_chat")


@pytest.mark.parametrize("value", [0, 99, True, False, None], ids=repr)
@pytest.mark.parametrize("option", RELOAD_SPELLINGS)
def test_reload_options_are_403_without_the_flag(option: str, value: Any) -> None:
    """An option that makes Ollama reload the model (evicting it for every tenant) is refused with
    403, in any case spelling and whatever its value, unless the key is allowed them."""
    with pytest.raises(Refused) as caught:
        _forwarded(_grant(), "chat", {"model": "m", "options": {"temperature": 0.1, option: value}})
    assert caught.value.status == 403
    assert body.fold(option) in caught.value.message


@pytest.mark.parametrize("route", OPTION_ROUTES)
@pytest.mark.parametrize("options_key", ["options", "OPTIONS", "Options"])
def test_reload_options_are_refused_on_every_route(route: Route, options_key: str) -> None:
    """The refusal holds on every route that carries `options`, under any spelling of `options`."""
    sent = {"model": "m", "messages": [{"role": "user", "content": "x"}], options_key: {"num_gpu": 0}}
    with pytest.raises(Refused) as caught:
        _forwarded(_grant(), route, sent)
    assert caught.value.status == 403


@pytest.mark.parametrize("key", ["shift", "SHIFT", "\u017fhift"])
@pytest.mark.parametrize("route", ["chat", "generate"])
@pytest.mark.parametrize("value", [True, False])
def test_native_shift_is_403_without_the_flag(route: Route, key: str, value: bool) -> None:
    """Native chat and generate's top-level `shift` (a Go struct field, so any folded case) is
    refused without the flag; null is Go's unset and passes."""
    with pytest.raises(Refused) as caught:
        _forwarded(_grant(), route, {"model": "m", key: value})
    assert caught.value.status == 403
    _forwarded(_grant(), route, {"model": "m", key: None})


@pytest.mark.parametrize("option", RELOAD_SPELLINGS)
def test_reload_options_are_forwarded_with_the_flag(option: str) -> None:
    """A key given `set-reload-options --on` sends them, unchanged."""
    sent = {"model": "m", "options": {option: 1}, "shift": False}
    assert _forwarded(_grant(allow_reload_options=True), "generate", sent) == sent


def test_other_options_need_no_flag() -> None:
    """Sampler options, num_predict and num_ctx (capped on its own) reload nothing and pass."""
    sent = {"model": "m", "options": {"temperature": 0.2, "num_predict": 5, "num_ctx": 2048, "seed": 1}}
    assert _forwarded(_grant(), "chat", sent) == sent


# --- /api/ps -----------------------------------------------------------------------------------


def _ps(*names: str) -> dict[str, Any]:
    entry = {"size": 5, "digest": "d", "details": {}, "expires_at": "2026-12-07T11:49:00.123Z",
             "size_vram": 5, "context_length": 4096}  # fmt: skip
    return {"models": [{"name": n, "model": n, **entry} for n in names]}


def test_ps_entries_lose_the_fields_that_time_other_tenants() -> None:
    """/api/ps keeps the allowed models only, each without expires_at, size_vram and context_length;
    /api/tags keeps its fields."""
    listing = apis.adapter("ps").listing("ps")
    assert listing is not None
    grant = _grant(allowed_models=("llama3.2:latest",))
    document = body_policy.filter_listing(grant, listing, _ps("llama3.2:latest", "qwen3:8b"))
    stripped = body_policy.strip_private("ps", listing, document)
    assert stripped == {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 5,
                                    "digest": "d", "details": {}}]}  # fmt: skip
    assert body_policy.strip_private("tags", listing, _ps("a")) == _ps("a")
