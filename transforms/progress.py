"""A worker's progress: the job's progress counters, and the worker's own progress log line.

The counters are Beam counters (namespace gpt2) that the launcher can also read while a local run runs. The launcher
shows rows done, tokens/s and an ETA from these counters (pipeline/progress.py). On Dataflow it asks the
running job for its metrics. The DirectRunner's in-process engine (FnApiRunner) blocks in `run()` and has no metrics
until the end, so for runs on this machine (in-process or `--direct_running_mode multi_processing`) the launcher
names a directory in the environment variable PROGRESS_DIR_ENV before it runs the pipeline: each worker process (the
launcher itself, or its subprocesses, which inherit its environment) then also keeps its totals of these counters
in a small JSON file of its own there, replaced at most once a second, which the launcher sums
(pipeline/progress.py). Workers elsewhere never see the variable, and nothing is written. A worker also logs its
rows and tokens every LOG_SECONDS (`log_done`), at DEBUG on a local run, whose launcher shows the job's progress.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

from apache_beam.metrics import Metrics

log = logging.getLogger(__name__)

NAMESPACE = "gpt2"
PROGRESS_DIR_ENV = "GPT2_BEAM_PROGRESS_DIR"
FLUSH_SECONDS = 1.0
COALESCE_SECONDS = 0.1
LOG_SECONDS = 10.0
ROWS_DONE = "rows_done"  # rows with their completion or dead letter on the way to be written
ROWS_SKIPPED = "rows_skipped_existing"  # rows skipped by --skip_existing: their id already has an output row
TOKENS = "generated_tokens"
SCORED_TOKENS = "scored_tokens"  # the scoring job's tokens (pipeline.score)


class Counter:
    """A Beam counter that, on a worker of a local run, also adds to this process's totals file."""

    def __init__(self, name: str):
        self.name = name
        self._counter = Metrics.counter(NAMESPACE, name)

    def inc(self, n: int = 1) -> None:
        self._counter.inc(n)
        _tally.add(self.name, n)


class _Tally:
    """This process's totals of the counters, written to PROGRESS_DIR_ENV's directory when it is set: at most once
    every FLUSH_SECONDS, and no later than that after an increment (COALESCE_SECONDS after it, at the soonest)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.directory: str | None = None
        self.counts: dict[str, int] = {}
        self.path = ""
        self.written = 0.0
        self.timer: threading.Timer | None = None

    def add(self, name: str, n: int) -> None:
        directory = os.environ.get(PROGRESS_DIR_ENV)
        if not directory:
            return
        with self.lock:
            if directory != self.directory:  # a new run: new totals, a new file
                self.directory, self.counts = directory, {}
                self.path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex}.json")
            self.counts[name] = self.counts.get(name, 0) + n
            if self.timer is None:  # what comes within the next COALESCE_SECONDS goes in the same write
                delay = max(COALESCE_SECONDS, FLUSH_SECONDS - (time.monotonic() - self.written))
                self.timer = threading.Timer(delay, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        with self.lock:
            self.timer, self.written = None, time.monotonic()
            if self.directory is None:  # closed: the run has ended
                return
            tmp = self.path + ".tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.counts, f)
                os.replace(tmp, self.path)  # the launcher reads whole files only
            except OSError:
                pass  # the launcher has gone, or removed the directory: progress is not worth failing for

    def close(self) -> None:
        """Write the last totals now and no more after: the launcher is about to remove the directory, and a write
        due later would race its removal."""
        self.flush()
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.directory, self.timer = None, None


_tally = _Tally()


def close_local_totals() -> None:
    """End this process's totals file (a local run's launcher calls it once its pipeline has finished)."""
    _tally.close()


class _WorkerLog:
    """Rows and tokens done by this worker process, shared by its threads."""
    lock = threading.Lock()
    start = last = time.monotonic()
    rows = tokens = 0

    @classmethod
    def add(cls, rows: int, tokens: int) -> None:
        with cls.lock:
            cls.rows, cls.tokens, now = cls.rows + rows, cls.tokens + tokens, time.monotonic()
            if now - cls.last >= LOG_SECONDS:
                cls.last = now
                level = logging.DEBUG if os.environ.get(PROGRESS_DIR_ENV) else logging.INFO
                log.log(level, "worker %d: %d rows, %d tokens, %.1f tokens/s", os.getpid(), cls.rows, cls.tokens,
                        cls.tokens / max(now - cls.start, 1e-9))


log_done = _WorkerLog.add  # add to this worker process's rows and tokens, logged every LOG_SECONDS
