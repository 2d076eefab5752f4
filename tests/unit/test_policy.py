"""The endpoint policy: the allowlist, 405 with Allow, the blocked routes in every spelling, 400 for
ambiguous spellings of served paths, 404 for the rest (docs/ARCHITECTURE.md#admission, DECISIONS.md)."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.policy import decide

# The allowlist as docs/ARCHITECTURE.md#admission and docs/OLLAMA.md#routes state it, written out
# here on purpose (not read from shared.policy) so that a change to the table in the code is caught.
SERVED: dict[str, dict[str, str]] = {
    "/api/chat": {"POST": "chat"},
    "/api/generate": {"POST": "generate"},
    "/api/embed": {"POST": "embed"},
    "/api/embeddings": {"POST": "embeddings"},
    "/api/tags": {"GET": "tags", "HEAD": "tags"},
    "/api/show": {"POST": "show"},
    "/api/ps": {"GET": "ps"},
    "/api/version": {"GET": "version", "HEAD": "version"},
    "/v1/chat/completions": {"POST": "openai_chat"},
    "/v1/completions": {"POST": "openai_completions"},
    "/v1/embeddings": {"POST": "openai_embeddings"},
    "/v1/models": {"GET": "openai_models"},
    "/v1/models/llama3.2:latest": {"GET": "openai_model"},
}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT")
OVERRIDES = ("GET", "POST", "DELETE", "PUT", "HEAD", "")

# The mutating and egress routes (docs/OLLAMA.md#routes), one canonical spelling each.
BLOCKED_BASES = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/sha256:abc123",
    "/api/me",
    "/api/signout",
    "/api/user/keys/x",
    "/api/experimental/web_search",
    "/api/experimental/web_fetch",
    "/api/experimental/model-recommendations",
)

BLOCKED_SPELLINGS = (
    *BLOCKED_BASES,
    "//api/pull",
    "/api//pull",
    "/api/./pull",
    "/api/chat/../pull",
    "/api/%70ull",
    "/api/%2570ull",
    "/api/%252570ull",
    "/api%2Fpull",
    "/api%2fpull",
    "/api/%252Fpull",
    "/%61pi/pull",
    "/%41PI/pull",
    "/API/PULL",
    "/Api/Pull",
    "/api/pull/",
    "/api/pull//",
    "/api/pull?x=1",
    "/api/pull#x",
    "/api\\pull",
    "/api\\\\pull",
    "/api%5Cpull",
    "/api/pull/.",
    "/api/pull/x/..",
    "/api/pull%2F",
    "/api/pul%6C",
    "/./api/pull",
    "/x/../api/pull",
    "/v1/../api/pull",
    "/v1/models/../../api/pull",
    "/api/%2e/pull",
    "/api/%2E%2E/api/pull",
    "/api/PUSH",
    "/api/push/",
    "/api/%63reate",
    "/api/Create?stream=false",
    "/api/copy//",
    "/api/%2e/copy",
    "/api/x/../delete",
    "/api/DELETE",
    "/api/delete?model=x",
    "/./api/me",
    "/api/ME",
    "/api/signout/.",
    "/api/%2573ignout",
    "/api/blobs",
    "/api/blobs/",
    "/api/blobs/x",
    "/api/BLOBS/x",
    "/api/%62lobs/x",
    "/api/blobs/sha256%3Aabc",
    "/api//blobs//sha256:abc",
    "/api/user",
    "/api/USER/keys/x",
    "/api/user%2Fkeys%2Fx",
    "/api/experimental/WEB_SEARCH",
    "/api/experimental%2Fweb_fetch",
    "/api/%65xperimental/model-recommendations",
    "/api/experimental/",
)

AMBIGUOUS_SERVED = (
    ("POST", "/api//chat"),
    ("POST", "/API/chat"),
    ("POST", "/api/chat/"),
    ("POST", "/api/%63hat"),
    ("POST", "//api/chat"),
    ("POST", "/api/./chat"),
    ("POST", "/api/x/../chat"),
    ("POST", "/api%2Fchat"),
    ("POST", "/api/chat/."),
    ("POST", "/api\\chat"),
    ("POST", "/api/%2563hat"),
    ("GET", "/api/Tags"),
    ("GET", "/api/%74ags"),
    ("GET", "/api/tags//"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/V1/chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("GET", "/V1/models"),
    ("GET", "/v1/models/"),
    ("GET", "/v1/%6Dodels"),
)


def test_every_allowlisted_pair_is_200_with_its_route() -> None:
    """Each allowlisted (method, path) is admitted with the route name the services dispatch on."""
    for path, methods in SERVED.items():
        for method, route in methods.items():
            decision = decide(method, path)
            assert (decision.status, decision.route, decision.allowed) == (200, route, True), (method, path)
            assert decision.allow == ()


@pytest.mark.parametrize("path", list(SERVED))
def test_query_string_does_not_change_an_allowed_decision(path: str) -> None:
    """A query string is ignored for the decision: the canonical path with `?…` keeps its route."""
    method, route = next(iter(SERVED[path].items()))
    decision = decide(method, f"{path}?stream=false&x=%2Fpull")
    assert (decision.status, decision.route) == (200, route)


@pytest.mark.parametrize("path", list(SERVED))
def test_head_is_allowed_only_where_listed(path: str) -> None:
    """HEAD is admitted for /api/tags and /api/version (as Ollama serves it) and nowhere else."""
    decision = decide("HEAD", path)
    if path in ("/api/tags", "/api/version"):
        assert (decision.status, decision.route) == (200, SERVED[path]["HEAD"])
    else:
        assert decision.status == 405
        assert decision.route is None


@pytest.mark.parametrize("path", list(SERVED))
def test_other_methods_on_a_served_path_are_405_with_allow(path: str) -> None:
    """Every method not listed for a served path is 405 with Allow naming exactly the listed ones
    (DECISIONS.md: 405, not 404)."""
    for method in METHODS:
        if method in SERVED[path]:
            continue
        decision = decide(method, path)
        assert decision.status == 405, (method, path)
        assert decision.route is None
        assert not decision.allowed
        assert set(decision.allow) == set(SERVED[path]), (method, path)
        assert len(decision.allow) == len(SERVED[path])


def test_methods_are_case_sensitive_as_in_http_and_ollama() -> None:
    """Methods are case-sensitive (RFC 9110 §9.1; Ollama's router and stream_proxy's parser agree):
    a lower-case `post` on /api/chat is an unknown method, 405 like any other, never a grant that
    stream_proxy would then refuse."""
    assert decide("POST", "/api/chat").route == "chat"
    for method in ("post", "Post", "pOST", "get"):
        decision = decide(method, "/api/chat")
        assert (decision.status, decision.route) == (405, None), method


@pytest.mark.parametrize("path", list(SERVED))
def test_method_override_headers_on_a_served_path_are_400(path: str) -> None:
    """Any method-override header value on a served path is refused with 400, even one naming the
    request's own method."""
    method = next(iter(SERVED[path]))
    for override in OVERRIDES:
        decision = decide(method, path, override)
        assert decision.status == 400, (path, override)
        assert decision.route is None


@pytest.mark.parametrize("spelling", BLOCKED_SPELLINGS)
def test_blocked_route_is_403_in_every_spelling_and_method(spelling: str) -> None:
    """A mutating or egress route is 403 however it is spelled, for every method (HEAD and OPTIONS
    included), with or without a method-override header."""
    for method in METHODS:
        decision = decide(method, spelling)
        assert decision.status == 403, (method, spelling, decision)
        assert decision.route is None
        assert not decision.allowed
        assert decision.allow == ()
        assert decision.message
        for override in OVERRIDES:
            assert decide(method, spelling, override).status == 403, (method, spelling, override)


def test_the_blocked_list_is_long_enough() -> None:
    """The spelling list covers at least 40 distinct spellings (the brief's floor)."""
    assert len(set(BLOCKED_SPELLINGS)) >= 40


@pytest.mark.parametrize("spelling", ["/api//../pull", "/api/chat//../../pull"])
def test_rfc3986_dot_removal_reading_of_a_blocked_route_is_403(spelling: str) -> None:
    """RFC 3986 §5.2.4 dot removal without merging slashes reads `/api//../pull` as `/api/pull`
    (the `..` consumes the empty segment): that is a normalisation landing on a blocked route, so
    the policy (docs/ARCHITECTURE.md#admission) asks for 403, not 400."""
    assert decide("POST", spelling).status == 403


@pytest.mark.parametrize(
    "spelling", ["/api/pull%3Fx=1", "/api/pull%23x", "/api/pull%00", "/api/pull;x=1", "/api/pull%20"]
)
def test_exotic_spellings_of_a_blocked_route_are_never_admitted(spelling: str) -> None:
    """Spellings only exotic parsers read as a blocked route (encoded `?`/`#`, NUL, matrix
    parameters, a trailing space) are refused (400/403/404), never admitted."""
    for method in METHODS:
        assert decide(method, spelling).status in (400, 403, 404), (method, spelling)


@pytest.mark.parametrize(("method", "spelling"), AMBIGUOUS_SERVED)
def test_ambiguous_spelling_of_a_served_path_is_400(method: str, spelling: str) -> None:
    """A non-canonical spelling of a served path (doubled slash, case, trailing slash, encoded
    letters or slashes, dot segments) is 400, for the listed method and any other."""
    for m in (method, "DELETE", "OPTIONS"):
        decision = decide(m, spelling)
        assert decision.status == 400, (m, spelling)
        assert decision.route is None


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api",
        "/v1",
        "/api/status",
        "/v1/audio/transcriptions",
        "/v1/messages/count_tokens",
        "/foo",
        "/api/chatx",
    ],
)
def test_unknown_paths_are_404(path: str) -> None:
    """Ollama routes outside the allowlist that are not blocked (e.g. /api/status, transcriptions),
    the root and unrelated paths are 404, never admitted."""
    for method in METHODS:
        decision = decide(method, path)
        assert decision.status == 404, (method, path)
        assert decision.route is None


@pytest.mark.parametrize("path", ["/api/", "/v1/", "/api/status/", "/v1//responses"])
def test_ambiguous_unknown_paths_are_400(path: str) -> None:
    """An ambiguous spelling (trailing or doubled slash) of a path that is not served is 400."""
    assert decide("GET", path).status == 400


@pytest.mark.parametrize(
    "name", ["llama3.2", "llama3.2:latest", "qwen2.5-coder:7b", "nomic-embed-text", "gpt-oss:20b", "A_b.c-1"]
)
def test_v1_model_with_a_plain_name_is_served(name: str) -> None:
    """`GET /v1/models/{model}` with a plain one-segment name is admitted as `openai_model`; other
    methods are 405 with Allow: GET."""
    assert (decide("GET", f"/v1/models/{name}").status, decide("GET", f"/v1/models/{name}").route) == (
        200,
        "openai_model",
    )
    post = decide("POST", f"/v1/models/{name}")
    assert (post.status, post.allow) == (405, ("GET",))


@pytest.mark.parametrize(
    ("segment", "statuses"),
    [
        ("library%2Fllama3.2", {400}),
        ("a%2Fb", {400}),
        ("a%2fb", {400}),
        ("..", {400}),
        (".", {400}),
        ("%2e%2e", {400}),
        ("a/..", {400}),
        ("..%2F..%2Fapi%2Fpull", {403}),
        ("../../api/pull", {403}),
        ("%2E%2E/%2E%2E/api/delete", {403}),
    ],
)
def test_v1_model_with_slash_or_dots_is_refused(segment: str, statuses: set[int]) -> None:
    """`/v1/models/{model}` takes one plain segment: an encoded slash or dot segments are 400, and
    403 where they climb to a blocked route."""
    assert decide("GET", f"/v1/models/{segment}").status in statuses


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}(:[A-Za-z0-9._-]{1,20})?", fullmatch=True))
def test_v1_model_any_plain_name_is_served(name: str) -> None:
    """Any name in Ollama's model-name alphabet, as a single segment, is served by GET."""
    assert decide("GET", f"/v1/models/{name}").route == "openai_model"


# ---------------------------------------------------------------------------------------------
# Hypothesis: random compositions of the spelling transformations.

JUNK = st.text(alphabet="qxz0123456789", min_size=1, max_size=4)
SEPARATORS = st.sampled_from(["/", "/", "/", "//", "///", "\\"])
FIRST_SEPARATORS = st.sampled_from(["/", "/", "//", "///"])
LETTERS = frozenset(string.ascii_letters)


def _escape(char: str, upper_hex: bool) -> str:
    code = f"{ord(char):02X}" if upper_hex else f"{ord(char):02x}"
    return "%" + code


@st.composite
def spellings(draw: st.DrawFn, base: str) -> str:
    """A random composition of the transformations: inserted `./` and `junk/../` segments, doubled
    slashes (or a backslash), a trailing slash, case flips and single or double percent-encoding
    of any character but the leading slash."""
    segments: list[str] = []
    real = base.strip("/").split("/")
    for index, segment in enumerate(real):
        for _ in range(draw(st.integers(0, 2))):
            if draw(st.booleans()):
                segments.append(".")
            else:
                segments.extend([draw(JUNK), ".."])
        segments.append(segment)
        if index == len(real) - 1 and draw(st.booleans()):
            segments.extend(["."] if draw(st.booleans()) else [draw(JUNK), ".."])
    text = draw(FIRST_SEPARATORS) + segments[0]
    for segment in segments[1:]:
        text += draw(SEPARATORS) + segment
    if draw(st.booleans()):
        text += draw(st.sampled_from(["/", "//"]))
    # One byte per character (one draw, shrinking towards "unchanged"): bit 0 flips the case,
    # bits 1-3 pick the encoding depth (0, 1 or 2 times), bit 7 the case of the hex digits.
    noise = draw(st.binary(min_size=len(text) - 1, max_size=len(text) - 1))
    out = text[0]
    for original, byte in zip(text[1:], noise, strict=True):
        char = original.swapcase() if byte & 1 and original in LETTERS else original
        depth = (0, 0, 0, 0, 0, 1, 1, 2)[(byte >> 1) & 7]
        if depth >= 1:
            char = _escape(char, upper_hex=bool(byte & 0x80))
        if depth == 2:
            char = "%25" + char[1:]
        out += char
    return out


@st.composite
def blocked_spellings(draw: st.DrawFn) -> str:
    """A random spelling of a random blocked route, sometimes with a query or fragment."""
    text = draw(spellings(draw(st.sampled_from(BLOCKED_BASES))))
    return text + draw(st.sampled_from(["", "", "?x=1", "#frag", "?a=/api/chat"]))


@settings(max_examples=1500)
@given(blocked_spellings(), st.sampled_from(METHODS), st.sampled_from((None, *OVERRIDES)))
def test_any_composition_of_spellings_of_a_blocked_route_is_403(
    spelling: str, method: str, override: str | None
) -> None:
    """For any blocked route and any composition of case flips, percent-encoding (single or
    double) of any character, duplicated slashes, `./` and `x/../` segments and a trailing slash,
    decide() answers 403, whatever the method and override header."""
    assert decide(method, spelling, override).status == 403


@settings(max_examples=800)
@given(st.sampled_from([p for p in SERVED if not p.startswith("/v1/models/")]).flatmap(spellings))
def test_any_non_canonical_spelling_of_a_served_path_is_400(spelling: str) -> None:
    """Any composition of the same transformations that changes a served path is 400 (ambiguous):
    only the canonical spelling is admitted."""
    assume(spelling not in SERVED)
    assert decide("POST", spelling).status == 400
    assert decide("GET", spelling).status == 400


PATH_CHARS = string.ascii_letters + string.digits + "/._-%~:;@!$&'()*+,=\\"
CANONICAL = set(SERVED)


@settings(max_examples=1500)
@given(st.text(alphabet=PATH_CHARS, max_size=40), st.sampled_from(["/", "/api/", "/v1/", "/v1/models/"]))
def test_random_paths_are_never_admitted_unless_canonical(tail: str, head: str) -> None:
    """A random path is refused (400, 403 or 404; 405 only on a canonical served path): 200 is
    given only to exact canonical spellings of the allowlist."""
    path = head + tail
    decision = decide("POST", path)
    get = decide("GET", path)
    canonical = path in CANONICAL or (
        path.startswith("/v1/models/")
        and "/" not in path[len("/v1/models/") :]
        and path[len("/v1/models/") :] not in ("", ".", "..")
        and all(c in string.ascii_letters + string.digits + "._:-" for c in path[len("/v1/models/") :])
    )
    if canonical:
        assert 200 in (decision.status, get.status)
    else:
        assert decision.status in (400, 403, 404), (path, decision)
        assert get.status in (400, 403, 404), (path, get)


@settings(max_examples=500)
@given(
    st.lists(
        st.text(alphabet=string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8), min_size=1
    )
    .filter(lambda segs: segs[0] not in ("api", "v1"))
    .map(lambda segs: "/" + "/".join(segs)),
    st.sampled_from(METHODS),
)
def test_plain_paths_outside_api_and_v1_are_404(path: str, method: str) -> None:
    """A plain path (no dots, encodings or doubled slashes) outside /api and /v1 is 404."""
    assert decide(method, path).status == 404
