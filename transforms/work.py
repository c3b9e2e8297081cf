"""The skeleton of batch work against the shared model: generation and scoring are each a `Task` run by it.

    rows -> Prepare (requests, or dead letters) -> Batch (the task's policy) -> RunBatches -> Format -> output rows

A task is what differs between kinds of work: how a row becomes requests (or its dead letter), its batching policy,
how a batch runs on the model, and how a result becomes an output row. `BatchWork` is the composite transform of
the stages above, which GenerateText and ScoreText configure. `RunBatches` runs any task's batches: the model once
per worker process (Beam's `Shared`), metrics, progress, and split-and-retry down to single rows, so that a bad row
costs only itself (a dead letter with its reason), where RunInference would dead-letter its batch whole. Prepare
and Format share one tokenizer per worker process. `Batching` is the batching in front of RunBatches.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, NamedTuple, TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, BatchByLength, BatchByWait, Policy
from transforms.progress import NAMESPACE, Counter, log_done
from transforms.records import ERRORS, with_keys
from transforms.resources import SharedResource, shared_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


class Done(NamedTuple):
    """What a task's run has done since it last said: the results of the units that have ended, by their index
    among the run's units, and the tokens done, those of units still going included (so that progress is true)."""
    results: dict[int, list]
    tokens: int


class Outcome(NamedTuple):
    """Units that ended, and their results in order (or, for a unit that failed alone, the exception); the tokens
    and seconds since the last outcome of the same call."""
    units: list[list]
    results: list | Exception
    tokens: int
    seconds: float


def split_and_retry(run: Callable[[list[list[T]]], Iterator[Done]], units: list[list[T]]) -> Iterator[Outcome]:
    """Run `run` on the units, an Outcome as each of its parts ends; if it raises (e.g. out of memory), the units
    it had not finished run again, in halves, down to single units, and a unit that fails alone is an Outcome of
    its exception."""
    left = dict(enumerate(units))
    start = time.perf_counter()
    try:
        for done in run(units):
            now = time.perf_counter()
            yield Outcome([left.pop(i) for i in sorted(done.results)],
                          [r for i in sorted(done.results) for r in done.results[i]], done.tokens, now - start)
            start = now
    except Exception as e:  # noqa: BLE001 - any failure: halve what is left and try again
        pending = list(left.values())
        if len(units) == 1:
            yield Outcome(pending, e, 0, 0.0)
            return
        log.warning("a run of %d units failed with %d left (%s); retrying those in halves", len(units),
                    len(pending), e)
        half = (len(pending) + 1) // 2
        for rest in (pending[:half], pending[half:]):
            if rest:
                yield from split_and_retry(run, rest)


class Task:
    """One kind of batch work. name: a failure's dead letter says "<name> failed: ...". stage: the label of its
    RunBatches step. requests_counter, tokens_counter (a progress counter), size_metric: the Beam metrics of
    requests and tokens done, and of the units each part ends."""
    policy: Policy
    name = "work"
    stage = "Run"
    requests_counter = "requests"
    tokens_counter = "tokens"
    size_metric = "batch_size"

    def prepare(self, tokenizer, row) -> list | dict:
        """An input row -> its requests, or its dead letter (a dict)."""
        raise NotImplementedError

    def format(self, tokenizer, result) -> dict:
        """A result -> its output row's own fields (Format adds the input row's passthrough keys and origin)."""
        raise NotImplementedError

    def run(self, model, units: list[list]) -> Iterator[Done]:
        """The units' results from the model (a result per request), as they end."""
        raise NotImplementedError

    def units(self, batch: list) -> list[list]:
        """The batch as units retried whole: a failure halves the units left, never a unit."""
        return [[r] for r in batch]

    def failure(self, unit: list, error: Exception) -> str:
        return f"{self.name} failed: {type(error).__name__}: {error}"


class RunBatches(beam.DoFn):
    """A batch of a task's requests -> a result per request; a unit that fails alone is a dead letter (ERRORS)."""

    def __init__(self, task: Task, model: SharedResource):
        self.task, self.model = task, model
        self.done = Metrics.counter(NAMESPACE, task.requests_counter)
        self.tokens = Counter(task.tokens_counter)
        self.rejected = Metrics.counter(NAMESPACE, "dead_letters")
        self.size = Metrics.distribution(NAMESPACE, task.size_metric)
        self.latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")

    def setup(self):
        self._model = self.model.get()

    def teardown(self):
        self._model = None  # the last reference going closes the model's Session (GenerationModel's finalizer)

    def process(self, batch: list):
        task = self.task
        for units, results, tokens, seconds in split_and_retry(lambda units: task.run(self._model, units),
                                                               task.units(batch)):
            if isinstance(results, Exception):
                self.rejected.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, units[0][0].dead_letter(task.failure(units[0], results)))
                continue
            self.latency.update(int(seconds * 1000))
            if units:
                self.size.update(len(results))
            self.done.inc(len(results))
            self.tokens.inc(tokens)
            log_done(len(results), tokens)
            yield from results


@dataclasses.dataclass(frozen=True)
class Batching:
    """How GenerateText's and ScoreText's requests are batched; streaming None: by the input's boundedness."""
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    streaming: bool | None = None
    max_wait_secs: float = 1.0
    clock: Callable[[], float] = time.time

    def __post_init__(self):
        for name, value in (("batch_size", self.batch_size), ("max_batch_tokens", self.max_batch_tokens)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_wait_secs > 0:
            raise ValueError(f"max_wait_secs must be > 0, got {self.max_wait_secs!r}")

    def transform(self, policy: Policy, bounded: bool) -> beam.PTransform:
        """Requests -> batches by `policy`: bounded input in one group, unbounded by size or wait."""
        if (not bounded) if self.streaming is None else self.streaming:
            return BatchByWait(self.batch_size, self.max_batch_tokens, self.max_wait_secs, self.clock, policy)
        return BatchByLength(self.batch_size, self.max_batch_tokens, policy=policy)


class TaskDoFn(beam.DoFn):
    """A DoFn of a task's own step, with the worker process's tokenizer (`tokenizer`, a SharedResource) as `_tok`."""

    def __init__(self, task: Task, tokenizer: SharedResource):
        self.task, self.tokenizer = task, tokenizer

    def setup(self):
        self._tok = self.tokenizer.get()

    def teardown(self):
        self._tok = None  # the last reference going frees the shared tokenizer


class Prepare(TaskDoFn):
    """An input row -> its requests (the task's `prepare`), or its dead letter (ERRORS)."""

    def process(self, row):
        prepared = self.task.prepare(self._tok, row)
        if isinstance(prepared, dict):
            Metrics.counter(NAMESPACE, "dead_letters").inc()
            yield beam.pvalue.TaggedOutput(ERRORS, prepared)
        else:
            yield from prepared


class Format(TaskDoFn):
    """A result -> its output row: the task's `format`, then the input row's passthrough keys (and a file row's
    source and row_index)."""

    def process(self, result):
        yield with_keys(self.task.format(self._tok, result), result.request.origin())


class BatchWork(beam.PTransform):
    """PCollection of rows -> result_type(output rows, dead letters): Prepare -> Batch -> `run` -> Format.
    run: the RunBatches of the task; model_dir: the tokenizer's, one handle for Prepare and Format (one load per
    worker process)."""
    result_type: type  # a NamedTuple of the two

    def __init__(self, run: RunBatches, batching: Batching, model_dir: str):
        super().__init__()
        self.run, self.batching, self.tokenizer = run, batching, shared_tokenizer(model_dir)

    def expand(self, rows):
        task = self.run.task
        prepared = rows | "Prepare" >> beam.ParDo(Prepare(task, self.tokenizer)).with_outputs(ERRORS, main="ok")
        results = (prepared.ok
                   | "Batch" >> self.batching.transform(task.policy, rows.is_bounded)
                   | task.stage >> beam.ParDo(self.run).with_outputs(ERRORS, main="ok"))
        outputs = results.ok | "Format" >> beam.ParDo(Format(task, self.tokenizer))
        return self.result_type(outputs, (prepared[ERRORS], results[ERRORS]) | "Errors" >> beam.Flatten())
