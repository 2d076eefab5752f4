"""The compact table values of the admin commands (shared/cli_format.py), against hand-written text."""

from __future__ import annotations

import datetime as dt
import io
import re

import pytest
from rich.console import Console

from shared import cli_format as fmt
from shared.models import UNLIMITED, Limits

NOW = dt.datetime(2026, 12, 8, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1k"),
        (1234, "1.2k"),
        (1999, "1.9k"),  # never rounded up into 2k
        (40_000, "40k"),
        (123_456, "123k"),
        (1_000_000, "1M"),
        (1_500_000, "1.5M"),
        (250_000_000, "250M"),
        (3_000_000_000, "3G"),
    ],
)
def test_numbers_read_with_k_and_m(value: int, text: str) -> None:
    assert fmt.number(value) == text


def test_limits_list_what_is_set_and_inherit_once() -> None:
    every = Limits(60, 40_000, 5, 1_000_000, 30_000_000, 250_000_000)
    assert fmt.limits(every, key=False) == [
        "rpm 60",
        "tpm 40k",
        "5 streams",
        "1M/day",
        "30M/month",
        "250M total",
    ]
    assert fmt.limits(Limits(), key=True) == ["inherit"]
    assert fmt.limits(Limits(), key=False) == ["none"]
    assert fmt.limits(Limits(rpm=120), key=True) == ["rpm 120", "rest inherit"]
    assert fmt.limits(Limits(tpm=UNLIMITED), key=True) == ["tpm unlimited", "rest inherit"]


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (dt.timedelta(seconds=10), "just now"),
        (dt.timedelta(minutes=3), "3 min ago"),
        (dt.timedelta(hours=2, minutes=10), "2 h ago"),
        (dt.timedelta(seconds=3599), "59 min ago"),  # never rounded up to an hour
        (dt.timedelta(hours=36), "1 d ago"),
        (dt.timedelta(days=3), "3 d ago"),
        (dt.timedelta(days=800), "2 y ago"),
        (-dt.timedelta(days=7), "in 7 d"),
    ],
)
def test_times_read_relative_to_now(delta: dt.timedelta, text: str) -> None:
    assert fmt.when(NOW - delta, now=NOW, utc=False) == text


def test_utc_times_are_absolute_and_none_is_a_dash() -> None:
    assert fmt.when(NOW, now=NOW, utc=True) == "2026-12-08 12:00:00Z"
    assert fmt.when(None, now=NOW, utc=False) == "—"


def test_a_table_wider_than_the_terminal_packs_items_and_never_cuts_text() -> None:
    """At 40 columns: the text column whole, the items packed onto lines, a path broken at a `/`."""
    rows: list[list[fmt.Cell]] = [
        ["nz_abcdefgh", ["rpm 60", "tpm 40k", "5 streams", "1M/day"], fmt.path_items("/v1/chat/completions")]
    ]
    console = Console(width=40, file=io.StringIO(), record=True)
    fmt.table("t", ("prefix", "limits", "path"), rows, width=40).show(console)
    text = console.export_text()
    assert "…" not in text
    lines = text.splitlines()
    assert all(len(line) <= 40 for line in lines)
    for word in ("nz_abcdefgh", "rpm 60", "tpm 40k", "5 streams", "1M/day", "/completions"):
        assert any(word in line for line in lines), text


def test_long_names_fold_instead_of_crowding_out_columns_and_markup_prints_as_itself() -> None:
    """A 70-character key name at 80 columns folds (every character kept) while the status, limits
    and last-used columns stay; a value with rich markup in it (`[/]`, `[link=…]`) prints literally."""
    name = "n" * 70
    rows: list[list[fmt.Cell]] = [
        ["nz_abcdefgh", fmt.literal(name), "revoked", ["rpm 60", "5 streams"], "3 min ago"],
        ["nz_ijklmnop", fmt.literal("[link=http://evil]click[/] [/]"), "active", ["inherit"], "—"],
    ]
    columns = ("prefix", "name", "status", "limits", "last used")
    console = Console(width=80, file=io.StringIO(), record=True)
    fmt.table("keys", columns, rows, width=80, foldable=("name",)).show(console)
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    for word in ("revoked", "5 streams", "3 min ago", "last used", "[link=http://evil]click[/]"):
        assert any(word in line for line in lines), text
    assert sum(len(run) for run in re.findall(r"n{2,}", text)) == 70, text  # folded, not one lost
