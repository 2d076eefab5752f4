"""One proxied request from grant to usage event (docs/ARCHITECTURE.md#request-path).

Grant check, bounded body, the key's body policy, one reservation call (which also spends the
grant), the relay, then, after the response has ended, the usage event and the lease release.
Everything that depends on the API family (what the body means, how the answer is read) is the
family's adapter's (stream_proxy/apis): this module has no route switches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import attrs
import coredis
import orjson
from aiohttp import web
from yarl import URL

from shared import policy
from shared.config import ProxyConfig
from shared.grant import Grant, RateInfo
from shared.limits import TENANT_REFRESH_SECONDS, LimitScripts, NeedsHydration, Reserved, Scope, Spent
from shared.limits import Refused as LimitRefused
from shared.model_limits import canonical_model
from shared.models import EstimateReason, UsageEvent
from shared.periods import from_names
from shared.untrusted import printable
from stream_proxy import apis, body, grants, meter
from stream_proxy import policy as body_policy
from stream_proxy.backends import Backend, Backends, MergedListing, model_key
from stream_proxy.exceptions import GrantSpent, Refused
from stream_proxy.metrics import ProxyMetrics
from stream_proxy.models import ModelCatalog
from stream_proxy.prompt_bound import request_bound
from stream_proxy.relay import Relay, RelayResult
from stream_proxy.usage import UsageReporter

log = logging.getLogger("stream_proxy.proxy")
STORE_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)
UNAVAILABLE = {"Retry-After": "1"}
# Bodies larger than this are parsed off the event loop (a 64 KiB body parses in well under 1 ms).
OFF_LOOP_BYTES = 64 * 1024
T = TypeVar("T")


def _reset(seconds: float | None) -> str:
    return f"{max(0, math.ceil(seconds or 0))}s"


def ratelimit_headers(rate: RateInfo, reserved: int, family: policy.Family) -> dict[str, str]:
    """`x-ratelimit-*` as OpenAI names them, or `anthropic-ratelimit-*` on Anthropic routes, from
    the admission values in the grant."""
    if family == "anthropic":
        return anthropic_ratelimit_headers(rate, reserved, time.time())
    headers: dict[str, str] = {}
    if rate.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(rate.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(rate.remaining_requests or 0)
        headers["x-ratelimit-reset-requests"] = _reset(rate.reset_requests)
    if rate.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(rate.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, (rate.remaining_tokens or 0) - reserved))
        headers["x-ratelimit-reset-tokens"] = _reset(rate.reset_tokens)
    return headers


def _rfc3339(at: float) -> str:
    return dt.datetime.fromtimestamp(math.ceil(at), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_ratelimit_headers(rate: RateInfo, reserved: int, now: float) -> dict[str, str]:
    """`anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, resets as RFC 3339 times."""
    headers: dict[str, str] = {}
    if rate.limit_requests is not None:
        headers["anthropic-ratelimit-requests-limit"] = str(rate.limit_requests)
        headers["anthropic-ratelimit-requests-remaining"] = str(rate.remaining_requests or 0)
        headers["anthropic-ratelimit-requests-reset"] = _rfc3339(now + (rate.reset_requests or 0))
    if rate.limit_tokens is not None:
        headers["anthropic-ratelimit-tokens-limit"] = str(rate.limit_tokens)
        remaining = max(0, (rate.remaining_tokens or 0) - reserved)
        headers["anthropic-ratelimit-tokens-remaining"] = str(remaining)
        headers["anthropic-ratelimit-tokens-reset"] = _rfc3339(now + (rate.reset_tokens or 0))
    return headers


def scope_of(grant: Grant, model: str | None = None) -> Scope:
    """The limit scope a grant was admitted under; `model`: the canonical model the body names."""
    return Scope(
        tenant_id=grant.tenant_id,
        key_id=grant.key_id,
        key_limits=grant.key_limits,
        tenant_limits=grant.tenant_limits,
        periods=from_names(grant.periods or {"day": "1970-01-01", "month": "1970-01-01"}),
        rules=grant.model_rules,
        model=model,
    )


_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrency": "concurrent streams"}
_BUDGETS = {"budget_day": "daily", "budget_month": "monthly", "budget_total": "total"}


def model_refusal(outcome: LimitRefused, grant: Grant, family: policy.Family, now: float) -> Refused:
    """429 for a model rule, naming the pattern and the limit, with Retry-After and the rate-limit
    headers of the scope that refused (docs/ARCHITECTURE.md#model-limits)."""
    pattern, limit = outcome.model, outcome.limit or 0
    if outcome.reason in _BUDGETS:
        period = outcome.reason.removeprefix("budget_")
        ends = (grant.rollovers or {}).get(period)
        headers = {} if ends is None else {"Retry-After": str(max(1, math.ceil(ends - now)))}
        budget = _BUDGETS[outcome.reason]
        message = f"{outcome.scope} {budget} token budget of {limit} for model {pattern} exhausted"
        return Refused(429, message, code="insufficient_quota", headers=headers)
    wait = max(1, math.ceil(outcome.retry_after_ms / 1000))
    headers = {"Retry-After": str(wait)}
    if outcome.reason == "rpm":
        headers |= ratelimit_headers(
            RateInfo(limit_requests=limit, remaining_requests=0, reset_requests=wait), 0, family
        )
    elif outcome.reason == "tpm":
        left = max(0, limit - (outcome.used or 0))
        headers |= ratelimit_headers(
            RateInfo(limit_tokens=limit, remaining_tokens=left, reset_tokens=wait), 0, family
        )
    what = _WHAT.get(outcome.reason, outcome.reason)
    message = f"{outcome.scope} limit of {limit} {what} for model {pattern} reached"
    return Refused(429, message, code="rate_limit_exceeded", headers=headers)


# Routes whose body or path names the model a backend must have; listings merged across backends.
ROUTED: frozenset[policy.Route] = frozenset({*policy.METERED, "show", "openai_model"})
MERGED: frozenset[policy.Route] = frozenset({"tags", "ps", "openai_models"})


@attrs.define
class _Trip:
    """One request's backends: every one tried in order, those holding a place, the model's key."""

    key: str | None = None
    used: list[Backend] = attrs.Factory(list)
    counted: list[Backend] = attrs.Factory(list)
    retried: bool = False
    started: float | None = attrs.Factory(time.time)


@attrs.define
class Proxy:
    """Dependencies of the proxied path; `handle` is the catch-all handler."""

    config: ProxyConfig
    session: aiohttp.ClientSession
    catalog: ModelCatalog
    scripts: LimitScripts
    reporter: UsageReporter
    draining: asyncio.Event
    metrics: ProxyMetrics
    backends: Backends
    clock: Callable[[], float] = time.time
    _background: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)
    _registered: dict[int, float] = attrs.field(init=False, factory=dict)  # tenant → monotonic time
    _parser: concurrent.futures.ThreadPoolExecutor = attrs.field(
        init=False, factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parse")
    )

    @property
    def _lease_ms(self) -> int:
        return int(self.config.options.lease_ttl * 1000)

    async def _reserve(
        self, grant: Grant, route: policy.Route, doc: body.Body | None, model: str | None
    ) -> tuple[Reserved, int]:
        options = self.config.options
        metered = grant.metered and route in policy.METERED and doc is not None
        adapter = apis.adapter(route)
        bound = await self._prompt_bound(route, doc) if metered and doc is not None else 0
        try:
            outcome = await self.scripts.reserve(
                scope_of(grant, model),
                grant.request_id,
                metered=metered,
                prompt_bound=bound,
                requested_completion=adapter.requested_completion(route, doc.document) if doc else None,
                default_completion=options.default_completion_tokens,
                lease_ttl_ms=self._lease_ms,
                admitted_second=grant.admitted_second,
            )
        except STORE_ERRORS:
            raise Refused(503, "gateway state store unavailable", headers=UNAVAILABLE) from None
        if isinstance(outcome, Spent):
            raise GrantSpent
        if isinstance(outcome, NeedsHydration):
            raise Refused(503, "budget counters are being rebuilt", headers=UNAVAILABLE)
        if isinstance(outcome, LimitRefused):
            if outcome.model is not None:
                raise model_refusal(outcome, grant, policy.FAMILY[route], self.clock())
            if outcome.reason == "tpm":
                retry = str(max(1, math.ceil(outcome.retry_after_ms / 1000)))
                message = f"{outcome.scope} limit on tokens per minute reached"
                raise Refused(429, message, code="rate_limit_exceeded", headers={"Retry-After": retry})
            raise Refused(429, f"{outcome.scope} token budget exhausted", code="insufficient_quota")
        if metered:
            self._register(grant.tenant_id)
        return outcome, bound

    async def _prompt_bound(self, route: policy.Route, doc: body.Body) -> int:
        size = len(doc.raw)
        return await request_bound(
            route, doc.document, self.catalog, self.config.options, run=lambda work: self._work(size, work)
        )

    def _register(self, tenant_id: int) -> None:
        """List the tenant where the accountant's sweeper looks for reservations whose lease expired:
        at most every TENANT_REFRESH_SECONDS, sent while the request goes upstream."""
        last = self._registered.get(tenant_id)
        if last is not None and time.monotonic() - last < TENANT_REFRESH_SECONDS:
            return

        async def register() -> None:
            with contextlib.suppress(*STORE_ERRORS):
                await self.scripts.register_tenant(tenant_id)
                self._registered[tenant_id] = time.monotonic()

        self._spawn(register())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("background work failed", exc_info=error)

    async def finish(self) -> None:
        """Wait for the usage events and registrations still in flight (on shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._parser.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def _lease(self, grant: Grant) -> AsyncIterator[None]:
        """Renew the stream lease while the request lives."""
        if not grant.metered:
            yield
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.config.options.lease_ttl / 3)
                with contextlib.suppress(*STORE_ERRORS):
                    await self.scripts.lease(
                        scope_of(grant), grant.request_id, action="renew", ttl_ms=self._lease_ms
                    )

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Grant, body, policy, reservation, relay, usage.

        Once the grant is known good, every outcome is recorded once and releases the lease: a
        refusal here (body 400/413, model 403, draining 503, limits 429) charges nothing; after the
        reservation, `_relay` settles whatever happened.
        """
        decision = policy.decide(request.method, request.raw_path)
        if not decision.allowed or decision.route is None:
            raise Refused(decision.status, decision.message)
        route = decision.route
        secrets = (self.config.grant.current, self.config.grant.previous)
        unavailable = Refused(503, "gateway is not accepting requests right now", headers=UNAVAILABLE)
        # Draining is not closed: /readyz says 503 so Caddy stops sending, and whatever it still sends
        # until its next health check is served (docs/DEPLOYMENT.md). A full spool is closed.
        closed = self.reporter.full
        try:
            grant = grants.check(request, secrets=secrets, now=self.clock())
        except Refused:
            if closed:  # not accepting anything: say so, whatever the grant
                raise unavailable from None
            raise
        started = self.clock()
        doc: body.Body | None = None
        try:
            if closed:
                raise unavailable
            doc = await self._body(request, grant, route)
            in_path = apis.adapter(route).path_model(route, request.path)
            if in_path is not None:
                body_policy.check_model(grant, in_path)
            model = in_path or self._model(doc)
            await self._servable(route, model)
            reserved, bound = await self._reserve(grant, route, doc, self._model_key(route, doc))
        except GrantSpent:
            raise
        except Refused as refused:
            # Before the refusal is answered, so that the client's next request finds its slot free.
            await self._emit(
                grant, route, doc=doc, relay=None, reserved=None, started=started, status=refused.status
            )
            raise
        return await self._relay(
            request, grant, route, doc=doc, model=model, reserved=reserved, bound=bound, started=started
        )

    async def _body(self, request: web.Request, grant: Grant, route: policy.Route) -> body.Body | None:
        if request.method != "POST":
            return None
        cap = min(
            grant.max_body_bytes or self.config.options.max_body_bytes, self.config.options.max_body_bytes
        )
        if request.content_length is not None and request.content_length > cap:
            raise Refused(413, f"request body larger than {cap} bytes")
        # A body that trickles in must not outlive the admission's lease or the grant: the whole body
        # within the deadline (at most half the lease TTL), and the grant still valid once it is in.
        options = self.config.options
        deadline = min(options.body_timeout, options.lease_ttl / 2)
        raw = bytearray()
        try:
            async with asyncio.timeout(deadline):
                async for chunk in request.content.iter_any():
                    raw += chunk
                    if len(raw) > cap:
                        raise Refused(413, f"request body larger than {cap} bytes")
        except TimeoutError:
            raise Refused(408, f"request body not received within {deadline:g} s") from None
        except (web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError, ConnectionResetError):
            raise Refused(400, "request body could not be read (malformed or wrongly encoded)") from None
        if grant.expires_at <= self.clock():
            raise Refused(403, "request not authorised by the gateway: grant expired while the body was read")
        data = bytes(raw)

        def checked() -> body.Body:
            doc = body.Body.read(data)
            adapter = apis.adapter(route)
            adapter.refuse(route, doc.document)
            body_policy.check_body(
                grant,
                route,
                adapter.models(route, doc.document),
                doc,
                keep_alive_floor=self.config.options.keep_alive_floor,
            )
            return doc

        return await self._work(len(data), checked)

    async def _work(self, size: int, work: Callable[[], T]) -> T:
        """Run the body's parsing and walks; for a large body on the parsing thread, one body at a
        time, so that the event loop (every other stream of this process) waits at most one C call
        of it (a few ms), not the whole of it (up to seconds for 300,000 values)."""
        if size <= OFF_LOOP_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._parser, work)

    async def _relay(
        self,
        request: web.Request,
        grant: Grant,
        route: policy.Route,
        *,
        doc: body.Body | None,
        model: str | None,
        reserved: Reserved,
        bound: int,
        started: float,
    ) -> web.StreamResponse:
        adapter = apis.adapter(route)
        relay: Relay | MergedListing | None = None
        refused_status: int | None = None
        trip = _Trip()
        try:
            framing = apis.Framing(keep_text=grant.prompt_logging)
            if doc is not None and route in policy.METERED:
                if reserved.completion_limit is not None:
                    adapter.write_completion(route, doc, reserved.completion_limit)
                streaming = adapter.streams(route, doc.document)
                framing = adapter.prepare(route, doc, streaming=streaming, keep_text=grant.prompt_logging)
            framing = attrs.evolve(framing, text_limit=self.config.options.prompt_log_max_bytes)
            payload = doc.encoded() if doc is not None else None
            headers = ratelimit_headers(grant.rate, reserved.reserved, policy.FAMILY[route])
            async with self._lease(grant):
                if route in MERGED and len(self.backends.backends) > 1:
                    relay = MergedListing(
                        request=request,
                        session=self.session,
                        backends=self.backends.healthy(),
                        route=route,
                        timeout=self.config.options.first_byte_timeout,
                        max_buffered=self.config.options.max_upstream_body_bytes,
                        transform=self._listing_filter(grant, route),
                        headers=headers,
                    )
                    return await relay.run(payload)
                backend = await self._backend(grant, route, model, trip)
                relay = Relay(
                    request=request,
                    session=self.session,
                    ollama=backend.url,
                    reader=adapter.reader(route, framing),
                    first_byte_timeout=self.config.options.first_byte_timeout,
                    max_buffered=self.config.options.max_upstream_body_bytes,
                    completion_limit=reserved.completion_limit,
                    transform=self._listing_filter(grant, route),
                    headers=headers,
                    retry=functools.partial(self._retry, grant, trip),
                )
                try:
                    return await relay.run(payload)
                except Refused as refused:
                    relay.result.status = refused.status
                    raise
                finally:
                    self._observe_backend(trip, relay.result)
        except Refused as refused:
            refused_status = refused.status
            raise
        finally:
            for backend in trip.counted:
                self.backends.release(backend)
            # After the response has ended, off the request's path: a keep-alive client's next
            # request on this connection is not held behind the usage round trip.
            self._spawn(
                self._emit(
                    grant,
                    route,
                    doc=doc,
                    relay=relay,
                    reserved=reserved,
                    started=started,
                    bound=bound,
                    status=refused_status if relay is None else None,
                )
            )

    async def _servable(self, route: policy.Route, model: str | None) -> None:
        """Refuse, before anything is reserved, what no backend can serve: 503 when none is in
        rotation, 404 (as Ollama answers) when none has the model. One backend alone is asked
        whatever its catalogue says: its own answer is Ollama's."""
        backends = self.backends
        if len(backends.backends) == 1:
            return
        if not backends.healthy():
            raise Refused(503, "no model server is available", headers={"Retry-After": "5"})
        if route not in ROUTED or model is None:
            return
        key = model_key(model)
        if key is not None and not backends.candidates(key):
            await backends.refresh_on_miss()
        if key is None or not backends.candidates(key):
            raise Refused(404, f'model "{printable(model, 200)}" not found, try pulling it first')

    async def _backend(self, grant: Grant, route: policy.Route, model: str | None, trip: _Trip) -> Backend:
        """The backend for this request (`model`: the one its body or path names). A generating or
        embedding request holds a place there (waiting for one, up to the first-byte timeout, when
        every backend with the model is full)."""
        backends = self.backends
        trip.key = model_key(model) if model is not None and route in ROUTED else None
        if trip.key is None or not backends.candidates(trip.key):
            # Not a model's route, or one backend alone (its own answer is Ollama's): the first in rotation.
            chosen = next(iter(backends.healthy()), backends.backends[0])
        elif route in policy.METERED:
            wait = self.config.options.first_byte_timeout
            found = await backends.acquire(trip.key, grant.key_id, wait=wait)
            if found is None:
                raise Refused(503, "every model server with this model is busy", headers={"Retry-After": "5"})
            chosen = found
            trip.counted.append(chosen)
        else:
            chosen = backends.pick(trip.key) or backends.backends[0]  # a candidate exists: never the fallback
        trip.used.append(chosen)
        self.metrics.backend_requests.labels(chosen.name).inc()
        return chosen

    async def _retry(self, grant: Grant, trip: _Trip, kind: str) -> URL | None:
        """Once per request: another backend with the model, after this one refused the connection
        or failed with a 5xx before the first byte."""
        failed = trip.used[-1]
        self.metrics.backend_errors.labels(failed.name, kind).inc()
        if trip.retried or trip.key is None:
            return None
        trip.retried = True
        if failed in trip.counted:
            wait = self.config.options.first_byte_timeout
            other = await self.backends.acquire(trip.key, grant.key_id, wait=wait, exclude=trip.used)
            if other is None:
                return None
            trip.counted.remove(failed)
            self.backends.release(failed)
            trip.counted.append(other)
        else:
            other = self.backends.pick(trip.key, exclude=trip.used)
            if other is None:
                return None
        log.warning("retrying on another backend", extra={"backend": other.name, "failed": failed.name})
        trip.used.append(other)
        self.metrics.backend_requests.labels(other.name).inc()
        return other.url

    def _observe_backend(self, trip: _Trip, result: RelayResult) -> None:
        if not trip.used:
            return
        backend = trip.used[-1].name
        if result.first_byte_at is not None and trip.started is not None:
            waited = max(0.0, result.first_byte_at - trip.started)
            self.metrics.backend_first_byte.labels(backend).observe(waited)
        if result.upstream_failed and not result.client_disconnected:
            self.metrics.backend_errors.labels(backend, "broken").inc()

    def _listing_filter(self, grant: Grant, route: policy.Route) -> Callable[[bytes], bytes] | None:
        listing = apis.adapter(route).listing(route)
        filtering = grant.allowed_models is not None
        if listing is None or not (filtering or route in body_policy.PRIVATE_LISTING_FIELDS):
            return None

        def transform(data: bytes) -> bytes:
            document = meter.loads(data)
            if document is None:
                return data
            if filtering:
                document = body_policy.filter_listing(grant, listing, document)
            filtered = orjson.dumps(body_policy.strip_private(route, listing, document))
            return filtered + (b"\n" if data.endswith(b"\n") else b"")

        return transform

    async def _emit(
        self,
        grant: Grant,
        route: policy.Route,
        *,
        doc: body.Body | None,
        relay: Relay | MergedListing | None,
        reserved: Reserved | None,
        started: float,
        status: int | None = None,
        bound: int = 0,
    ) -> None:
        """The usage event, then the lease release (both after the response has ended).

        Without Ollama's own counts the charge is never below what Ollama can have done: the prompt
        bound that was reserved plus every output piece received (client gone, upstream failure, a
        cut stream), or the whole reservation when nothing at all came back (/api/embeddings).
        """
        result = relay.result if relay is not None else None
        count = result.count if result is not None else meter.Count()
        metered = route in policy.METERED and doc is not None
        reason: EstimateReason | None = None
        prompt, completion = count.prompt_tokens, count.completion_tokens
        if (
            metered
            and result is not None
            and not result.upstream_unreached
            and (prompt is None or completion is None)
        ):
            upstream = result.upstream_status
            if result.client_disconnected:
                reason = "client_disconnected"
            elif result.cut_at_limit:
                reason = "cut_at_limit"
            elif result.upstream_failed or count.error or ((upstream or 0) >= 500 and upstream != 503):
                reason = "upstream_failed"  # 503 is Ollama's full queue: nothing was done
            elif upstream == 200:
                reason = "no_upstream_count"
            if reason is not None:
                prompt = bound if prompt is None else prompt
                if completion is None:
                    completion = count.content_chunks
                    if reason == "no_upstream_count" and not completion and reserved is not None:
                        completion = max(0, reserved.reserved - prompt)
        event = UsageEvent(
            request_id=grant.request_id,
            tenant_id=grant.tenant_id,
            key_id=grant.key_id,
            key_prefix=grant.key_prefix,
            endpoint=grant.path,
            model=self._model(doc),
            prompt_tokens=prompt or 0,
            completion_tokens=completion or 0,
            reserved_tokens=reserved.reserved if reserved else 0,
            estimated=reason is not None,
            estimate_reason=reason,
            http_status=status if status is not None else (result.status if result else 0),
            upstream_status=result.upstream_status if result else None,
            started_at=started,
            first_byte_at=result.first_byte_at if result else None,
            finished_at=self.clock(),
            bytes_relayed=result.bytes_relayed if result else 0,
            client_disconnected=result.client_disconnected if result else False,
            method=grant.method,
            client_addr=grant.client_addr,
            request_text=self._logged_request(doc) if grant.prompt_logging and doc else None,
            response_text="".join(result.response_text) if grant.prompt_logging and result else None,
            prompt_log_ttl_seconds=grant.prompt_log_ttl_seconds if grant.prompt_logging else None,
            metered=metered,
            periods=grant.periods,
            model_key=self._model_key(route, doc) if metered else None,
        )
        settle_now = grant.metered and reserved is not None and event.metered
        # With the event on the stream, settle in the same round trip so the next request sees the
        # actual usage; the accountant's own settle is then a no-op (same request id).
        written = await self.reporter.report(
            event,
            then=(
                lambda pipe: self.scripts.settle_in(
                    pipe,
                    scope_of(grant, event.model_key),
                    grant.request_id,
                    event.total_tokens,
                    ledgered=False,
                )
            )
            if settle_now
            else None,
        )
        if grant.metered and not (settle_now and written):
            with contextlib.suppress(*STORE_ERRORS):
                await self.scripts.lease(
                    scope_of(grant), grant.request_id, action="release", ttl_ms=self._lease_ms
                )
        self._observe(route, event)
        log.info(
            "request",
            extra={
                "request_id": grant.request_id,
                "tenant_id": grant.tenant_id,
                "key_prefix": grant.key_prefix,
                "route": route,
                "status": event.http_status,
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "estimated": event.estimate_reason,
                "latency_ms": round((event.finished_at - started) * 1000, 1),
            },
        )

    def _observe(self, route: policy.Route, event: UsageEvent) -> None:
        m = self.metrics
        m.requests.labels(route, f"{event.http_status // 100}xx").inc()
        m.duration.labels(route).observe(max(0.0, event.finished_at - event.started_at))
        if event.first_byte_at is not None:
            m.first_byte.labels(route).observe(max(0.0, event.first_byte_at - event.started_at))
        m.tokens.labels(route, "prompt").inc(event.prompt_tokens)
        m.tokens.labels(route, "completion").inc(event.completion_tokens)
        if event.client_disconnected:
            m.disconnects.labels(route).inc()
        if event.estimate_reason == "upstream_failed" or (event.upstream_status or 0) >= 500:
            m.upstream_errors.labels(route).inc()

    def _logged_request(self, doc: body.Body) -> str:
        """The request body for the prompt log: at most GATEWAY_PROMPT_LOG_MAX_BYTES, never half a
        character (the body parsed as JSON, so it is UTF-8)."""
        return doc.raw[: self.config.options.prompt_log_max_bytes].decode("utf-8", "ignore")

    @staticmethod
    def _model_key(route: policy.Route, doc: body.Body | None) -> str | None:
        """The canonical model a metered body names (the one its model rules are decided on)."""
        if doc is None or route not in policy.METERED:
            return None
        return canonical_model(body.get(doc.document, "model"))

    @staticmethod
    def _model(doc: body.Body | None) -> str | None:
        if doc is None:
            return None
        model = body.get(doc.document, "model")
        if not model:  # /api/show's deprecated `name`
            model = body.get(doc.document, "name")
        # Printable: a lone surrogate escape (which Go accepts) would make the event unencodable.
        return printable(model, 200) if isinstance(model, str) else None
