"""Budget periods: the day and the month a moment falls in, in the configured time zone.

Days roll over at local midnight and months on the first; the total period never rolls over.
Period names are computed here from the injected clock, once per request by the sidecar, and travel
in the grant and the usage event, so a request straddling midnight is charged to one day everywhere.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal
from zoneinfo import ZoneInfo

import attrs

Period = Literal["day", "month", "total"]
PERIODS: tuple[Period, ...] = ("day", "month", "total")
TOTAL_START = dt.date(1970, 1, 1)


@attrs.frozen
class Periods:
    """The first day of the current day and month periods."""

    day: dt.date
    month: dt.date
    # Asked several times on every request (key names, script arguments): made once.
    _names: dict[Period, str] = attrs.field(init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        names = {p: self.start(p).isoformat() for p in PERIODS}
        object.__setattr__(self, "_names", names)

    def start(self, period: Period) -> dt.date:
        """The first day of a period (1970-01-01 for the total)."""
        return {"day": self.day, "month": self.month, "total": TOTAL_START}[period]

    def names(self) -> dict[Period, str]:
        """ISO dates of each period's start, as used in Redis key names (a copy)."""
        return dict(self._names)

    def name(self, period: Period) -> str:
        """The ISO date of one period's start."""
        return self._names[period]

    def seconds_left(self, period: Period, now: float, zone: ZoneInfo) -> float | None:
        """Seconds until the period rolls over (None for the total)."""
        if period == "total":
            return None
        start = self.start(period)
        if period == "day":
            following = start + dt.timedelta(days=1)
        else:
            following = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
        rollover = dt.datetime.combine(following, dt.time(), tzinfo=zone).timestamp()
        return max(0.0, rollover - now)


def periods_at(now: float, zone: ZoneInfo) -> Periods:
    """The periods a unix time falls in."""
    local = dt.datetime.fromtimestamp(now, zone).date()
    return Periods(day=local, month=local.replace(day=1))


def from_names(names: dict[str, str]) -> Periods:
    """Rebuild Periods from `names()` (as carried by the grant and the usage event)."""
    return Periods(day=dt.date.fromisoformat(names["day"]), month=dt.date.fromisoformat(names["month"]))
