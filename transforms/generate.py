"""Generation as a task of the batch skeleton (transforms/work.py): runs of requests -> completions with the GPT-2
generation graph (continuous batching: transforms/batching.py cuts the runs and sets their slots; a worker decodes a
run in parts of about `run_seconds` each, one Session.run per part, transforms/pacing.py).
"""
from __future__ import annotations

from typing import Sequence

from apache_beam.metrics import Metrics

from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, RUNS, group_key, run_slots
from transforms.pacing import TARGET_RUN_SECONDS, Pace, parts
from transforms.progress import NAMESPACE, TOKENS
from transforms.records import Request, Result
from transforms.resources import shared_model
from transforms.work import RunBatches, Task

_PACE = Pace()  # this worker process's generation rate, shared by its threads and DoFn instances


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


class Generation(Task):
    """Requests -> completions, `run_slots` rows decoded at a time (batch_size, fewer where max_batch_tokens says the
    cache would not fit); `stops` end a row in the graph as soon as its text holds one (Detokenize cuts it out
    after); logprobs: the graph also gives each token's log-probability (else it skips the log-sum-exp). A run is
    decoded in parts of about run_seconds of work each (transforms/pacing.py). A row's samples are one unit:
    retried together, never split between parts."""
    policy = RUNS
    name = "generation"
    requests_counter = "prompts"
    tokens_counter = TOKENS
    size_metric = "run_size"

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 stops: Sequence[str] = (), logprobs: bool = False, run_seconds: float = TARGET_RUN_SECONDS):
        self.batch_size, self.max_batch_tokens, self.stops = batch_size, max_batch_tokens, tuple(stops)
        self.logprobs, self.run_seconds = logprobs, run_seconds
        self.padding = Metrics.counter(NAMESPACE, "padding_tokens")

    def generate(self, model, requests: list[Request]) -> list:
        """The model's completions of the requests, as one run."""
        return model.generate([r.token_ids for r in requests], [r.params for r in requests], self.logprobs,
                              run_slots(requests, self.batch_size, self.max_batch_tokens), self.stops)

    def run(self, model, requests: list[Request]) -> list[Result]:
        done = self.generate(model, requests)
        return [Result(r, c.token_ids, c.finish_reason, model.precision, c.logprobs) for r, c in zip(requests, done)]

    def account(self, requests: list[Request], results: list[Result], seconds: float) -> tuple[int, int]:
        longest = max(len(r.token_ids) for r in requests)
        self.padding.inc(sum(longest - len(r.token_ids) for r in requests))
        tokens = sum(len(c.token_ids) for c in results)
        _PACE.record(tokens, seconds)
        return len(requests), tokens

    def units(self, batch: list[Request]) -> list[list[Request]]:
        return row_units(batch)

    def parts(self, units: list[list[Request]]):
        rows = [r for u in units for r in u]
        slots = run_slots(rows, self.batch_size, self.max_batch_tokens)
        return parts(units, _PACE, slots, lambda u: sum(r.params.max_new_tokens for r in u), self.run_seconds)

    def failure(self, unit: list[Request], error: Exception) -> str:
        r = unit[0]
        which = "" if r.num_samples == 1 else f" (samples {r.sample}..{unit[-1].sample} of {r.num_samples})"
        return f"generation failed{which}: {type(error).__name__}: {error}"


class GenerateBatches(RunBatches):
    """RunBatches of the generation task: list[Request] (a run) -> a Result per request."""

    def __init__(self, model_dir: str, precision: str = "auto", intra_threads: int | None = None,
                 logprobs: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, stops: Sequence[str] = (),
                 target_seconds: float = TARGET_RUN_SECONDS):
        super().__init__(Generation(batch_size, max_batch_tokens, stops, logprobs, target_seconds),
                         shared_model(model_dir, precision, intra_threads))
