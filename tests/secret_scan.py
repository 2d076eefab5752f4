"""The secret canary scan: after the whole test session, no log line and no audit row may hold a secret.

The e2e stack runs with a canary grant secret and pepper, and uses a canary API key through Caddy,
rightly and wrongly (tests/e2e/conftest.py). At the end of the session every `*.log` file the
session's stacks wrote (services, Caddy, Valkey, Postgres' server.log, and what in-process apps
logged) and every row of `audit_log` and `prompt_logs` in every database the session created is
searched for:

- the canary grant secret, pepper and key, in full, and any fragment of their random parts long
  enough to matter (`FRAGMENT * 2 - 1` characters or more);
- any full API key (the shape `shared.keys` defines: scheme, prefix and secret);
- any Argon2 PHC string (`$argon2id$…`).

A hit is reported as `file:line` (or `database.table id=…`) with a redacted snippet: the secret
itself is never printed. The scan also proves it looked in the right place: it fails when it
searched no log line (fewer than `MIN_LINES` once the e2e suite ran: it writes thousands), or when
the canary key's prefix (which the gateway does log, on purpose) shows up in no log line or no audit
row: that proves the scan read the logs and the database the canary traffic went to.

Why `prompt_logs` too: those rows hold the request and response *bodies* of opted-in keys and
nothing else; the canary key is opted in but never puts a secret in a body, and no test does either,
so a secret there means the gateway copied a header, a query string or its own configuration into
stored text. `api_keys` is not searched: its `hash` column holds Argon2 strings by design.

The first part is pure (matching, redaction, verdicts: tests/unit/test_secret_scan.py); the
second collects log files and database rows (restarting a stopped embedded Postgres for a moment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import asyncpg
import attrs

import localstack
from shared import keys
from shared.db import asyncpg_dsn
from shared.logs import JsonFormatter

MIN_LINES = 100  # once at least SUITE_TESTS tests ran on the e2e stack
SUITE_TESTS = 20
FRAGMENT = 16  # any piece of a canary's random part at least 2 * FRAGMENT - 1 long is found
SNIPPET_CONTEXT = 60  # characters kept either side of the first redaction
MAX_HITS_SHOWN = 40

# A full key: `nz_`, the prefix and the secret, in the key alphabet (shared/keys.py). A longer run
# still starts with a whole key, so there is no boundary on the right.
KEY_PATTERN = re.compile(
    re.escape(keys.KEY_SCHEME) + f"[{re.escape(keys.ALPHABET)}]{{{keys.PREFIX_LEN + keys.SECRET_LEN}}}"
)
# Any Argon2 PHC string (shared/hashing.py writes `$argon2id$v=19$m=…,t=…,p=…$salt$hash`); the match
# runs to the end of the PHC characters so redaction hides salt and digest.
ARGON2_PATTERN = re.compile(r"\$argon2(?:id|i|d)\$[A-Za-z0-9+/=,$.]*")
# Tables searched row by row, with the column that names a row in a report.
TABLES = (("audit_log", "id"), ("prompt_logs", "request_id"))


# --- the canary ------------------------------------------------------------------------------------


@attrs.define
class Canary:
    """Recognisable secrets planted in the e2e stack; `key` is set once the stack created and used it."""

    grant_secret: str = attrs.field(repr=False)
    pepper: str = attrs.field(repr=False)
    key: str | None = attrs.field(default=None, repr=False)
    statuses: Counter[str] = attrs.field(factory=Counter)  # what the canary's requests got, by case

    @classmethod
    def fresh(cls) -> Canary:
        """New random canary values (long enough for any secret check; hex, so nothing escapes them)."""
        return cls(
            grant_secret=f"canary-grant-{secrets.token_hex(24)}",
            pepper=f"canary-pepper-{secrets.token_hex(24)}",
        )

    @property
    def prefix(self) -> str | None:
        """The canary key's prefix: logged by design, so it shows where the canary traffic was logged."""
        return keys.parse_key(self.key).prefix if self.key else None


@attrs.frozen
class Matcher:
    """One thing to look for."""

    label: str
    pattern: re.Pattern[str]


def fragments(text: str, size: int = FRAGMENT) -> list[str]:
    """Windows of `text` such that every substring of length >= 2 * size - 1 contains one of them."""
    if len(text) <= size:
        return [text]
    starts = list(range(0, len(text) - size + 1, size))
    if starts[-1] + size < len(text):
        starts.append(len(text) - size)
    return [text[s : s + size] for s in starts]


def _random_part(value: str) -> str:
    """What follows the `canary-grant-` / `canary-pepper-` label."""
    return value.rsplit("-", 1)[-1]


def matchers(canary: Canary | None) -> list[Matcher]:
    """Every pattern the scan looks for: the canary's values (full and fragments), any full key,
    any Argon2 string."""
    found: list[Matcher] = []
    if canary is not None:
        named = [("canary grant secret", canary.grant_secret, _random_part(canary.grant_secret)),
                 ("canary pepper", canary.pepper, _random_part(canary.pepper))]  # fmt: skip
        if canary.key:
            secret_part = canary.key[len(keys.KEY_SCHEME) + keys.PREFIX_LEN :]
            named.append(("canary key", canary.key, secret_part))
        for label, full, random_part in named:
            found.append(Matcher(label, re.compile(re.escape(full))))
            found.extend(
                Matcher(f"{label} (fragment)", re.compile(re.escape(piece)))
                for piece in fragments(random_part)
            )
    found.append(Matcher("full API key", KEY_PATTERN))
    found.append(Matcher("Argon2 hash", ARGON2_PATTERN))
    return found


# --- matching and redaction --------------------------------------------------------------------------


@attrs.frozen
class Hit:
    """A line or row holding something secret."""

    where: str  # `path:line` or `database.table id=…`
    labels: tuple[str, ...]
    snippet: str  # redacted


def find(line: str, looking_for: Sequence[Matcher]) -> list[tuple[int, int, str]]:
    """(start, end, label) of every match in the line."""
    return [
        (m.start(), m.end(), matcher.label) for matcher in looking_for for m in matcher.pattern.finditer(line)
    ]


def redact(line: str, spans: Sequence[tuple[int, int, str]], context: int = SNIPPET_CONTEXT) -> str:
    """The line with every span replaced by a marker, clipped around the first one. A span that starts
    with a key keeps `nz_` and the prefix (safe to show, and it says which key leaked)."""
    merged: list[list[int]] = []
    for start, end, _ in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out: list[str] = []
    cursor = 0
    first_marker = -1
    for start, end in merged:
        out.append(line[cursor:start])
        text = line[start:end]
        shown = ""
        if KEY_PATTERN.match(text):
            shown = text[: len(keys.KEY_SCHEME) + keys.PREFIX_LEN]
        elif text.startswith("$argon2"):
            shown = "$" + text.split("$", 2)[1] + "$"
        if first_marker < 0:
            first_marker = sum(map(len, out))
        out.append(f"{shown}«redacted {end - start - len(shown)} chars»")
        cursor = end
    out.append(line[cursor:])
    redacted = "".join(out).rstrip("\r\n")
    first_marker = max(first_marker, 0)
    lo = max(0, first_marker - context)
    hi = min(len(redacted), first_marker + context + 40)
    return ("…" if lo > 0 else "") + redacted[lo:hi] + ("…" if hi < len(redacted) else "")


# --- the report ------------------------------------------------------------------------------------


@attrs.define
class Report:
    """What the scan searched and found."""

    files: int = 0
    lines: int = 0
    databases: int = 0
    rows: int = 0
    hits: list[Hit] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)  # what could not be searched
    control_lines: int = 0  # log lines naming the canary key's prefix
    control_rows: int = 0  # audit rows naming it
    canary: bool = False  # whether a canary key was looked for

    def summary(self) -> str:
        """One line for the terminal."""
        seen = (
            f" (canary prefix seen in {self.control_lines} log lines and {self.control_rows} audit rows)"
            if self.canary
            else " (no canary planted: the e2e stack did not run)"
        )
        return (
            f"secret scan: {self.lines} log lines in {self.files} files, {self.rows} rows in "
            f"{self.databases} databases, {len(self.hits)} hits{seen}"
        )


def scan_lines(
    report: Report,
    source: str,
    lines: Iterable[str],
    looking_for: Sequence[Matcher],
    control: str | None = None,
) -> None:
    """Search lines of one file; `source` names it in hits (`source:line`)."""
    report.files += 1
    for number, line in enumerate(lines, start=1):
        report.lines += 1
        if control and control in line:
            report.control_lines += 1
        spans = find(line, looking_for)
        if spans:
            labels = tuple(sorted({label for _, _, label in spans}))
            report.hits.append(Hit(f"{source}:{number}", labels, redact(line, spans)))


def scan_rows(
    report: Report,
    source: str,
    rows: Iterable[tuple[str, str]],
    looking_for: Sequence[Matcher],
    control: str | None = None,
) -> None:
    """Search rows of one table, each given as (name of the row, the row as text)."""
    for name, text in rows:
        report.rows += 1
        if control and source.endswith(".audit_log") and control in text:
            report.control_rows += 1
        spans = find(text, looking_for)
        if spans:
            labels = tuple(sorted({label for _, _, label in spans}))
            report.hits.append(Hit(f"{source} {name}", labels, redact(text, spans)))


def min_lines(stack_tests: int, service_tests: int = 1) -> int:
    """How many log lines the scan must at least have searched: none when no test started a
    service process (a run of unit or integration tests against Postgres and Valkey only); one
    otherwise; MIN_LINES once SUITE_TESTS tests or more ran on the e2e stack (a single e2e file
    may write fewer)."""
    if stack_tests == 0 and service_tests == 0:
        return 0
    return MIN_LINES if stack_tests >= SUITE_TESTS else 1


def problems(report: Report, canary: Canary | None, *, least: int = 1) -> list[str]:
    """Why the scan fails (empty: it passes): a hit; fewer than `least` (at least one) lines
    searched; with the canary planted, a canary key never used or one that left no trace where the
    scan looked."""
    found: list[str] = []
    if report.hits:
        found.append(f"{len(report.hits)} log lines or rows hold a secret")
    found.extend(f"not searched: {error}" for error in report.errors)
    if report.lines == 0 and least > 0:
        found.append("no log line was searched: the scan is not looking where the services log")
    elif report.lines < least:
        found.append(
            f"only {report.lines} log lines were searched (at least {least} expected): the scan is "
            "not looking where the services log"
        )
    if canary is not None:
        if canary.key is None:
            found.append("the canary grant secret and pepper were planted but no canary key was used")
        else:
            if report.control_lines == 0:
                found.append(
                    "the canary key's prefix is in no log line: its requests were not logged where "
                    "the scan looks"
                )
            if report.control_rows == 0:
                found.append("the canary key's prefix is in no audit row: the scan missed its database")
    return found


def render(report: Report, reasons: Sequence[str], canary: Canary | None = None) -> str:
    """The failure message: why, the numbers, what the canary's requests got, and every hit (redacted)."""
    lines = ["secret canary scan failed:", *(f"  - {r}" for r in reasons), f"  {report.summary()}"]
    if canary is not None and canary.statuses:
        lines.append(f"  canary requests: {', '.join(f'{c} x{n}' for c, n in canary.statuses.items())}")
    for hit in report.hits[:MAX_HITS_SHOWN]:
        lines.append(f"  {hit.where} [{', '.join(hit.labels)}] {hit.snippet}")
    if len(report.hits) > MAX_HITS_SHOWN:
        lines.append(f"  … and {len(report.hits) - MAX_HITS_SHOWN} more")
    return "\n".join(lines)


# --- collecting: log files --------------------------------------------------------------------------


def log_files(roots: Iterable[Path]) -> list[Path]:
    """Every `*.log` file under the roots (each file once)."""
    found: dict[Path, None] = {}
    for root in roots:
        if root.is_dir():
            for path in sorted(root.rglob("*.log")):
                if path.is_file():
                    found[path.resolve()] = None
    return list(found)


def read_lines(path: Path) -> Iterator[str]:
    """The file's lines, undecodable bytes replaced (a log may hold anything a client sent)."""
    with path.open("rb") as handle:
        for raw in handle:
            yield raw.decode("utf-8", errors="replace")


@contextlib.contextmanager
def log_file_handler(path: Path) -> Iterator[logging.Handler]:
    """Copy what in-process apps log (integration tests serve the sidecar and proxy in the test
    process) into a file, in the services' own JSON format, so the scan sees those lines too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


# --- collecting: databases --------------------------------------------------------------------------


def postgres_data_dirs(root: Path) -> list[Path]:
    """Data directories of the embedded Postgres servers the session started under `root`."""
    if not root.is_dir():
        return []
    return sorted(
        conf.parent for conf in root.rglob("postgresql.conf") if (conf.parent / "PG_VERSION").is_file()
    )


def _running_port(pgdata: Path) -> int | None:
    """The port of a server still running on this data directory."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = (pgdata / "postmaster.pid").read_text().splitlines()
        if not localstack._gone(int(fields[0])):
            return int(fields[3])
    return None


@contextlib.contextmanager
def postgres_on(pgdata: Path) -> Iterator[str]:
    """An admin URL for the server of a data directory: the running one, or the stopped one started
    on a free port for the duration (and stopped again)."""
    port = _running_port(pgdata)
    if port is not None:
        yield f"postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
        return
    port = localstack.free_port()
    options = f"-h 127.0.0.1 -p {port} -k {pgdata} -c fsync=off"
    try:
        localstack._pg("pg_ctl", "-D", str(pgdata), "-w", "-t", "30", "-o", options, "-l",
                       str(pgdata / "server.log"), "start")  # fmt: skip
    except subprocess.CalledProcessError as exc:
        localstack._pg("pg_ctl", "-D", str(pgdata), "-m", "immediate", "stop", check=False)
        raise RuntimeError(f"pg_ctl start failed: {exc.stderr.decode(errors='replace').strip()}") from None
    try:
        yield f"postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    finally:
        localstack._pg("pg_ctl", "-D", str(pgdata), "-w", "-m", "fast", "stop", check=False)


def _with_database(admin_url: str, database: str) -> str:
    base, _, query = admin_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


async def scan_databases(
    report: Report,
    admin_url: str,
    looking_for: Sequence[Matcher],
    *,
    control: str | None = None,
    only: Callable[[str], bool] = lambda name: True,
    label: str = "",
) -> None:
    """Search every row of TABLES in every database of the server that `only` accepts."""
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        names = [
            str(r["datname"])
            for r in await conn.fetch(
                "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres' "
                "ORDER BY datname"
            )
        ]
    finally:
        await conn.close()
    for name in filter(only, names):
        db = await asyncpg.connect(asyncpg_dsn(_with_database(admin_url, name)))
        try:
            report.databases += 1
            for table, key in TABLES:
                if await db.fetchval("SELECT to_regclass($1)", table) is None:
                    continue
                rows = await db.fetch(
                    f"SELECT {key}::text AS name, row_to_json(t)::text AS doc FROM {table} t"  # noqa: S608 - fixed names
                )
                scan_rows(
                    report,
                    f"{label}{name}.{table}",
                    ((f"{key}={r['name']}", str(r["doc"])) for r in rows),
                    looking_for,
                    control,
                )
        finally:
            await db.close()


def session_databases(pid: int) -> Callable[[str], bool]:
    """Names the fixtures give this session's databases on a shared server (tests/conftest.py)."""
    pattern = re.compile(rf"(^|_){pid}(_|$)")
    return lambda name: pattern.search(name) is not None


def scan_session(
    *,
    work_dir: Path,
    log_roots: Sequence[Path],
    canary: Canary | None,
    external_database_url: str | None,
    pid: int | None = None,
) -> Report:
    """Search every log file under `work_dir` and `log_roots`, then every database of every embedded
    Postgres under `work_dir` (and this session's databases on an external server)."""
    looking_for = matchers(canary)
    control = canary.prefix if canary else None
    report = Report(canary=control is not None)
    for path in log_files([work_dir, *log_roots]):
        try:
            shown = path.relative_to(localstack.ROOT)
        except ValueError:
            shown = path
        scan_lines(report, str(shown), read_lines(path), looking_for, control)
    for pgdata in postgres_data_dirs(work_dir):
        label = f"{pgdata.relative_to(work_dir)}:"
        try:
            with postgres_on(pgdata) as admin_url:
                asyncio.run(scan_databases(report, admin_url, looking_for, control=control, label=label))
        except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
            report.errors.append(f"the databases of {label.rstrip(':')}: {exc}")
    if external_database_url:
        only = session_databases(pid if pid is not None else os.getpid())
        try:
            asyncio.run(
                scan_databases(
                    report, external_database_url, looking_for, control=control, only=only, label="external:"
                )
            )
        except (OSError, asyncpg.PostgresError) as exc:
            report.errors.append(f"this session's databases on GATEWAY_DATABASE_URL: {exc}")
    return report
