"""Wall and monotonic time, injected so that every stamp and duration is reproducible."""

from __future__ import annotations

import time
from typing import Protocol

import attrs


class Clock(Protocol):
    """Wall time for `created_at` stamps and a monotonic clock for the reported durations."""

    def time_ns(self) -> int: ...

    def monotonic_ns(self) -> int: ...


@attrs.frozen
class SystemClock:
    """The real clocks."""

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.perf_counter_ns()


@attrs.define
class FakeClock:
    """A clock for byte-exact tests.

    Each `time_ns()` call returns the current wall time and then advances it by `wall_tick_ns`;
    `monotonic_ns()` likewise with `monotonic_tick_ns`. The simulator reads the wall clock once
    when a request arrives (the record's `received_at`), then once per emitted chunk (and once
    per load/unload answer); it reads the monotonic clock exactly four times per generation
    (start, model loaded, first token, end), so with the default ticks every generation reports
    load_duration = prompt_eval_duration = eval_duration = 1 ms and total_duration = 3 ms.
    """

    start_ns: int
    wall_tick_ns: int = 0
    monotonic_tick_ns: int = 1_000_000
    _wall: int = attrs.field(init=False, default=0)
    _monotonic: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._wall = self.start_ns

    def time_ns(self) -> int:
        now = self._wall
        self._wall += self.wall_tick_ns
        return now

    def monotonic_ns(self) -> int:
        now = self._monotonic
        self._monotonic += self.monotonic_tick_ns
        return now


def rfc3339nano(epoch_ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds with trailing zeros trimmed."""
    seconds, fraction = divmod(epoch_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        stamp += "." + f"{fraction:09d}".rstrip("0")
    return stamp + "Z"
