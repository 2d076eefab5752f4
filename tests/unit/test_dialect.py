"""Error bodies in the caller's dialect: Ollama `{"error": "…"}` under /api and everything not /v1,
OpenAI `{"error": {"message", "type", "param", "code"}}` plus a newline under /v1, Anthropic
`{"type":"error","error":{"type","message"}}` under /v1/messages (docs/OLLAMA.md#error-bodies)."""

from __future__ import annotations

import json

import pytest

from shared.dialect import dialect_of, error_body, error_response

STATUSES = (400, 401, 403, 404, 405, 413, 429, 503)
# The OpenAI error type each gateway status is answered with.
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "api_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "api_error",
}
OLLAMA_CONTENT_TYPE = "application/json; charset=utf-8"
OPENAI_CONTENT_TYPE = "application/json"


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/models/llama3.2", "openai"),
        ("/v1/models?x=1", "openai"),
        ("/v1/", "openai"),
        ("/v1", "openai"),
        ("/api/chat", "ollama"),
        ("/api/pull", "ollama"),
        ("/", "ollama"),
        ("/healthz", "ollama"),
        ("/v1x/chat", "ollama"),
        ("/v10/chat", "ollama"),
        ("/foo/v1/chat", "ollama"),
        ("/api/v1/chat", "ollama"),
        ("/v1/messages", "anthropic"),
        ("/v1/messages?beta=true", "anthropic"),
        ("/v1/messages/count_tokens", "anthropic"),
        ("/v1/messages/batches", "anthropic"),
        ("/v1/messagesx", "openai"),
        ("/v1/responses", "openai"),
    ],
)
def test_dialect_of_path(path: str, dialect: str) -> None:
    """Anthropic for /v1/messages and below; OpenAI for the rest of /v1; Ollama for the rest."""
    assert dialect_of(path) == dialect


@pytest.mark.parametrize("status", STATUSES)
def test_ollama_body_is_exactly_error_string(status: int) -> None:
    """Ollama errors are `{"error":"<message>"}`, compact, no trailing newline, for every status,
    and a code does not change them."""
    assert error_body("ollama", status, "not found") == b'{"error":"not found"}'
    assert error_body("ollama", status, "quota", code="insufficient_quota") == b'{"error":"quota"}'


@pytest.mark.parametrize("status", STATUSES)
def test_openai_body_is_exact_with_type_per_status(status: int) -> None:
    """OpenAI errors are `{"error":{"message","type","param","code"}}` + newline, in that key
    order, with param null, code null unless given, and the type for the status."""
    expected = (
        '{"error":{"message":"nope","type":"' + OPENAI_TYPES[status] + '","param":null,"code":null}}\n'
    ).encode()
    assert error_body("openai", status, "nope") == expected


@pytest.mark.parametrize("status", STATUSES)
def test_openai_code_is_carried(status: int) -> None:
    """A code (invalid_api_key, rate_limit_exceeded, …) is written as given; the type still follows
    the status."""
    body = json.loads(error_body("openai", status, "m", code="invalid_api_key"))
    assert body == {
        "error": {"message": "m", "type": OPENAI_TYPES[status], "param": None, "code": "invalid_api_key"}
    }


def test_insufficient_quota_maps_type_and_code() -> None:
    """A budget denial (429, code insufficient_quota) has type and code `insufficient_quota`, as
    OpenAI answers it; a rate denial (rate_limit_exceeded) keeps type rate_limit_error."""
    assert error_body("openai", 429, "budget exhausted", code="insufficient_quota") == (
        b'{"error":{"message":"budget exhausted","type":"insufficient_quota","param":null,'
        b'"code":"insufficient_quota"}}\n'
    )
    assert error_body("openai", 429, "slow down", code="rate_limit_exceeded") == (
        b'{"error":{"message":"slow down","type":"rate_limit_error","param":null,'
        b'"code":"rate_limit_exceeded"}}\n'
    )


def test_messages_are_json_escaped() -> None:
    """Quotes, backslashes, control characters and non-ASCII text in a message stay valid JSON and
    round-trip exactly in both dialects."""
    message = 'model "a\\b"\n\tnot found: \u00fcber \u2603'
    assert json.loads(error_body("ollama", 404, message)) == {"error": message}
    assert json.loads(error_body("openai", 404, message))["error"]["message"] == message


@pytest.mark.parametrize("status", STATUSES)
def test_error_response_under_api_is_ollama(status: int) -> None:
    """error_response for an /api path: the status, the Ollama body and Ollama's content type
    (gin's `application/json; charset=utf-8`)."""
    response = error_response("/api/chat", status, "denied", code="whatever")
    assert response.status == status
    assert response.body == b'{"error":"denied"}'
    assert response.headers["Content-Type"] == OLLAMA_CONTENT_TYPE


@pytest.mark.parametrize("status", STATUSES)
def test_error_response_under_v1_is_openai(status: int) -> None:
    """error_response for a /v1 path: the status, the OpenAI body with its newline and
    `application/json` (as Ollama's OpenAI writer sends it)."""
    response = error_response("/v1/chat/completions", status, "denied")
    assert response.status == status
    assert response.body == (
        b'{"error":{"message":"denied","type":"'
        + OPENAI_TYPES[status].encode()
        + b'","param":null,"code":null}}\n'
    )
    assert response.headers["Content-Type"] == OPENAI_CONTENT_TYPE


@pytest.mark.parametrize("path", ["/", "/foo", "/API/chat", "/V1/chat/completions"])
def test_error_response_outside_api_and_v1_is_ollama(path: str) -> None:
    """Paths outside /v1 (case matters: /V1 is not /v1) are answered in the Ollama dialect."""
    response = error_response(path, 404, "not found")
    assert response.body == b'{"error":"not found"}'
    assert response.headers["Content-Type"] == OLLAMA_CONTENT_TYPE


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (401, {"WWW-Authenticate": 'Bearer realm="neuronetz-gateway"'}),
        (405, {"Allow": "GET, HEAD"}),
        (429, {"Retry-After": "17"}),
        (503, {"Retry-After": "1"}),
    ],
)
def test_error_response_carries_extra_headers(status: int, headers: dict[str, str]) -> None:
    """Extra headers (WWW-Authenticate, Allow, Retry-After) are sent in both dialects beside the
    content type, unchanged."""
    for path in ("/api/chat", "/v1/chat/completions"):
        response = error_response(path, status, "m", headers=headers)
        for name, value in headers.items():
            assert response.headers[name] == value
        assert response.headers["Content-Type"] in (OLLAMA_CONTENT_TYPE, OPENAI_CONTENT_TYPE)


def test_error_response_content_type_cannot_be_lost_to_extra_headers() -> None:
    """Passing no extra headers, or an empty mapping, leaves exactly the content type."""
    empty: dict[str, str] = {}
    for headers in (None, empty):
        response = error_response("/api/chat", 400, "m", headers=headers)
        assert set(response.headers) == {"Content-Type"}


# The Anthropic error type each gateway status is answered with (the SDK raises by status).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


@pytest.mark.parametrize("status", STATUSES)
def test_anthropic_body_shape(status: int) -> None:
    """Anthropic errors are `{"type":"error","error":{"type","message"}}`, compact, no newline;
    a budget refusal stays a rate_limit_error (Anthropic has no insufficient_quota)."""
    expected = (
        '{"type":"error","error":{"type":"' + ANTHROPIC_TYPES[status] + '","message":"nope"}}'
    ).encode()
    assert error_body("anthropic", status, "nope") == expected
    assert error_body("anthropic", status, "nope", code="insufficient_quota") == expected


def test_anthropic_body_carries_the_request_id() -> None:
    """The gateway's request id is the Anthropic `request_id` (only in that dialect)."""
    body = json.loads(error_body("anthropic", 500, "boom", request_id="abc-123"))
    assert body == {
        "type": "error",
        "error": {"type": "api_error", "message": "boom"},
        "request_id": "abc-123",
    }
    assert "request_id" not in json.loads(error_body("openai", 500, "boom", request_id="abc-123"))


def test_anthropic_response_content_type() -> None:
    """error_response under /v1/messages: Anthropic body, application/json without charset."""
    response = error_response("/v1/messages", 401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    assert response.status == 401
    assert response.content_type == "application/json"
    assert response.charset is None
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert isinstance(response.body, bytes)
    assert json.loads(response.body)["error"]["type"] == "authentication_error"
