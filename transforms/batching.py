"""Length-aware batching decided by a cost model: full batches of similar prompts, cut only where it pays.

Every request gets the same key, so one GroupByKey brings the whole job together however its lengths are
spread (a length bucket as key split small jobs into many half-empty batches). The group is read in windows
of at most `WINDOW` requests, so memory is bounded by one window, not by the group. Each window is sorted by
(max_new_tokens, prompt length) and cut into consecutive batches by a greedy rule over `batch_cost`:

    walking the sorted window, the next request joins the open batch if the batch stays within `batch_size`
    rows and `max_batch_tokens` (rows x (longest prompt + largest max_new_tokens)), and if the batch's cost
    grows by no more than the request would cost as a batch of its own (the same useful tokens, no worse cost
    per useful token); otherwise the batch is emitted and the request opens the next one.

A decode step's fixed cost (every weight read once) is worth `STEP_FIXED_COST` rows, so on sorted input a
request almost always joins and batches come out full; a cut happens only at a large jump in prompt length
(the padding it would add to every row costs more than another batch) or in max_new_tokens (every row would
run the extra steps). A window's last, open batch is carried into the next window and sorted with it, so
only the job's last batch may be short, besides such cuts. The Reshuffle after it spreads the batches over
all workers; cutting is a sort of a few thousand requests, nothing next to generating them.

That GroupByKey fires when its input ends: right for files, never for a stream (in the global window, a stream
does not end). Unbounded input goes through `BatchByWait` instead: `GroupIntoBatches` on one key per worker process
(as Beam's own BatchElements does with a maximum wait) emits a batch when it holds `batch_size` requests or its
first request has waited `max_wait_secs`; each such batch is then sorted and cut by the same rule as above, so
`max_batch_tokens` holds and long and short prompts are not padded together.
"""
from __future__ import annotations

import itertools
import time
import uuid
from typing import Callable, Iterable, Iterator

import apache_beam as beam

from transforms.records import Request

WINDOW = 4096  # requests sorted and cut at a time: the memory bound of the cutting step
# Defaults from the measured throughput curve within the memory goal (a worker under 2 GB for 124M), GPT-2 124M
# bfloat16 on Sapphire Rapids (BENCHMARKS.md): 64 new tokens after 32-token prompts make ~400 tok/s at batch 32,
# ~550 at 64, ~665 at 128, ~740 at 256; peak RSS with 66 + 64 tokens per row 1.6 GB at 64 rows, 1.9 GB at 96,
# 2.15 GB at 128. So a batch may hold 128 rows, and at most 12288 rows x (longest prompt + new tokens).
DEFAULT_BATCH_SIZE = 128
DEFAULT_MAX_BATCH_TOKENS = 12288
# Costs in row-steps, the compute of one row through one decode step.
STEP_FIXED_COST = 16.0  # GPT-2 124M, Sapphire Rapids: a step is 32 ms at batch 1, 64 at 8, 150 at 64 (fits 6-34 rows)
PREFILL_TOKEN_COST = 0.4  # a prompt token in prefill costs a third to a half of a row-step (large matmuls run better)
ATTENTION_COST = 2e-4  # per cached token a row attends to: 4 x n_layer x n_embd flops vs 2 x 124M a row-step, 1.5e-4 up


def batch_cost(rows: int, longest_prompt: int, steps: int) -> float:
    """Cost in row-steps of one batch: prefill of the padded prompts, then `steps` decode steps, each a fixed cost
    (reading all weights) plus per-row compute, plus attention over a cache that grows from the longest prompt."""
    prefill = PREFILL_TOKEN_COST * rows * longest_prompt
    decode = steps * (STEP_FIXED_COST + rows)
    attention = ATTENTION_COST * rows * steps * (longest_prompt + steps / 2)
    return prefill + decode + attention


def sort_key(r: Request) -> tuple[int, int]:
    return r.params.max_new_tokens, len(r.token_ids)


def cut_batches(requests: Iterable[Request], batch_size: int, max_batch_tokens: int) -> Iterator[list[Request]]:
    """Consecutive batches of `requests` (in the order given: sort them first) by the rule in the module docstring.
    A request larger than `max_batch_tokens` on its own still gets a batch of its own."""
    batch: list[Request] = []
    longest = steps = 0
    for r in requests:
        n, s = len(r.token_ids), r.params.max_new_tokens
        grown_longest, grown_steps = max(longest, n), max(steps, s)
        rows = len(batch)
        if batch and (rows >= batch_size or (rows + 1) * (grown_longest + grown_steps) > max_batch_tokens
                      or batch_cost(rows + 1, grown_longest, grown_steps) - batch_cost(rows, longest, steps)
                      > batch_cost(1, n, s)):
            yield batch
            batch, grown_longest, grown_steps = [], n, s
        batch.append(r)
        longest, steps = grown_longest, grown_steps
    if batch:
        yield batch


def plan_batches(requests: Iterable[Request], batch_size: int, max_batch_tokens: int,
                 window: int = WINDOW) -> Iterator[list[Request]]:
    """All batches of a stream of requests: read `window` at a time, each sorted (with the open batch carried
    over from the window before) and cut by `cut_batches`."""
    it, carry = iter(requests), []
    while True:
        chunk = list(itertools.islice(it, window))
        if not chunk:
            break
        batches = list(cut_batches(sorted(carry + chunk, key=sort_key), batch_size, max_batch_tokens))
        carry = batches.pop()
        yield from batches
    if carry:
        yield carry


def _plan_group(kv, batch_size: int, max_batch_tokens: int, window: int) -> Iterator[list[Request]]:
    return plan_batches(kv[1], batch_size, max_batch_tokens, window)


class BatchByLength(beam.PTransform):
    """Request -> list[Request]."""

    def __init__(self, batch_size: int, max_batch_tokens: int, window: int = WINDOW):
        super().__init__()
        self.batch_size, self.max_batch_tokens, self.window = batch_size, max_batch_tokens, window

    def expand(self, requests):
        return (requests
                | "KeyAll" >> beam.Map(lambda r: (0, r))
                | "GroupAll" >> beam.GroupByKey()
                | "CutBatches" >> beam.FlatMap(_plan_group, self.batch_size, self.max_batch_tokens, self.window)
                | "SpreadBatches" >> beam.Reshuffle())


_PROCESS_KEY = uuid.uuid4().hex  # drawn where this module is imported: a different key in each worker process


class _KeyByProcess(beam.DoFn):
    def process(self, request: Request):
        yield _PROCESS_KEY, request


def _cut_group(kv, batch_size: int, max_batch_tokens: int) -> Iterator[list[Request]]:
    return cut_batches(sorted(kv[1], key=sort_key), batch_size, max_batch_tokens)


class BatchByWait(beam.PTransform):
    """Request -> list[Request] for unbounded input: a batch is cut when it is full or when its first request has
    waited max_wait_secs, never at the end of the input. `clock` (seconds, as time.time) is for tests, as
    GroupIntoBatches's."""

    def __init__(self, batch_size: int, max_batch_tokens: int, max_wait_secs: float,
                 clock: Callable[[], float] = time.time):
        super().__init__()
        if not max_wait_secs > 0:  # GroupIntoBatches reads 0 as "no limit": a stream's batch would wait forever
            raise ValueError(f"max_wait_secs must be > 0, got {max_wait_secs!r}")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.max_wait_secs, self.clock = max_wait_secs, clock

    def expand(self, requests):
        return (requests
                | "KeyByProcess" >> beam.ParDo(_KeyByProcess())
                | "GroupIntoBatches" >> beam.GroupIntoBatches(self.batch_size, self.max_wait_secs, self.clock)
                | "CutBatches" >> beam.FlatMap(_cut_group, self.batch_size, self.max_batch_tokens))
