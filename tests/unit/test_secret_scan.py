"""The secret canary scan's matching, redaction and verdicts (tests/secret_scan.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import keys
from shared.hashing import Argon2Params, hash_key
from tests import secret_scan
from tests.secret_scan import Canary, Report

CHEAP = Argon2Params(memory_kib=64, time_cost=1, parallelism=1)


def _line(**fields: object) -> str:
    """A log line as the services write it (shared/logs.py)."""
    return orjson.dumps({"ts": 1.0, "level": "info", "logger": "authz_sidecar.authz", **fields}).decode()


def clean_lines(canary: Canary, count: int = 150) -> list[str]:
    """Realistic lines: request ids, paths, statuses and the canary key's prefix (logged by design)."""
    return [
        _line(
            msg="authz",
            request_id=f"5f0c7a1e-{n:04d}-4a3b-9c1d-0e2f3a4b5c6d",
            path="/api/chat",
            status=429,
            reason="rpm",
            key_prefix=canary.prefix,
            latency_ms=1.5,
        )
        for n in range(count)
    ]


@pytest.fixture
def canary() -> Canary:
    planted = Canary.fresh()
    planted.key = keys.generate_key().token
    return planted


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for planted log files, removed afterwards: the session's own scan reads every
    *.log under the session's temporary directory and would find them."""
    path = tmp_path / "logs"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def scan(lines: list[str], canary: Canary | None, source: str = "svc.log") -> Report:
    report = Report(canary=canary is not None)
    control = canary.prefix if canary else None
    secret_scan.scan_lines(report, source, lines, secret_scan.matchers(canary), control)
    return report


@pytest.mark.parametrize("which", ["grant_secret", "pepper", "key"])
def test_a_planted_canary_line_is_found_with_its_file_and_line(
    canary: Canary, log_dir: Path, which: str
) -> None:
    """A canary value in the middle of a log file is reported as `file:line` with its label."""
    lines = clean_lines(canary, 120)
    secret = getattr(canary, which)
    lines[57] = _line(msg="config", value=secret)
    path = log_dir / "authz_sidecar.log"
    path.write_text("\n".join(lines) + "\n")
    report = Report()
    control = canary.prefix
    for found in secret_scan.log_files([log_dir]):
        secret_scan.scan_lines(
            report, found.name, secret_scan.read_lines(found), secret_scan.matchers(canary), control
        )
    assert report.lines == 120
    assert [hit.where for hit in report.hits] == ["authz_sidecar.log:58"]
    label = {"grant_secret": "canary grant secret", "pepper": "canary pepper", "key": "canary key"}[which]
    assert label in report.hits[0].labels
    assert secret not in report.hits[0].snippet
    report.control_rows = 1
    assert secret_scan.problems(report, canary) == ["1 log lines or rows hold a secret"]


def test_a_clean_log_passes(canary: Canary) -> None:
    """Request ids, prefixes and statuses are no secrets: no hit, no problem."""
    report = scan(clean_lines(canary), canary)
    assert report.hits == []
    assert report.control_lines == 150
    report.control_rows = 1
    assert secret_scan.problems(report, canary) == []


def test_any_full_key_and_any_argon2_hash_are_found_without_a_canary() -> None:
    """Keys other than the canary (right, one character off, followed by more text) and Argon2 PHC
    strings are hits too; the key pattern is exactly shared.keys' shape."""
    token = keys.generate_key().token
    off = token[:-1] + ("A" if token[-1] != "A" else "B")
    phc = hash_key(token, pepper="p", params=CHEAP)
    lines = [
        _line(msg="a", v=token),
        _line(msg="b", v=off),
        f"Bearer {token}xyz",
        _line(stored=phc),
        "nz_short",
    ]
    report = scan(lines, None)
    assert [(h.where, h.labels) for h in report.hits] == [
        ("svc.log:1", ("full API key",)),
        ("svc.log:2", ("full API key",)),
        ("svc.log:3", ("full API key",)),
        ("svc.log:4", ("Argon2 hash",)),
    ]
    assert secret_scan.KEY_PATTERN.fullmatch(token)
    assert not secret_scan.KEY_PATTERN.fullmatch(token[:-1])


def test_redaction_hides_every_secret_but_keeps_the_key_prefix(canary: Canary) -> None:
    """The snippet shows where the secret was, never the secret: a key keeps `nz_` and its prefix
    (safe to show), an Argon2 string keeps its variant, canary values become a marker."""
    assert canary.key is not None
    assert canary.prefix is not None
    phc = hash_key(canary.key, pepper=canary.pepper, params=CHEAP)
    line = f"before {canary.key} middle {phc} and {canary.pepper} and {canary.grant_secret} after"
    report = scan([line], canary)
    (hit,) = report.hits
    for secret in (canary.key, canary.key[11:], phc.rsplit("$", 1)[1], canary.pepper, canary.grant_secret):
        assert secret not in hit.snippet
    assert f"nz_{canary.prefix}«redacted 38 chars»" in hit.snippet
    assert "$argon2id$«redacted" in hit.snippet
    assert hit.snippet.startswith("before ")
    assert set(hit.labels) >= {
        "canary key",
        "canary pepper",
        "canary grant secret",
        "Argon2 hash",
        "full API key",
    }


def test_the_snippet_is_clipped_around_the_first_secret(canary: Canary) -> None:
    """Long lines are cut around the first redaction, marked with an ellipsis on each cut side."""
    line = "x" * 500 + canary.pepper + "y" * 500
    (hit,) = scan([line], canary).hits
    assert hit.snippet.startswith("…")
    assert hit.snippet.endswith("…")
    assert "«redacted" in hit.snippet
    assert len(hit.snippet) < 250


def test_a_long_enough_piece_of_a_canary_is_found(canary: Canary) -> None:
    """31 characters of the pepper's random part, cut anywhere, are a hit (a truncated secret is
    still a leak); the canary key's secret part alone too."""
    assert canary.key is not None
    random_part = canary.pepper.rsplit("-", 1)[1]
    for start in range(len(random_part) - 30):
        piece = random_part[start : start + 31]
        assert scan([f"pepper={piece}"], canary).hits, start
    secret_part = canary.key[len(keys.KEY_SCHEME) + keys.PREFIX_LEN :]
    (hit,) = scan([f"secret={secret_part}"], canary).hits
    assert hit.labels == ("canary key (fragment)",)


@given(st.text(alphabet=keys.ALPHABET, min_size=1, max_size=80), st.integers(8, 20), st.data())
def test_fragments_cover_every_long_substring(text: str, size: int, data: st.DataObject) -> None:
    """Every substring at least 2 * size - 1 long contains one of the fragments."""
    pieces = secret_scan.fragments(text, size)
    length = min(len(text), 2 * size - 1)
    start = data.draw(st.integers(0, len(text) - length))
    window = text[start : start + length]
    assert any(piece in window for piece in pieces) or len(text) < 2 * size - 1


def test_zero_lines_fails_and_so_do_too_few_after_the_e2e_suite(canary: Canary) -> None:
    """No line searched is a failure with or without the canary; after 20 tests or more on the e2e
    stack, fewer than 100 lines fail too; so does a canary prefix seen in no log line or no audit row,
    or a canary whose key was never used."""
    empty = scan([], canary)
    assert "no log line was searched" in " ".join(secret_scan.problems(empty, canary))
    assert "no log line was searched" in " ".join(secret_scan.problems(scan([], None), None))
    assert secret_scan.min_lines(0) == 1
    assert secret_scan.min_lines(19) == 1
    assert secret_scan.min_lines(20) == 100
    few = scan(clean_lines(canary, 20), canary)
    few.control_rows = 1
    assert secret_scan.problems(few, canary, least=secret_scan.min_lines(5)) == []
    (reason,) = secret_scan.problems(few, canary, least=secret_scan.min_lines(120))
    assert "only 20 log lines" in reason
    unseen = scan(clean_lines(Canary.fresh(), 150), canary)  # another prefix: the canary was not logged
    assert any("in no log line" in r for r in secret_scan.problems(unseen, canary))
    assert any("in no audit row" in r for r in secret_scan.problems(unseen, canary))
    unused = Canary.fresh()
    assert any("no canary key" in r for r in secret_scan.problems(scan(clean_lines(canary), unused), unused))
    assert secret_scan.problems(scan(["one line"], None), None) == []


def test_rows_are_searched_and_named(canary: Canary) -> None:
    """An audit row is reported by database, table and id; the canary prefix in an audit row counts
    as seen."""
    assert canary.key is not None
    report = Report()
    rows = [
        ("id=1", orjson.dumps({"id": 1, "key_prefix": canary.prefix, "status": 429}).decode()),
        ("id=2", orjson.dumps({"id": 2, "user_agent": f"curl {canary.grant_secret}"}).decode()),
    ]
    secret_scan.scan_rows(report, "e2e_1.audit_log", rows, secret_scan.matchers(canary), canary.prefix)
    assert report.rows == 2
    assert report.control_rows == 1
    assert [h.where for h in report.hits] == ["e2e_1.audit_log id=2"]
    assert canary.grant_secret not in secret_scan.render(report, secret_scan.problems(report, canary))


def test_render_names_every_hit_without_the_secret(canary: Canary) -> None:
    """The failure message lists the reasons, the numbers and each hit, and holds no secret."""
    lines = [_line(msg="x", pepper=canary.pepper), *clean_lines(canary)]
    report = scan(lines, canary)
    canary.statuses["native: 200"] += 1
    message = secret_scan.render(report, secret_scan.problems(report, canary), canary)
    assert "svc.log:1 [canary pepper, canary pepper (fragment)]" in message
    assert "canary requests: native: 200 x1" in message
    assert "151 log lines in 1 files" in message
    assert canary.pepper not in message
    assert canary.pepper.rsplit("-", 1)[1][:16] not in message


def test_the_session_databases_filter_matches_the_fixtures_names() -> None:
    """On a shared server only this session's databases are searched."""
    only = secret_scan.session_databases(4242)
    assert [
        n for n in ("gw_template_4242", "t_4242_7", "e2e_4242", "t_42421_1", "e2e_424", "gateway") if only(n)
    ] == [
        "gw_template_4242",
        "t_4242_7",
        "e2e_4242",
    ]


def test_what_could_not_be_searched_fails_the_scan(canary: Canary) -> None:
    """A database the scan could not open is a failure, not a silent pass."""
    report = scan(clean_lines(canary), canary)
    report.control_rows = 1
    report.errors.append("the databases of chaos/pgdata: pg_ctl start failed")
    assert secret_scan.problems(report, canary) == [
        "not searched: the databases of chaos/pgdata: pg_ctl start failed"
    ]
