"""Every string a client controls that reaches a usage event keeps the event encodable: a model
name with a lone surrogate escape (valid JSON, which Go accepts) once made the event fail to encode,
and the request's usage was never written."""

from __future__ import annotations

import time

import orjson

from shared import usage_wire
from shared.models import UsageEvent
from stream_proxy import body
from stream_proxy.proxy import Proxy


def test_a_model_name_with_a_lone_surrogate_escape_still_makes_an_encodable_event() -> None:
    raw = b'{"model":"llama3.2\\ud800","messages":[]}'
    doc = body.Body(body.parse(raw), raw)
    model = Proxy._model(doc)
    assert model == "llama3.2\\ud800"  # escaped, not the surrogates themselves
    now = time.time()
    event = UsageEvent(
        request_id="r",
        tenant_id=1,
        key_id=1,
        key_prefix="ABCDEFGH",
        endpoint="/api/chat",
        model=model,
        prompt_tokens=0,
        completion_tokens=0,
        reserved_tokens=0,
        estimated=False,
        estimate_reason=None,
        http_status=404,
        upstream_status=None,
        started_at=now,
        first_byte_at=None,
        finished_at=now,
        bytes_relayed=0,
        client_disconnected=False,
    )
    fields = usage_wire.encode(event)
    assert orjson.loads(fields[usage_wire.FIELD])["model"] == model
    assert usage_wire.decode(fields).model == model
