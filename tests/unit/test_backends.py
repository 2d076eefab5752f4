"""Several Ollama backends: `GATEWAY_OLLAMA_URLS` as written, which backend a request goes to, the
wait for room, and the merged listings. The expected choices are written from the rules in
docs/ARCHITECTURE.md#backends, not computed with the code under test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from shared.backend_spec import BackendSpec, BackendSpecError, parse_backends
from stream_proxy.backends import Backend, Backends, merge_listing

LLAMA = "registry.ollama.ai/library/llama3.2:latest"
QWEN = "registry.ollama.ai/library/qwen3:8b"


# --- GATEWAY_OLLAMA_URLS ---------------------------------------------------------------------


def test_a_list_of_backends_is_read_with_names_weights_and_max_parallel() -> None:
    specs = parse_backends(
        "gpu1=http://10.0.0.11:11434;weight=2;max_parallel=4, http://10.0.0.12:11434 ,"
        "gpu-3=https://ollama.internal/;max_parallel=1"
    )
    assert specs == [
        BackendSpec("gpu1", URL("http://10.0.0.11:11434"), weight=2.0, max_parallel=4),
        BackendSpec("ollama-2", URL("http://10.0.0.12:11434"), weight=1.0, max_parallel=None),
        BackendSpec("gpu-3", URL("https://ollama.internal"), weight=1.0, max_parallel=1),
    ]
    assert [s.capacity for s in specs] == [8.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "no backend given"),
        (" , ,", "no backend given"),
        ("ftp://user:hunter2@host", "must be http(s)://host"),
        ("http://user:hunter2@host/api", "no path, query or fragment"),
        ("http://user:hunter2@host?x=1", "no path, query or fragment"),
        ("http://host;weight=0", "weight must be above 0"),
        ("http://host;weight=nan", "weight must be above 0"),
        ("http://host;weight=lots", "weight must be a number"),
        ("http://host;max_parallel=1.5", "max_parallel must be a whole number"),
        ("http://host;max_parallel=-2", "max_parallel must be above 0"),
        ("http://host;colour=red", "unknown option 'colour'"),
        ("GPU=http://host", "a name is 1-32"),
        ("-x=http://host", "a name is 1-32"),
        ("a=http://h1,a=http://h2", "names must differ"),
        (",".join(f"http://h{i}" for i in range(65)), "at most 64 backends"),
    ],
)
def test_a_wrong_backend_list_says_what_is_wrong_and_never_shows_the_url(text: str, says: str) -> None:
    with pytest.raises(BackendSpecError) as raised:
        parse_backends(text)
    assert says in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert "host" not in str(raised.value).replace("http(s)://host", "")


# --- the choice --------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def pool(session: aiohttp.ClientSession, *specs: tuple[str, int | None, float]) -> Backends:
    """Backends named and sized as given, all healthy, all with llama3.2 (same digest), none loaded."""
    backends = Backends(
        session,
        [
            BackendSpec(name, URL(f"http://{name}:11434"), weight, parallel)
            for name, parallel, weight in specs
        ],
        interval=5.0,
        timeout=1.0,
    )
    for backend in backends.backends:
        backend.healthy = True
        backend.models = {LLAMA: "d-llama"}
    return backends


def named(backends: Backends, name: str) -> Backend:
    return next(b for b in backends.backends if b.name == name)


async def test_only_healthy_backends_with_the_models_first_digest_are_candidates(
    session: aiohttp.ClientSession,
) -> None:
    """The digest a name stands for is the first healthy backend's (configuration order): a
    backend with another model under the same name is never chosen for it."""
    backends = pool(session, ("a", None, 1), ("b", None, 1), ("c", None, 1), ("d", None, 1))
    named(backends, "a").healthy = False
    named(backends, "a").models = {LLAMA: "d-old"}
    named(backends, "b").models = {LLAMA: "d-llama", QWEN: "d-qwen"}
    named(backends, "c").models = {LLAMA: "d-other"}
    named(backends, "d").models = {}
    assert [b.name for b in backends.candidates(LLAMA)] == ["b"]
    assert [b.name for b in backends.candidates(QWEN)] == ["b"]
    named(backends, "a").healthy = True  # back: its digest is now the name's
    assert [b.name for b in backends.candidates(LLAMA)] == ["a"]
    assert backends.choose("registry.ollama.ai/library/nothing:latest", key_id=1) is None


async def test_room_then_loaded_then_the_keys_last_backend_then_the_least_load(
    session: aiohttp.ClientSession,
) -> None:
    backends = pool(session, ("a", 2, 1.0), ("b", 4, 1.0), ("c", 2, 2.0))
    a, b, c = (named(backends, n) for n in "abc")
    # Nothing loaded, nothing in flight: the least load ties, configuration order decides.
    assert backends.choose(LLAMA, key_id=1) is a
    # Load per capacity (max_parallel times weight): a 1/2, b 1/4, c 1/4 -> b (before c by order).
    a.in_flight, b.in_flight, c.in_flight = 1, 1, 1
    assert backends.choose(LLAMA, key_id=1) is b
    b.in_flight = 2  # b 2/4 = 0.5, c 1/4
    assert backends.choose(LLAMA, key_id=1) is c
    # Loaded beats load.
    a.loaded = frozenset({LLAMA})
    assert backends.choose(LLAMA, key_id=1) is a
    # ... but not room: a full backend is never chosen while another has room.
    a.in_flight = 2
    assert backends.choose(LLAMA, key_id=1) is c
    # Among the loaded ones, the key's previous backend first.
    a.in_flight, b.loaded, c.loaded = 0, frozenset({LLAMA}), frozenset({LLAMA})
    b.in_flight = 3
    chosen = await backends.acquire(LLAMA, key_id=7, wait=0)
    assert chosen is a  # least loaded among the loaded
    backends.release(a)
    c.in_flight = 0
    a.in_flight = 1
    assert backends.choose(LLAMA, key_id=8) is c  # key 8 has no history: least load
    assert backends.choose(LLAMA, key_id=7) is a  # key 7 was on a, which still has room
    # Every one full: no choice.
    a.in_flight, b.in_flight, c.in_flight = 2, 4, 2
    assert backends.choose(LLAMA, key_id=7) is None
    assert await backends.acquire(LLAMA, key_id=7, wait=0) is None


async def test_a_request_waits_for_room_in_arrival_order_and_gives_up_at_its_deadline(
    session: aiohttp.ClientSession,
) -> None:
    backends = pool(session, ("a", 1, 1.0))
    first = await backends.acquire(LLAMA, key_id=1, wait=0)
    assert first is not None
    order: list[int] = []

    async def waiting(n: int) -> None:
        got = await backends.acquire(LLAMA, key_id=n, wait=5)
        assert got is not None
        order.append(n)
        await asyncio.sleep(0.01)
        backends.release(got)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiting(n)))
        await asyncio.sleep(0.005)
    assert await backends.acquire(LLAMA, key_id=99, wait=0.05) is None  # full until released
    backends.release(first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert named(backends, "a").in_flight == 0


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(1, 40),
    st.integers(0, 2**32),
)
def test_concurrent_requests_never_exceed_any_backends_max_parallel(
    parallel: list[int], requests: int, seed: int
) -> None:
    """However many requests arrive at once and however long each holds its backend, no backend
    ever has more in flight than its max_parallel, and every request is served."""

    async def scenario() -> None:
        async with aiohttp.ClientSession() as client:
            backends = pool(client, *((f"b{i}", p, 1.0) for i, p in enumerate(parallel)))
            peak = {b.name: 0 for b in backends.backends}
            served = 0

            async def one(n: int) -> None:
                nonlocal served
                got = await backends.acquire(LLAMA, key_id=n % 3, wait=30)
                assert got is not None
                for backend in backends.backends:
                    peak[backend.name] = max(peak[backend.name], backend.in_flight)
                await asyncio.sleep(((seed >> (n % 30)) & 3) * 0.001)
                backends.release(got)
                served += 1

            await asyncio.gather(*(one(n) for n in range(requests)))
            assert served == requests
            assert all(peak[f"b{i}"] <= p for i, p in enumerate(parallel)), (peak, parallel)
            assert all(b.in_flight == 0 for b in backends.backends)

    asyncio.run(scenario())


# --- listings --------------------------------------------------------------------------------


def test_listings_are_the_union_in_configuration_order_each_model_once() -> None:
    a = {"models": [{"model": "llama3.2:latest", "digest": "1"}, {"model": "qwen3:8b", "digest": "2"}]}
    b = {"models": [{"model": "LLAMA3.2", "digest": "1"}, {"model": "all-minilm:latest", "digest": "3"}]}
    assert merge_listing("tags", [a, b]) == {
        "models": [
            {"model": "llama3.2:latest", "digest": "1"},
            {"model": "qwen3:8b", "digest": "2"},
            {"model": "all-minilm:latest", "digest": "3"},
        ]
    }
    openai_a = {"object": "list", "data": [{"id": "llama3.2:latest", "object": "model"}]}
    openai_b = {"object": "list", "data": [{"id": "llama3.2:latest"}, {"id": "qwen3:8b", "object": "model"}]}
    assert merge_listing("openai_models", [openai_a, openai_b]) == {
        "object": "list",
        "data": [{"id": "llama3.2:latest", "object": "model"}, {"id": "qwen3:8b", "object": "model"}],
    }
    assert merge_listing("ps", [{"models": None}, {"nothing": 1}, "junk"]) == {"models": []}
