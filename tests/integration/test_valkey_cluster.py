"""A 3-primary Valkey Cluster formed from Python (scripts/valkey_cluster.py), and the real limit
scripts (shared/limits.py) on a coredis RedisCluster client: every node healthy and agreeing on the
slot map, tenant hash tags spread over different primaries with all of one tenant's keys in one
slot, reserve/settle for tenants on different primaries through one client, and one client riding
out a killed and restarted primary."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import coredis
import pytest

from shared.limits import LimitScripts, NeedsHydration, Reserved, Scope
from shared.models import Limits
from shared.periods import Periods
from shared.redis_keys import RedisKeys
from valkey_cluster import (
    ClusterError,
    ValkeyCluster,
    command,
    connect,
    parse_cluster_url,
    slot_ranges,
)

pytestmark = pytest.mark.integration

PREFIX = "nz:"
PERIODS = Periods(day=dt.date(2026, 1, 31), month=dt.date(2026, 1, 1))
LEASE_MS = 60_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """One cluster for the module (about 2 s to form)."""
    valkey = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    try:
        yield valkey
    finally:
        valkey.stop()


def keyslot(cluster: ValkeyCluster, key: str) -> int:
    """The slot the server computes for a key."""
    return int(command(cluster.ports[0], "CLUSTER", "KEYSLOT", key))


def owner(cluster: ValkeyCluster, key: str) -> int:
    """Index of the node serving a key's slot."""
    slot = keyslot(cluster, key)
    return next(
        i for i in range(cluster.primaries) if cluster.slot_range(i)[0] <= slot <= cluster.slot_range(i)[1]
    )


def tenants_on_distinct_nodes(cluster: ValkeyCluster, keys: RedisKeys) -> dict[int, int]:
    """node index -> the smallest tenant id whose hash tag lives on that node."""
    found: dict[int, int] = {}
    tenant = 1
    while len(found) < cluster.primaries:
        found.setdefault(owner(cluster, keys.tag(tenant)), tenant)
        tenant += 1
    return found


def scope(tenant_id: int) -> Scope:
    """A key and its tenant with a TPM limit and a daily budget, so reserve charges counters."""
    return Scope(
        tenant_id=tenant_id,
        key_id=tenant_id * 10,
        key_limits=Limits(),
        tenant_limits=Limits(tpm=10_000, daily_tokens=1_000),
        periods=PERIODS,
    )


@contextlib.asynccontextmanager
async def scripts_on(
    cluster: ValkeyCluster,
) -> AsyncIterator[tuple[coredis.RedisCluster[bytes], LimitScripts]]:
    """A RedisCluster client (entered in the calling task, as coredis requires) and LimitScripts on it."""
    async with connect(cluster.url) as client:
        # LimitScripts is annotated coredis.Redis[bytes]; at run time it only needs register_script,
        # pipeline and keyed commands, which RedisCluster has (see the scale-out notes).
        yield client, LimitScripts(cast("coredis.Redis[bytes]", client), RedisKeys(PREFIX))


async def reserve(scripts: LimitScripts, who: Scope, request_id: str) -> Reserved | NeedsHydration:
    """Reserve 100 prompt + 50 completion tokens; returns NeedsHydration untouched."""
    outcome = await scripts.reserve(
        who,
        request_id,
        metered=True,
        prompt_bound=100,
        requested_completion=50,
        default_completion=None,
        lease_ttl_ms=LEASE_MS,
    )
    assert isinstance(outcome, Reserved | NeedsHydration), outcome
    return outcome


async def hydrated_reserve(
    client: coredis.RedisCluster[bytes], scripts: LimitScripts, who: Scope, request_id: str
) -> Reserved:
    """Reserve; when budget counters are missing, set them to 0 (as BudgetHydrator would) and retry."""
    outcome = await reserve(scripts, who, request_id)
    if isinstance(outcome, NeedsHydration):
        for whom, period, _ in outcome.missing:
            await client.set(scripts.budget_key(who, whom, period), "0", condition=coredis.PureToken.NX)
        outcome = await reserve(scripts, who, request_id)
    assert isinstance(outcome, Reserved), outcome
    return outcome


async def counter(client: coredis.RedisCluster[bytes], key: str) -> int | None:
    """An integer key's value (None: missing)."""
    raw = await client.get(key)
    return None if raw is None else int(raw)


# --- the cluster itself --------------------------------------------------------------------------


def test_every_node_is_ok_knows_every_node_and_agrees_on_the_slot_map(cluster: ValkeyCluster) -> None:
    """cluster_state:ok on all three nodes, three known nodes, 16384 slots, one slot map."""
    maps = []
    for port in cluster.ports:
        info = command(port, "CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info
        assert "cluster_known_nodes:3" in info
        assert "cluster_slots_ok:16384" in info
        maps.append(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in command(port, "CLUSTER", "SLOTS")))
    assert maps[0] == maps[1] == maps[2]
    assert [(first, last) for first, last, _ in maps[0]] == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert [port for _, _, port in maps[0]] == cluster.ports
    assert slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert len(set(cluster.pids)) == 3
    assert cluster.startup_nodes == [("127.0.0.1", port) for port in cluster.ports]
    assert parse_cluster_url(cluster.url) == cluster.startup_nodes
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)


def test_hash_tags_spread_tenants_over_primaries_and_keep_one_tenant_in_one_slot(
    cluster: ValkeyCluster,
) -> None:
    """Tenants 1.. cover all three primaries; every key one script touches for a tenant has the
    tenant's slot; the process-wide keys are not pinned to any tenant slot."""
    keys = RedisKeys(PREFIX)
    tenants = tenants_on_distinct_nodes(cluster, keys)
    assert sorted(tenants) == [0, 1, 2]
    slots = {keyslot(cluster, keys.tag(t)) for t in tenants.values()}
    assert len(slots) == 3
    for tenant in tenants.values():
        who = scope(tenant)
        tenant_keys = [
            keys.rpm(tenant, who.key_scope),
            keys.tpm(tenant, "t"),
            keys.leases(tenant, who.key_scope),
            keys.budget(tenant, "t", "day", "2026-01-31"),
            keys.decision(tenant, "r1"),
            keys.reservation(tenant, "r1"),
            keys.reservation_index(tenant),
            keys.settled(tenant, "r1"),
            keys.grant_spent(tenant, "r1"),
            keys.hydrate_lock(tenant),
        ]
        assert {keyslot(cluster, key) for key in tenant_keys} == {keyslot(cluster, keys.tag(tenant))}


async def test_a_key_written_through_the_cluster_client_lives_only_on_its_slot_owner(
    cluster: ValkeyCluster,
) -> None:
    """Through RedisCluster each tenant's key lands on the primary owning its tag's slot; the other
    primaries answer MOVED for it."""
    keys = RedisKeys(PREFIX)
    tenants = tenants_on_distinct_nodes(cluster, keys)
    async with connect(cluster.url) as client:
        for node, tenant in tenants.items():
            key = keys.hydrate_lock(tenant) + ":placement"
            await client.set(key, str(node))
            assert await client.get(key) == str(node).encode()
            assert command(cluster.ports[node], "GET", key) == str(node).encode()
            for other in set(range(3)) - {node}:
                with pytest.raises(ClusterError, match="MOVED"):
                    command(cluster.ports[other], "GET", key)


async def test_from_url_with_one_startup_node_discovers_the_whole_cluster(cluster: ValkeyCluster) -> None:
    """coredis.RedisCluster.from_url takes one redis:// node and finds the other primaries (coredis
    6.9 warns from inside from_url, which still passes startup nodes as dicts)."""
    with pytest.warns(DeprecationWarning, match="TCPLocation"):
        client = coredis.RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[1]}")
    try:
        async with client:
            primaries = client.connection_pool.cluster_layout.primaries
            assert sorted(node.port for node in primaries) == sorted(cluster.ports)
    finally:
        for stream in client.connection_pool.cluster_layout._error_stream:  # see valkey_cluster.connect
            stream.close()


# --- the limit scripts on RedisCluster ------------------------------------------------------------


async def test_reserve_and_settle_for_tenants_on_different_primaries_through_one_client(
    cluster: ValkeyCluster,
) -> None:
    """For two tenants whose slots are on different primaries: reserve charges the budget and TPM
    counters and records the reservation on the tenant's own primary; settle replaces it by the
    actual tokens exactly once; settle_many (one pipeline over both primaries) does the same."""
    keys = RedisKeys(PREFIX)
    tenants = tenants_on_distinct_nodes(cluster, keys)
    pair = [tenants[0], tenants[2]]
    async with scripts_on(cluster) as (client, scripts):
        for tenant in pair:
            who = scope(tenant)
            budget = scripts.budget_key(who, "tenant", "day")
            reserved = await hydrated_reserve(client, scripts, who, "one")
            assert reserved == Reserved(completion_limit=50, reserved=150)
            assert await counter(client, budget) == 150
            node = owner(cluster, keys.tag(tenant))
            assert command(cluster.ports[node], "GET", budget) == b"150"
            assert command(cluster.ports[node], "EXISTS", keys.reservation(tenant, "one")) == 1

            assert await scripts.settle(who, "one", 120) is True
            assert await scripts.settle(who, "one", 120) is False  # once per request id
            assert await counter(client, budget) == 120
            assert await client.exists([keys.reservation(tenant, "one")]) == 0
            tpm = await client.hgetall(keys.tpm(tenant, "t"))
            assert sum(int(v) for v in tpm.values()) == 120

        for tenant in pair:
            await hydrated_reserve(client, scripts, scope(tenant), "two")
        applied = await scripts.settle_many([(scope(tenant), "two", 30) for tenant in pair])
        assert applied == 2
        for tenant in pair:
            assert await counter(client, scripts.budget_key(scope(tenant), "tenant", "day")) == 150


# coredis 6.9 leaves a failed connection's anyio memory streams unclosed (as in test_admission's
# Redis-down test): ignored here, and collected before the test ends so no other test sees them.
@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")
async def test_one_client_rides_out_a_killed_and_restarted_primary(tmp_path: Path) -> None:
    """Killing one primary (no replicas) fails only calls for its tenants at first (connection
    refused, a RedisError); once restarted, the same RedisCluster client works again, scripts are
    reloaded on their own, and the restarted primary's counters are missing (NeedsHydration)."""
    valkey = ValkeyCluster(tmp_path / "chaos", node_timeout_ms=1000).start()
    try:
        keys = RedisKeys(PREFIX)
        tenants = tenants_on_distinct_nodes(valkey, keys)
        victim, survivor = tenants[1], tenants[0]
        async with scripts_on(valkey) as (client, scripts):
            for tenant in (victim, survivor):
                await hydrated_reserve(client, scripts, scope(tenant), "before")

            valkey.kill_node(1)
            with pytest.raises(coredis.exceptions.RedisError):
                await reserve(scripts, scope(victim), "during")
            assert isinstance(await reserve(scripts, scope(survivor), "during"), Reserved)

            deadline = time.monotonic() + 10
            while "cluster_state:ok" in command(valkey.ports[0], "CLUSTER", "INFO").decode():
                assert time.monotonic() < deadline, "the survivors never noticed the dead primary"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(valkey.restart_node, 1)

            outcome = await reserve(scripts, scope(victim), "after")
            assert isinstance(outcome, NeedsHydration)  # the restarted primary kept no data
            assert isinstance(await hydrated_reserve(client, scripts, scope(victim), "after2"), Reserved)
            assert isinstance(await reserve(scripts, scope(survivor), "after"), Reserved)
            assert await scripts.settle(scope(survivor), "before", 10) is True
    finally:
        valkey.stop()
        gc.collect()
