"""The launcher's progress lines while the job runs: rows done of the total, tokens/s and an ETA.

    progress: 1,200/10,000 rows (12%), 845.2 tokens/s, ETA 41m30s

The numbers are the job's counters (transforms/progress.py): rows done (an input row with its completions, or its
score, or its dead letter on its way to be written), rows skipped as done (--skip_existing), generated tokens (the
scoring job: scored tokens). They come from

- a local run (the DirectRunner, in-process or multi_processing: workers on this machine): the totals files the
  workers keep in a directory named in their environment (`read_totals`). The in-process runner blocks in run()
  and has no metrics until it ends, so there is nothing else to ask.
- any other runner: the running job's Beam metrics (`MetricCounts`), where the runner gives them while the job
  runs (Dataflow does). The PortableRunner's result (Flink, Spark, a job service) keeps the first answer it gets
  for good, so it is asked only once the job has ended: no progress lines there, only the summary.

The total is known before the run (Parquet metadata, JSON Lines line counts). The rates, and with them the ETA, are
those since rows were first done (start-up and model loading would make them look slower), and count rows done only
(rows skipped as done come at once and would make them look faster).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
from typing import Callable

from apache_beam.metrics.metric import MetricsFilter

from transforms.progress import NAMESPACE, ROWS_DONE, ROWS_SKIPPED, TOKENS

log = logging.getLogger(__name__)
Counts = dict[str, int]


def counter_values(result) -> Counts | None:
    """The job's counters from a PipelineResult (committed where the runner has them, else attempted), or None
    when it has none to give."""
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics, or a job service gone: no numbers, not a failure
        return None
    values: Counts = {}
    for c in counters:  # one per step that has the counter
        values[c.key.metric.name] = values.get(c.key.metric.name, 0) + (c.result or 0)
    return values


def read_totals(directory: str) -> Counts:
    """The sum of the counters over the worker processes' files in `directory` (transforms/progress.py)."""
    totals: Counts = {}
    for path in glob.glob(os.path.join(directory, "*.json")):
        try:
            with open(path) as f:
                counts = json.load(f)
        except (OSError, ValueError):
            continue
        for name, n in counts.items():
            totals[name] = totals.get(name, 0) + n
    return totals


class MetricCounts:
    """The running job's counters, once `result` (what Pipeline.run returned) is set; says once that there are
    none while the job runs when its runner gives none."""

    def __init__(self):
        self.result = None
        self.told = False

    def __call__(self) -> Counts | None:
        from apache_beam.runners.portability.portable_runner import PipelineResult as PortableResult

        if self.result is None:
            return None  # not started yet
        # a portable result would keep a mid-run answer for good (see the module's doc): not asked
        counts = None if isinstance(self.result, PortableResult) else counter_values(self.result)
        if counts is None and not self.told:
            self.told = True
            log.info("progress: not reported by this runner while the job runs; the summary follows at the end")
        return counts


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(counts: Counts, total: int, seconds: float, since: Counts | None = None,
                  tokens_counter: str = TOKENS) -> str:
    """The line for `counts`, with rates over the last `seconds`: since the counts were `since` (default: none).
    tokens_counter: the counter of the job's tokens (generated, or scored)."""
    done, skipped = counts.get(ROWS_DONE, 0), counts.get(ROWS_SKIPPED, 0)
    tokens = counts.get(tokens_counter, 0)
    since = since or {}
    rows_rate = (done - since.get(ROWS_DONE, 0)) / seconds if seconds > 0 else 0.0
    tokens_rate = (tokens - since.get(tokens_counter, 0)) / seconds if seconds > 0 else 0.0
    finished = done + skipped
    left = max(total - finished, 0)
    eta = "0s" if not left else duration(left / rows_rate) if rows_rate > 0 else "unknown"
    percent = f" ({100 * finished // total}%)" if total else ""
    skip = f", {skipped:,} skipped as done" if skipped else ""
    return f"progress: {finished:,}/{total:,} rows{percent}{skip}, {tokens_rate:.1f} tokens/s, ETA {eta}"


class Reporter:
    """Logs a progress line every `interval` seconds from a thread of its own, while used as a context manager."""

    def __init__(self, total: int, interval: float, counts: Callable[[], Counts | None],
                 tokens_counter: str = TOKENS):
        self.total, self.interval, self.counts, self.tokens_counter = total, interval, counts, tokens_counter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> Reporter:
        if self.interval > 0:
            self._start = time.monotonic()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        first = None  # first: (time, counts) when rows were first done, once they were
        while not self._stop.wait(self.interval):
            counts, now = self.counts(), time.monotonic()
            if counts is not None:
                # rates since the line that first had work done, rows or tokens (a part's tokens count as it
                # ends, its rows still going included): start-up and model loading aside; until then, since the start
                start, since = first or (self._start, None)
                log.info("%s", progress_line(counts, self.total, now - start, since, self.tokens_counter))
                if first is None and (counts.get(ROWS_DONE, 0) or counts.get(self.tokens_counter, 0)):
                    first = (now, counts)
