"""Generate completions for runs of requests with the GPT-2 generation graph (continuous batching: transforms/
batching.py cuts the runs and sets their slots; a worker decodes a run in parts of about TARGET_RUN_SECONDS each,
one Session.run per part, transforms/pacing.py).

A DoFn rather than RunInference over our own ModelHandler: we batch by length upstream, and a failing batch must
be split and retried down to single rows so that one bad row costs only itself (a dead letter with its reason) and
never the batch, where RunInference dead-letters a failing batch whole. The model interface is the same idea as
RunInference's: load once (`GenerationModel(model_dir)`, through `Shared`, one per worker process whatever its
threads), then `generate(batch)`. `GPT2ModelHandler` (transforms/handler.py) is the same engine behind Beam's
`RunInference`, with the same split-and-retry inside a batch.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Iterator, Sequence, TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, group_key, run_slots
from transforms.pacing import TARGET_RUN_SECONDS, Pace, parts
from transforms.progress import PROGRESS_DIR_ENV, TOKENS, Counter
from transforms.records import ERRORS, Request, Result, row_dead_letter
from transforms.resources import shared_model

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0
T = TypeVar("T")
_PACE = Pace()  # this worker process's generation rate, shared by its threads and DoFn instances


class _Progress:
    """Rows and tokens done by this worker process, logged every PROGRESS_SECONDS (at DEBUG on a local run, where
    the launcher shows the whole job's progress)."""
    lock = threading.Lock()
    start = last = time.monotonic()
    rows = tokens = 0

    @classmethod
    def add(cls, rows: int, tokens: int) -> None:
        with cls.lock:
            cls.rows += rows
            cls.tokens += tokens
            now = time.monotonic()
            if now - cls.last >= PROGRESS_SECONDS:
                cls.last = now
                level = logging.DEBUG if os.environ.get(PROGRESS_DIR_ENV) else logging.INFO
                log.log(level, "worker %d: %d rows, %d tokens, %.1f tokens/s", os.getpid(), cls.rows, cls.tokens,
                        cls.tokens / max(now - cls.start, 1e-9))


def split_and_retry(generate: Callable[[Sequence[T]], list], batch: Sequence[T]) -> Iterator[tuple]:
    """Run `generate` on the batch; if it raises (e.g. out of memory), on each half, down to single rows.
    Yields (rows, completions, seconds) for each part that worked and (rows, exception, None) for each row that
    failed alone, in the batch's order."""
    start = time.perf_counter()
    try:
        completions = generate(batch)
    except Exception as e:  # noqa: BLE001 - any failure: halve the batch and try again
        if len(batch) > 1:
            log.warning("batch of %d failed (%s); retrying in halves", len(batch), e)
            half = len(batch) // 2
            yield from split_and_retry(generate, batch[:half])
            yield from split_and_retry(generate, batch[half:])
        else:
            yield batch, e, None
        return
    yield batch, completions, time.perf_counter() - start


def row_units(batch: list[Request]) -> list[list[Request]]:
    """The batch as consecutive runs of one row's samples (batching keeps them adjacent); a request that is its
    row's only sample is a run of its own."""
    units: list[list[Request]] = []
    for r in batch:
        if units and r.num_samples > 1 and group_key(units[-1][0]) == group_key(r):
            units[-1].append(r)
        else:
            units.append([r])
    return units


class GenerateBatches(beam.DoFn):
    """list[Request] (a run) -> Result per row; rows that fail alone go to ERRORS.

    A run is decoded `run_slots` rows at a time (batch_size, fewer where max_batch_tokens says the cache would not
    fit), in parts of about target_seconds of work each (transforms/pacing.py), each part's rows emitted when it
    ends; `stops` end a row in the graph as soon as its text holds one (Detokenize cuts it out after)."""

    def __init__(self, model_dir: str, precision: str = "auto", intra_threads: int | None = None,
                 logprobs: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, stops: Sequence[str] = (),
                 target_seconds: float = TARGET_RUN_SECONDS):
        self.model = shared_model(model_dir, precision, intra_threads)
        self.logprobs = logprobs  # ask the graph for each token's log-probability (else it skips the log-sum-exp)
        self.batch_size, self.max_batch_tokens, self.stops = batch_size, max_batch_tokens, tuple(stops)
        self.target_seconds = target_seconds
        self.prompts = Metrics.counter("gpt2", "prompts")
        self.generated = Counter(TOKENS)
        self.padding = Metrics.counter("gpt2", "padding_tokens")
        self.rejected = Metrics.counter("gpt2", "dead_letters")
        self.run_size = Metrics.distribution("gpt2", "run_size")
        self.latency = Metrics.distribution("gpt2", "batch_latency_ms")

    def setup(self):
        self._model = self.model.get()

    def teardown(self):
        self._model = None  # the last reference going closes the model's Session (GenerationModel's finalizer)

    def process(self, batch: list[Request]):
        def generate(units: Sequence[list[Request]]):
            rows = [r for u in units for r in u]
            return self._model.generate([r.token_ids for r in rows], [r.params for r in rows], self.logprobs,
                                        run_slots(rows, self.batch_size, self.max_batch_tokens), self.stops)

        slots = run_slots(batch, self.batch_size, self.max_batch_tokens)
        tokens = lambda unit: sum(r.params.max_new_tokens for r in unit)  # noqa: E731
        for part in parts(row_units(batch), _PACE, slots, tokens, self.target_seconds):
            yield from self._generate_part(generate, part)

    def _generate_part(self, generate, part: list[list[Request]]):
        # A row's samples are retried together: a failure halves the part between rows, never within one.
        for units, outcome, seconds in split_and_retry(generate, part):
            if isinstance(outcome, Exception):
                self.rejected.inc()
                r = units[0][0]
                which = "" if r.num_samples == 1 else \
                    f" (samples {units[0][0].sample}..{units[0][-1].sample} of {r.num_samples})"
                yield beam.pvalue.TaggedOutput(ERRORS, row_dead_letter(
                    r, f"generation failed{which}: {type(outcome).__name__}: {outcome}"))
                continue
            rows = [r for u in units for r in u]
            self.latency.update(int(seconds * 1000))
            self.run_size.update(len(rows))
            self.prompts.inc(len(rows))
            longest = max(len(r.token_ids) for r in rows)
            self.padding.inc(sum(longest - len(r.token_ids) for r in rows))
            tokens = sum(len(c.token_ids) for c in outcome)
            _PACE.record(tokens, seconds)
            self.generated.inc(tokens)
            _Progress.add(len(rows), tokens)
            for r, c in zip(rows, outcome):
                yield Result(r, c.token_ids, c.finish_reason, self._model.precision, c.logprobs)
