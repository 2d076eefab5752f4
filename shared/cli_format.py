"""How the admin commands print values in their compact tables (README.md, "Reading the tables").

Compact is the default and fits 80 columns: numbers with k / M, a key's or tenant's limits as one
column of what is set, times relative to now. `--wide` prints every column in full; `--utc` prints
absolute times. Identifiers (prefixes, tenant and key names, models) are never cut: their columns
do not wrap and are at least as wide as their longest value; the free-text columns wrap instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shared.models import LIMIT_NAMES, UNLIMITED, Limits

_UNITS = ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k"))
# How each limit reads in the summary: `rpm 60`, `5 streams`, `1M/day`.
_SHAPES = {
    "rpm": "rpm {}",
    "tpm": "tpm {}",
    "max_concurrent": "{} streams",
    "daily_tokens": "{}/day",
    "monthly_tokens": "{}/month",
    "total_tokens": "{} total",
}


def number(value: int) -> str:
    """1234 → 1.2k, 40000 → 40k, 1000000 → 1M; exact below 1,000 (never rounded up to the next unit)."""
    for size, unit in _UNITS:
        if abs(value) >= size:
            tenths = abs(value) * 10 // size  # truncated: 1,999 is 1.9k, never 2k
            whole, tenth = divmod(tenths, 10)
            sign = "-" if value < 0 else ""
            return f"{sign}{whole}{f'.{tenth}' if tenth and whole < 10 else ''}{unit}"
    return str(value)


def limits(values: Limits, *, key: bool) -> list[str]:
    """What is set, as the items of one cell: `rpm 60 · tpm 40k · 5 streams · 1M/day`. For a key,
    what it leaves to its tenant reads `inherit` once (`inherit` alone when it sets nothing); for a
    tenant, an unset limit is no limit (`none` when nothing is set)."""
    parts = []
    inherited = False
    for name in LIMIT_NAMES:
        value = getattr(values, name)
        if value is None:
            inherited = inherited or key
            continue
        parts.append(_SHAPES[name].format("unlimited" if value == UNLIMITED else number(value)))
    if inherited:
        parts.append("inherit" if not parts else "rest inherit")
    return parts or ["none"]


def when(value: dt.datetime | None, *, now: dt.datetime, utc: bool) -> str:
    """`3 min ago`, `in 6 d`, `just now`; with `utc`, `2026-12-08 03:04:05Z`; `—` for none."""
    if value is None:
        return "—"
    if utc:
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    seconds = (now - value).total_seconds()
    ahead = seconds < 0
    seconds = abs(seconds)
    if seconds < 45:
        return "just now" if not ahead else "in a moment"
    for size, unit in ((86400 * 365, "y"), (86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            count = int(seconds // size)  # 59 min 59 s is 59 min ago, never an hour
            text = f"{count} {unit}"
            return f"in {text}" if ahead else f"{text} ago"
    return "in 1 min" if ahead else "1 min ago"


GAP = 2  # between two columns (no borders, padding collapsed)
Cell = str | list[str]  # text printed whole, or items that may go on several lines (never split)


@attrs.frozen
class Fitted:
    """A table and the width it needs (more than the terminal's only when even its folded columns
    and its widest items cannot fit: printed that wide, the terminal wraps the lines, nothing is cut)."""

    table: Table
    width: int

    def show(self, console: Console) -> None:
        """Print it; never cropped and no column ever dropped."""
        console.print(self.table, width=max(console.width, self.width))


FOLD_MIN = 8  # a foldable column (a long free-text name) keeps at least this many cells per line


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    width: int,
    foldable: Sequence[str] = (),
) -> Fitted:
    """A table for a terminal `width` columns wide. Text cells are printed whole (their column is as
    wide as its longest value), except in `foldable` columns, which fold onto more lines (a
    character never lost) when the row would not fit otherwise; item cells share the room left,
    their items packed onto lines (`a · b` / `c`), an item never split (rich would wrap `5 streams`
    between its words). Text cells are rich markup (escape what is not ours with `literal`); item
    cells are plain text, escaped here once packed (an item alone may not look like markup when
    its neighbour completes the tag: `/v1` + `/[` + `/x]`)."""
    natural: dict[int, int] = {}
    for index, column in enumerate(columns):
        values = [row[index] for row in rows]
        if all(isinstance(v, str) for v in values):
            natural[index] = max([len(column), *(cell_len(_plain(str(v))) for v in values)])
    flexible = [i for i in range(len(columns)) if i not in natural]
    least = {
        i: max([len(columns[i]), *(cell_len(item) for row in rows for item in row[i])]) for i in flexible
    }
    wanted = {i: max([least[i], *(cell_len(_pack(row[i], 10**6)) for row in rows)]) for i in flexible}
    gaps = GAP * (len(columns) - 1)
    need = sum(natural.values()) + sum(least.values()) + gaps
    # Fold the widest foldable columns first, as far as needed, down to FOLD_MIN (or the heading).
    folded = {i: natural[i] for i in natural if columns[i] in foldable}
    while need > width:
        room_to_give = {i: w - max(FOLD_MIN, len(columns[i])) for i, w in folded.items()}
        giving = [i for i, spare in room_to_give.items() if spare > 0]
        if not giving:
            break
        index = max(giving, key=folded.__getitem__)
        cut = min(need - width, room_to_give[index])
        folded[index] -= cut
        need -= cut
    room = width - sum(folded.get(i, w) for i, w in natural.items()) - gaps
    # The room left, shared out: a column that needs less than its part gives the rest to the
    # others; never narrower than its widest item.
    widths: dict[int, int] = {}
    for count, index in enumerate(sorted(flexible, key=wanted.__getitem__)):
        part = max(room // (len(flexible) - count), least[index])
        widths[index] = min(wanted[index], part)
        room -= widths[index]
    out = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for index, column in enumerate(columns):
        if index in folded:
            out.add_column(column, width=folded[index], overflow="fold")
        elif index in natural:
            out.add_column(column, no_wrap=True, min_width=natural[index], overflow="fold")
        else:
            out.add_column(column, width=widths[index], overflow="fold")
    for row in rows:
        out.add_row(
            *(cell if isinstance(cell, str) else escape(_pack(cell, widths[i])) for i, cell in enumerate(row))
        )
    used = sum(folded.get(i, w) for i, w in natural.items()) + sum(widths.values()) + gaps
    return Fitted(out, used)


def join_items(items: Sequence[str]) -> str:
    """Items on one line: `rpm 5 · tpm 9k`."""
    return " · ".join(items)


def duration(seconds: int) -> str:
    """`7 d`, `12 h`, `30 min`, `45 s`: the largest whole unit."""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def path_items(path: str) -> list[str]:
    """A URL path as items that go on one line or break at a `/`: `/v1/chat` + `/completions`."""
    return [f"/{part}" for part in path.lstrip("/").split("/")] if path.startswith("/") else [path]


def _pack(items: Sequence[str], width: int) -> str:
    """Items joined by ` · ` (path items by nothing), a new line wherever the next would pass
    `width`."""
    lines: list[str] = []
    for item in items:
        sep = "" if item.startswith("/") else " · "
        if lines and cell_len(lines[-1]) + len(sep) + cell_len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return "\n".join(lines)


def _plain(text: str) -> str:
    """The printed text of a cell with rich markup (`[green]active[/]` → `active`)."""
    return Text.from_markup(text).plain


def literal(value: str) -> str:
    """Text that is not ours (a key's name, a model, a path, a version string) for a markup cell:
    `[/]` or `[link=…]` in it print as themselves instead of breaking or styling the table."""
    return escape(value)
