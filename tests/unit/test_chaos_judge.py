"""scripts/chaos.py's verdicts (`judge`) on hand-made evidence: a consistent phase passes every check,
and each kind of damage the harness exists to find (a lost, duplicated or wrong ledger row, a 200
Ollama never served, an exceeded budget, a counter off the ledger, a lease beyond its TTL, a
documented Valkey loss outside its window) fails exactly the check that names it."""

from __future__ import annotations

import attrs

import chaos

RUN, PHASE, TENANT = "abc123", 1, 5
KEYS = [11, 12]
CONFIG = chaos.Config(clients=2, load_seconds=10.0, kill_after=1.0, down_seconds=1.0, tail_seconds=4.0)
PROMPT, COMPLETION = 10, 20


def attempt(client: int, seq: int, *, sent: float = 9.0) -> chaos.Attempt:
    """A request that completed with the simulator's counts."""
    return chaos.Attempt(
        RUN,
        PHASE,
        client,
        seq,
        "native",
        sent_at=sent,
        headers_at=sent + 0.01,
        ended_at=sent + 0.4,
        status=200,
        completed=True,
        prompt_tokens=PROMPT,
        completion_tokens=COMPLETION,
    )


def phase(component: str, attempts: list[chaos.Attempt]) -> chaos.Phase:
    """A phase killed at 1 s, back at 2 s, load until 10 s."""
    load = chaos.Load(RUN, PHASE, "http://gateway", ["k0", "k1"], 24)
    load.attempts.extend(attempts)
    budgets = {"daily_tokens": 10**6, "monthly_tokens": 10**6, "total_tokens": 10**6}
    return chaos.Phase(
        run=RUN,
        index=PHASE,
        component=component,
        tenant_id=TENANT,
        tenant_name="t",
        key_ids=KEYS,
        key_budgets=[{**budgets, "total_tokens": 1000}, budgets],
        tenant_budgets=budgets,
        load=load,
        lease_watch=chaos.LeaseWatch(ttl_ms=3000, max_concurrent=2),
        started=0.0,
        kill_at=1.0,
        restart_at=2.0,
        load_end=10.0,
    )


def row(a: chaos.Attempt, request_id: str | None = None) -> chaos.Row:
    """The exact ledger row of a completed attempt."""
    return chaos.Row(
        request_id=request_id or f"req-{a.client}-{a.seq}",
        key_id=KEYS[a.client],
        model=a.model,
        prompt=PROMPT,
        completion=COMPLETION,
        total=PROMPT + COMPLETION,
        reserved=60,
        estimated=False,
        reason=None,
        http_status=200,
        started=a.sent_at,
        finished=a.ended_at,
        recorded=a.ended_at + 0.01,
    )


def evidence(attempts: list[chaos.Attempt]) -> chaos.Evidence:
    """What a gateway that did everything right leaves behind."""
    records = {
        a.marker: [chaos.SimRecord(a.marker, True, "completed", PROMPT, COMPLETION, COMPLETION)]
        for a in attempts
    }
    periods: dict[tuple[str, int, str, str], int] = {}
    starts = {"day": "2026-11-27", "month": "2026-11-01", "total": "1970-01-01"}
    for a in attempts:
        for scope, scope_id in (("tenant", TENANT), ("key", KEYS[a.client])):
            for period, start in starts.items():
                where = (scope, scope_id, period, start)
                periods[where] = periods.get(where, 0) + PROMPT + COMPLETION
    return chaos.Evidence(
        rows=[row(a) for a in attempts],
        duplicate_request_ids=[],
        records=records,
        foreign_records=[],
        periods=periods,
        live_counters=dict(periods),
        rebuilt_counters=dict(periods),
        end_leases=[],
        dead_letters=[],
        log_errors=[],
        settled=True,
        settle_detail="settled",
    )


def failed(component: str, attempts: list[chaos.Attempt], ev: chaos.Evidence) -> set[str]:
    """Names of the checks that failed."""
    checks, _ = chaos.judge(phase(component, attempts), ev, CONFIG)
    return {c.name for c in checks if not c.ok}


# Before the kill (1 s), right after the restart (2 s), and in the tail of the load (6 to 10 s).
ATTEMPTS = [attempt(0, 0, sent=0.2), attempt(1, 0, sent=0.3), attempt(0, 1, sent=2.1), attempt(1, 1)]


def test_a_consistent_phase_passes_every_check() -> None:
    assert failed("accountant", ATTEMPTS, evidence(ATTEMPTS)) == set()


def test_a_lost_ledger_row_fails_the_ledger_check() -> None:
    ev = evidence(ATTEMPTS)
    lost = ev.rows.pop(1)
    ev.periods = {k: v - (lost.total if k[1] in (TENANT, lost.key_id) else 0) for k, v in ev.periods.items()}
    ev.live_counters = ev.rebuilt_counters = dict(ev.periods)
    assert failed("accountant", ATTEMPTS, ev) == {"ledger = simulator"}


def test_a_dead_letter_fails_the_ledger_check() -> None:
    ev = evidence(ATTEMPTS)
    ev.dead_letters = ["refused by Postgres: CannotConnectNowError"]
    assert failed("postgres", ATTEMPTS, ev) == {"ledger = simulator"}


def test_a_second_row_for_one_request_is_a_duplicate() -> None:
    ev = evidence(ATTEMPTS)
    ev.rows.append(row(ATTEMPTS[2], request_id="another-id"))
    assert "no duplicates" in failed("accountant", ATTEMPTS, ev)


def test_wrong_token_counts_fail_the_ledger_check() -> None:
    ev = evidence(ATTEMPTS)
    ev.rows[0] = attrs.evolve(ev.rows[0], completion=COMPLETION - 1, total=PROMPT + COMPLETION - 1)
    assert "ledger = simulator" in failed("accountant", ATTEMPTS, ev)


def test_a_200_ollama_never_received_fails() -> None:
    ev = evidence(ATTEMPTS)
    del ev.records[ATTEMPTS[3].marker]
    assert "200s served" in failed("accountant", ATTEMPTS, ev)


def test_a_request_ollama_received_twice_fails() -> None:
    ev = evidence(ATTEMPTS)
    ev.records[ATTEMPTS[0].marker] *= 2
    assert "200s served" in failed("accountant", ATTEMPTS, ev)


def test_a_spent_budget_overshot_fails() -> None:
    attempts = [attempt(0, seq, sent=0.1 * seq) for seq in range(40)] + [attempt(1, 0)]
    assert failed("accountant", attempts, evidence(attempts)) == {"budgets"}  # 1200 of 1000


def test_a_counter_off_the_ledger_fails_unless_it_is_the_documented_valkey_overcount() -> None:
    ev = evidence(ATTEMPTS)
    where = ("key", KEYS[1], "total", "1970-01-01")
    ev.live_counters[where] = ev.periods[where] + 30
    assert failed("accountant", ATTEMPTS, ev) == {"counters"}
    assert failed("valkey", ATTEMPTS, ev) == set()
    ev.live_counters[where] = ev.periods[where] - 30
    assert failed("valkey", ATTEMPTS, ev) == {"counters"}
    ev.live_counters[where] = ev.periods[where]
    ev.rebuilt_counters[where] = 0
    assert failed("valkey", ATTEMPTS, ev) == {"counters"}


def test_a_lease_beyond_its_ttl_or_alive_at_the_end_fails() -> None:
    p = phase("accountant", ATTEMPTS)
    p.lease_watch.observe(1_000_000, "k11", [("req-0-1", 1_000_000 + 3_500)])
    checks, _ = chaos.judge(p, evidence(ATTEMPTS), CONFIG)
    assert {c.name for c in checks if not c.ok} == {"leases"}
    ev = evidence(ATTEMPTS)
    ev.end_leases = ["req-1-1"]
    assert failed("accountant", ATTEMPTS, ev) == {"leases"}


def test_valkey_may_lose_only_the_events_of_requests_that_ended_just_before_it_died() -> None:
    ended_at_kill = attempt(1, 2, sent=0.55)  # ends at 0.95 s, the kill is at 1 s
    attempts = [*ATTEMPTS, ended_at_kill]
    ev = evidence(ATTEMPTS)  # no ledger row for it: its event was on the lost stream
    ev.records[ended_at_kill.marker] = [chaos.SimRecord(ended_at_kill.marker, True, "completed", 10, 20, 20)]
    assert failed("valkey", attempts, ev) == set()
    assert failed("accountant", attempts, ev) == {"ledger = simulator"}
    long_before = attempt(1, 2, sent=-9.0)  # ended 9.6 s before the kill: the accountant had it
    attempts[-1] = long_before
    ev.records = {m: r for m, r in ev.records.items() if m != ended_at_kill.marker}
    ev.records[long_before.marker] = [chaos.SimRecord(long_before.marker, True, "completed", 10, 20, 20)]
    assert failed("valkey", attempts, ev) == {"ledger = simulator"}


def test_an_error_clients_should_not_see_fails_as_designed() -> None:
    refused = attrs.evolve(attempt(1, 2, sent=0.5), status=503, completed=False, error="unavailable")
    attempts = [*ATTEMPTS, refused]
    assert failed("valkey", attempts, evidence(ATTEMPTS)) == set()
    assert failed("postgres", attempts, evidence(ATTEMPTS)) == {"as designed"}


def test_no_complete_200_in_the_tail_fails_recovery() -> None:
    cut = attrs.evolve(ATTEMPTS[3], completed=False, error="ClientPayloadError")
    attempts = [*ATTEMPTS[:3], cut]
    ev = evidence(ATTEMPTS)
    ev.rows[3] = attrs.evolve(ev.rows[3], estimated=True, reason="client_disconnected")
    assert failed("caddy", attempts, ev) == {"recovered"}
