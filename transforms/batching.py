"""Batching: runs of requests for continuous batching (generation), cost-model batches of texts (scoring).

Generation (policy RUNS) hands the engine runs of up to RUN_ROWS_PER_SLOT x batch_size requests, decoded in slots, a
row that ends freeing its slot for the next (lmgraph/model.py). So a run need not hold rows of like max_new_tokens, and
it is sorted by prompt length only: the engine prefills the requests it admits together padded to the longest, so
neighbours in that order keep padding low. Its slots come from the memory budget (`run_slots`). A row's samples
share a prompt, prefilled once: the sort keeps them adjacent, and a run holds them all unless they alone exceed it.

Scoring (policy SCORE_BATCHES) cuts sorted texts greedily, each of a text's windows (transforms/score_text.py) a row:
the next text joins the open batch if the batch stays within `batch_size` windows and `max_batch_tokens` (windows x
longest) and its cost (`score_cost`: a forward pass reads every weight once, worth STEP_FIXED_COST rows) grows by no
more than the text would cost alone. So batches come out full, cut only at a large jump in length. `BATCHES` is the
same rule for generation requests (`batch_cost`): batches without refill, which bench.pipeline_job compares with.

Bounded input: one key for every request, so one GroupByKey brings the whole job together however its lengths are
spread (a length bucket as key would split small jobs into half-empty batches). The group is read `BLOCK` requests at
a time, so memory is bounded by one block; each block is sorted and cut, its open batch carried into the next, so
only the job's last batch may be short. A Reshuffle then spreads the batches over the workers. Unbounded input never
ends (a GroupByKey in the global window would never fire): `BatchByWait` groups by one key per worker process with
`GroupIntoBatches` (a batch at `batch_size` requests or when its first has waited `max_wait_secs`), then sorts and
cuts each group by the same policy.

The RunInference handler (transforms/handler.py) batches by RunInference's BatchElements; each of its batches is one
run, sorted and given slots as here.
"""
from __future__ import annotations

import itertools
import time
import uuid
from typing import Callable, Iterable, Iterator, NamedTuple

import apache_beam as beam

from transforms.records import Request

BLOCK = 4096  # requests sorted and cut at a time: the memory bound of the cutting step
# Defaults from the measured throughput curve within the memory goal (a worker under 2 GB for 124M), GPT-2 124M
# bfloat16 on Sapphire Rapids (BENCHMARKS.md): 64 new tokens after 32-token prompts make ~400 tok/s at batch 32,
# ~550 at 64, ~665 at 128, ~740 at 256. So a batch may hold 128 rows, and at 124M at most 16384 rows x (longest
# prompt + new tokens): the 1024 x 64 job (rows of up to 66 + 64) then runs 126 slots (128 stretched, run_slots),
# 1.19x the tokens/s of 12288's 94, and peaks at 1870 MiB (bfloat16) / 1860 (int8) on AMD Zen 5, under 2 GB
# (1907 MiB) by little (max_batch_tokens_for: other sizes).
DEFAULT_BATCH_SIZE = 128
DEFAULT_MAX_BATCH_TOKENS = 16384
LARGE_MODEL_MAX_BATCH_TOKENS = 12288  # in 124M positions' cache bytes: the budget of models larger than 124M
# A run holds up to this many requests per slot: the slots drain at a run's end (its last rows finish with fewer
# neighbours), about one row's length of steps at falling occupancy, so the longer the run, the smaller that share
# (with max_new_tokens spread evenly over 1..2x the mean: ~10% at 8 requests per slot).
RUN_ROWS_PER_SLOT = 8
SLOT_STRETCH = 32  # a run may exceed its slots' budget by 1/SLOT_STRETCH to save a wave (run_slots)
# Costs in row-steps, the compute of one row through one decode step.
STEP_FIXED_COST = 16.0  # GPT-2 124M, Sapphire Rapids: a step is 32 ms at batch 1, 64 at 8, 150 at 64 (fits 6-34 rows)
PREFILL_TOKEN_COST = 0.4  # a prompt token in prefill costs a third to a half of a row-step (large matmuls run better)
ATTENTION_COST = 2e-4  # per cached token a row attends to: 4 x n_layer x n_embd flops vs 2 x 124M a row-step, 1.5e-4 up


def batch_cost(rows: int, longest_prompt: int, steps: int, prompts: int | None = None) -> float:
    """Cost in row-steps of one batch: prefill of the padded prompts, then `steps` decode steps, each a fixed cost
    (reading all weights) plus per-row compute, plus attention over a cache that grows from the longest prompt.
    prompts: the distinct prompts among the rows (default: as many as rows); the engine prefills each once, so the
    samples of one prompt pay its prefill once."""
    prefill = PREFILL_TOKEN_COST * (rows if prompts is None else prompts) * longest_prompt
    decode = steps * (STEP_FIXED_COST + rows)
    attention = ATTENTION_COST * rows * steps * (longest_prompt + steps / 2)
    return prefill + decode + attention


def score_cost(rows: int, longest: int, steps: int = 0, prompts: int | None = None) -> float:
    """Cost in row-steps of scoring `rows` texts padded to `longest` tokens: one forward pass, a prefill with no
    decode steps (`steps` and `prompts` are ignored: every text is its own prompt). The pass reads all weights
    once, as a decode step does (STEP_FIXED_COST), and attends over the text so far at each position."""
    return STEP_FIXED_COST + PREFILL_TOKEN_COST * rows * longest + ATTENTION_COST * rows * longest * longest / 2


def group_key(r: Request) -> tuple:
    """What the samples of one row share, () for a request that is its row's only sample: its prompt's tokens and
    the row (source file, row index, id). Read with getattr: anything with token_ids and params batches too."""
    if getattr(r, "num_samples", 1) > 1:
        return tuple(r.token_ids), r.source or "", r.row_index, str(r.id)
    return ()


def sort_key(r: Request) -> tuple:
    """(max_new_tokens, prompt length), then a row's samples next to each other, in sample order."""
    return r.params.max_new_tokens, len(r.token_ids), group_key(r), getattr(r, "sample", 0)


def _group_of(r: Request):
    """The key of the group of requests that must stay adjacent (a row's samples), or None."""
    key = group_key(r)
    return (r.params.max_new_tokens, key) if key else None


class _Unit(NamedTuple):
    """Requests that go into one batch together: rows of which `prompts` distinct prompts, padded to `longest`
    tokens, `steps` decode steps."""
    items: list
    rows: int
    prompts: int
    longest: int
    steps: int


def _cut_units(units: Iterable[_Unit], batch_size: int, max_batch_tokens: int,
               cost: Callable[..., float] | None) -> Iterator[list]:
    """The greedy rule of the module docstring over units instead of single requests: a unit joins the open batch
    whole or opens the next one; a unit larger than a batch on its own still gets a batch of its own. cost None: cut
    by the bounds alone."""
    batch: list = []
    rows = prompts = longest = steps = 0
    for u in units:
        grown_longest, grown_steps = max(longest, u.longest), max(steps, u.steps)
        if batch and (rows + u.rows > batch_size
                      or (rows + u.rows) * (grown_longest + grown_steps) > max_batch_tokens
                      or cost is not None and cost(rows + u.rows, grown_longest, grown_steps, prompts + u.prompts)
                      - cost(rows, longest, steps, prompts) > cost(u.rows, u.longest, u.steps, u.prompts)):
            yield batch
            batch, rows, prompts, grown_longest, grown_steps = [], 0, 0, u.longest, u.steps
        batch.extend(u.items)
        rows, prompts = rows + u.rows, prompts + u.prompts
        longest, steps = grown_longest, grown_steps
    if batch:
        yield batch


def _sample_units(requests: Iterable[Request], batch_size: int, max_batch_tokens: int) -> Iterator[_Unit]:
    """Consecutive requests of one row's samples as one unit, split only where the group alone exceeds
    `batch_size` rows or `max_batch_tokens`; every other request a unit of its own."""
    def units(group: list) -> Iterator[_Unit]:
        n, s = len(group[0].token_ids), group[0].params.max_new_tokens
        per = max(1, min(batch_size, max_batch_tokens // (n + s)))
        for i in range(0, len(group), per):
            yield _Unit(group[i:i + per], len(group[i:i + per]), 1, n, s)

    group: list = []
    key = None
    for r in requests:
        k = _group_of(r)
        if group and (k is None or k != key):
            yield from units(group)
            group = []
        group.append(r)
        key = k
    if group:
        yield from units(group)


def cut_batches(requests: Iterable[Request], batch_size: int, max_batch_tokens: int) -> Iterator[list[Request]]:
    """Consecutive batches of `requests` (in the order given: sort them first) by the rule in the module docstring.
    The samples of one row (adjacent after sorting by `sort_key`) stay in one batch unless they alone exceed
    `batch_size` or `max_batch_tokens`. A request larger than `max_batch_tokens` on its own still gets a batch of
    its own."""
    return _cut_units(_sample_units(requests, batch_size, max_batch_tokens), batch_size, max_batch_tokens,
                      batch_cost)


def score_sort_key(r) -> tuple[int, int]:
    """A text to score (anything with `windows`, lists of token ids): its longest window, then its windows."""
    return max(len(w) for w in r.windows), len(r.windows)


def cut_score_batches(requests: Iterable, batch_size: int, max_batch_tokens: int) -> Iterator[list]:
    """Batches of texts to score, by the same rule with `score_cost`, a window counting as a row. A text's windows
    stay in one batch: a text with more than a batch of windows is a batch of its own (scored a batch of windows
    per run)."""
    units = (_Unit([r], len(r.windows), len(r.windows), max(len(w) for w in r.windows), 0) for r in requests)
    return _cut_units(units, batch_size, max_batch_tokens, score_cost)


def cut_windows(windows: Iterable[tuple], batch_size: int, max_batch_tokens: int) -> Iterator[list]:
    """Consecutive runs of windows (tuples whose second item is the window's token ids) of at most batch_size
    windows and max_batch_tokens (windows x longest): one Session.run each."""
    return _cut_units((_Unit([w], 1, 1, len(w[1]), 0) for w in windows), batch_size, max_batch_tokens, None)


class Policy(NamedTuple):
    """How one kind of work is sorted and cut into batches; group: the key of requests that must stay adjacent
    across a block's boundary (None: none)."""
    sort_key: Callable
    cut: Callable[[Iterable, int, int], Iterator[list]]
    group: Callable


def run_sort_key(r: Request) -> tuple:
    """Prompt length, then a row's samples next to each other, in sample order."""
    return len(r.token_ids), group_key(r), getattr(r, "sample", 0)


def cut_runs(requests: Iterable[Request], batch_size: int) -> Iterator[list[Request]]:
    """Consecutive runs of up to batch_size x RUN_ROWS_PER_SLOT requests (in the order given: sort them first).
    A row's samples stay in one run (they share a prefill) unless they alone exceed it."""
    limit = batch_size * RUN_ROWS_PER_SLOT
    run: list[Request] = []
    for u in _sample_units(requests, limit, 1 << 62):
        if run and len(run) + u.rows > limit:
            yield run
            run = []
        run.extend(u.items)
    if run:
        yield run


def max_batch_tokens_for(n_layer: int, kv_width: int, scoring: bool = False) -> int:
    """A model's default max_batch_tokens, as KV cache bytes (a position's cache grows with n_layer x kv_width, the
    key/value heads' width: n_embd for GPT-2, less with grouped-query attention, which so gets more positions).
    124M and smaller: the bytes of DEFAULT_MAX_BATCH_TOKENS positions at 124M (576 MiB in bfloat16), within its
    2 GB goal. Larger models: those of LARGE_MODEL_MAX_BATCH_TOKENS at 124M (432 MiB): 4608 positions at 355M,
    2457 at 774M, 1474 at 1.5B, whose job then peaks at 4.92 GB against its goal of 1.3x its weights + 1 GB
    (5.06 GB); 124M's budget would put it past that. BENCHMARKS.md has the measurements. Scoring keeps the
    larger models' budget at every size: its memory is its windows' (T, T) attention, not a cache, and was not
    measured at 124M's larger one."""
    per_position = n_layer * kv_width
    small = per_position <= 12 * 768 and not scoring
    at_124m = DEFAULT_MAX_BATCH_TOKENS if small else LARGE_MODEL_MAX_BATCH_TOKENS
    return max(1, at_124m * 12 * 768 // per_position)


def run_slots(requests: list, batch_size: int, max_batch_tokens: int) -> int:
    """The slots of a run: batch_size, fewer where the KV cache would exceed max_batch_tokens positions (each
    slot holds the run's longest prompt + its largest max_new_tokens), and no more than the run has rows. A run
    that fills its slots several times over may take up to 1/SLOT_STRETCH more slots than the budget allows when
    that saves it a wave: rows of like max_new_tokens decode in waves, and a last wave of a few rows costs nearly
    a whole wave's steps (each step reads every weight). 256 rows of up to 66 + 64 positions at 16384: 126 slots
    would run 126 + 126 + 4 rows, 128 run two waves (a cache 1.6% over the budget)."""
    width = max(len(r.token_ids) for r in requests) + max(r.params.max_new_tokens for r in requests)
    rows = len(requests)
    slots = max(1, min(batch_size, max_batch_tokens // width, rows))
    waves = -(-rows // slots)
    if waves > 1:
        stretched = -(-rows // (waves - 1))  # the slots that run the rows in one wave fewer
        if stretched <= min(batch_size, slots + slots // SLOT_STRETCH):
            return stretched
    return slots


# A run's memory bound is its slots' (run_slots), set where it is decoded: cut_runs does not need max_batch_tokens.
RUNS = Policy(run_sort_key, lambda requests, batch_size, _max_batch_tokens: cut_runs(requests, batch_size), _group_of)
BATCHES = Policy(sort_key, cut_batches, _group_of)  # generation requests in cost-model batches (no refill)
SCORE_BATCHES = Policy(score_sort_key, cut_score_batches, lambda r: None)


def plan_batches(requests: Iterable[Request], batch_size: int, max_batch_tokens: int,
                 block: int = BLOCK, policy: Policy = RUNS) -> Iterator[list[Request]]:
    """All batches of a stream of requests: read `block` at a time (and on to the end of the last one's row: a
    row's samples arrive together), each sorted (with the open batch carried over from the block before) and cut
    by the policy."""
    it, carry, held = iter(requests), [], None
    while True:
        chunk = [] if held is None else [held]
        held = None
        chunk.extend(itertools.islice(it, block - len(chunk)))
        if not chunk:
            break
        key = policy.group(chunk[-1])
        if key is not None:
            for r in it:
                if policy.group(r) != key:
                    held = r
                    break
                chunk.append(r)
        batches = list(policy.cut(sorted(carry + chunk, key=policy.sort_key), batch_size, max_batch_tokens))
        carry = batches.pop()
        yield from batches
    if carry:
        yield carry


def _plan_group(kv, batch_size: int, max_batch_tokens: int, block: int, policy: Policy) -> Iterator[list[Request]]:
    return plan_batches(kv[1], batch_size, max_batch_tokens, block, policy)


class BatchByLength(beam.PTransform):
    """Request -> list[Request] for bounded input (policy SCORE_BATCHES: texts to score -> batches of them)."""

    def __init__(self, batch_size: int, max_batch_tokens: int, block: int = BLOCK, policy: Policy = RUNS):
        super().__init__()
        self.batch_size, self.max_batch_tokens, self.block = batch_size, max_batch_tokens, block
        self.policy = policy

    def expand(self, requests):
        return (requests
                | "KeyAll" >> beam.Map(lambda r: (0, r))
                | "GroupAll" >> beam.GroupByKey()
                | "CutBatches" >> beam.FlatMap(_plan_group, self.batch_size, self.max_batch_tokens, self.block,
                                                  self.policy)
                | "SpreadBatches" >> beam.Reshuffle())


_PROCESS_KEY = uuid.uuid4().hex  # drawn where this module is imported: a different key in each worker process


class _KeyByProcess(beam.DoFn):
    def process(self, request: Request):
        yield _PROCESS_KEY, request


def _cut_group(kv, batch_size: int, max_batch_tokens: int, policy: Policy) -> Iterator[list[Request]]:
    return policy.cut(sorted(kv[1], key=policy.sort_key), batch_size, max_batch_tokens)


class BatchByWait(beam.PTransform):
    """Request -> list[Request] for unbounded input: a batch is cut when it is full or when its first request has
    waited max_wait_secs, never at the end of the input. `clock` (seconds, as time.time) is for tests, as
    GroupIntoBatches's."""

    def __init__(self, batch_size: int, max_batch_tokens: int, max_wait_secs: float,
                 clock: Callable[[], float] = time.time, policy: Policy = RUNS):
        super().__init__()
        if not max_wait_secs > 0:  # GroupIntoBatches reads 0 as "no limit": a stream's batch would wait forever
            raise ValueError(f"max_wait_secs must be > 0, got {max_wait_secs!r}")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.max_wait_secs, self.clock, self.policy = max_wait_secs, clock, policy

    def expand(self, requests):
        return (requests
                | "KeyByProcess" >> beam.ParDo(_KeyByProcess())
                | "GroupIntoBatches" >> beam.GroupIntoBatches(self.batch_size, self.max_wait_secs, self.clock)
                | "CutBatches" >> beam.FlatMap(_cut_group, self.batch_size, self.max_batch_tokens, self.policy))
