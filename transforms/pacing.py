"""Runs bounded in time: how many requests a worker hands one Session.run.

A run (transforms/batching.py: up to RUN_ROWS_PER_SLOT x batch_size requests, sorted by prompt length) reaches a
worker as one element. The worker does not decode it in one Session.run, which at GPT-2 1.5B would be 20 minutes
with nothing to show: it takes it in parts that hold about TARGET_RUN_SECONDS of work at the rate this worker
process has measured on its earlier parts (generated tokens per second of Session.run), the first part small: the
run's rows beyond its whole slot-fulls. So rows done and their counters move every few tens of seconds whatever the
model's size, and a part that fails is split and retried alone (transforms/generate.py): a retry redoes at most one
part.

A part is a whole number of slot-fulls (at least one), so even rows keep every slot busy to its end; ragged rows
drain at each part's end (the graph admits a part's longest rows first, so its last rows are its shortest), which
is what bench.ragged measures against even rows.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence, TypeVar

TARGET_RUN_SECONDS = 30.0
SMOOTHING = 0.5  # weight of the newest part in the rate estimate

T = TypeVar("T")


class Pace:
    """A worker process's generation rate (tokens per second of Session.run), shared by its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rate: float | None = None

    def record(self, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        with self._lock:
            rate = tokens / seconds
            self._rate = rate if self._rate is None else SMOOTHING * rate + (1 - SMOOTHING) * self._rate

    @property
    def rate(self) -> float | None:
        with self._lock:
            return self._rate


def part_rows(rate: float | None, slots: int, tokens_per_row: float, rows_left: int,
              target_seconds: float = TARGET_RUN_SECONDS) -> int:
    """How many of the rows left the next part takes. Before any rate is known, the rows beyond the run's whole
    slot-fulls (rows_left mod slots; a slot-full when there are none): a first part as short as any (its longest
    row's steps), after which every part is whole slot-fulls, so no part ends on a wave of a few rows. 256 rows at
    126 slots (had run_slots not stretched them to 128): 4, then 2 x 126; a first part of 16 rows had left 240 (a
    last wave of 114), a slot-full one 130 (a last wave of 4); the 124M 256 x 64 job ran 1.09x faster than with 16
    (BENCHMARKS.md). Then the rows whose
    tokens take about target_seconds at `rate`, in whole slot-fulls, at least one. A remainder smaller than one
    slot-full joins this part rather than running on its own at low occupancy."""
    if rate is None:
        return rows_left % slots or min(slots, rows_left)
    n = max(1, int(target_seconds * rate / max(tokens_per_row, 1.0) / slots)) * slots
    return rows_left if rows_left - n < slots else n


def parts(units: Sequence[list[T]], pace: Pace, slots: int, tokens: Callable[[list[T]], int],
          target_seconds: float = TARGET_RUN_SECONDS) -> Iterator[list[list[T]]]:
    """The units (a row's samples stay together) in consecutive parts sized by `part_rows` from the pace as it is
    when each part is taken (the caller records each part's rate before taking the next). tokens(unit): the tokens
    the unit may generate (its rows' max_new_tokens)."""
    i = 0
    while i < len(units):
        rest = units[i:]
        rows_left = sum(len(u) for u in rest)
        per_row = sum(tokens(u) for u in rest) / rows_left
        want = part_rows(pace.rate, slots, per_row, rows_left, target_seconds)
        part, rows = [], 0
        for u in rest:
            if part and rows + len(u) > want:
                break
            part.append(u)
            rows += len(u)
        i += len(part)
        yield part
