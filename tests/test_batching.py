"""Batching: runs for continuous batching (generation); the cost model (scoring, RunInference): full batches on
ordinary input, cuts only where padding costs more than a batch."""
from __future__ import annotations

import collections
import random

import apache_beam as beam
from apache_beam.testing.util import assert_that

from lmgraph.sampling import SamplingParams
from transforms.batching import (BATCHES, RUN_ROWS_PER_SLOT, BatchByLength, batch_cost, cut_batches, plan_batches,
                                 run_slots)
from transforms.records import Request

BIG = 1 << 30  # a max_batch_tokens that never binds


def req(i: int, length: int, new_tokens: int = 64) -> Request:
    return Request(f"r{i}", "", [7] * length, SamplingParams(max_new_tokens=new_tokens), "in.parquet", i)


def random_requests(count: int, lo: int, hi: int, new_tokens: int = 64, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [req(i, rng.randint(lo, hi), new_tokens) for i in range(count)]


def padding_fraction(batches) -> float:
    slots = sum(len(b) * max(len(r.token_ids) for r in b) for b in batches)
    return 1 - sum(len(r.token_ids) for b in batches for r in b) / slots


def assert_each_once(requests, batches):
    seen = collections.Counter(r.id for b in batches for r in b)
    assert seen == collections.Counter(r.id for r in requests)
    assert max(seen.values()) == 1


def test_the_reported_job_gets_full_batches():
    """The user's report: 256 prompts of 1-66 tokens, 64 new tokens, batch 32 made 20 batches; now 8 full ones."""
    requests = random_requests(256, 1, 66)
    batches = list(plan_batches(requests, 32, 16384, policy=BATCHES))
    assert [len(b) for b in batches] == [32] * 8
    assert_each_once(requests, batches)
    # No 8 batches of 32 can pad less: batch k's longest prompt is at least the (32k)-th shortest prompt. On
    # uniform lengths 1..66 that optimum is itself ~10% (eight batches each span ~8 lengths); arrival order ~50%.
    lengths = sorted(len(r.token_ids) for r in requests)
    best_slots = sum(32 * lengths[32 * k - 1] for k in range(1, 9))
    slots = sum(len(b) * max(len(r.token_ids) for r in b) for b in batches)
    assert slots == best_slots
    assert padding_fraction(batches) < 0.125
    assert padding_fraction([requests[i:i + 32] for i in range(0, 256, 32)]) > 0.4


def test_many_long_prompts_pad_little_and_fill_batches():
    requests = random_requests(10_000, 1, 1000)
    batches = list(plan_batches(requests, 64, BIG, policy=BATCHES))
    assert_each_once(requests, batches)
    assert padding_fraction(batches) < 0.05
    assert sum(len(b) < 64 for b in batches) <= 2 and len(batches) <= 10_000 // 64 + 2


def test_batches_stay_within_both_bounds_and_oversized_requests_run_alone():
    rng = random.Random(1)
    requests = [req(i, rng.randint(1, 400), rng.choice([8, 64, 200])) for i in range(500)]
    requests.append(req(500, 3000, 64))  # bigger than max_batch_tokens on its own
    batches = list(plan_batches(requests, 16, 2000, block=128, policy=BATCHES))
    assert_each_once(requests, batches)
    for b in batches:
        assert len(b) <= 16
        if len(b) > 1:
            assert len(b) * (max(len(r.token_ids) for r in b) + max(r.params.max_new_tokens for r in b)) <= 2000
    assert [b for b in batches if any(r.id == "r500" for r in b)] == [[requests[500]]]


def test_every_request_once_across_block_boundaries():
    requests = random_requests(103, 1, 50, seed=2)
    batches = list(plan_batches(requests, 5, BIG, block=7, policy=BATCHES))
    assert_each_once(requests, batches)
    assert [len(b) for b in batches[:-1]] == [5] * 20 and len(batches[-1]) == 3  # a block's open batch carries over

    rng = random.Random(3)
    mixed = [req(i, rng.randint(1, 900), rng.choice([1, 4, 64, 512])) for i in range(1001)]
    assert_each_once(mixed, list(plan_batches(mixed, 8, 4096, block=10, policy=BATCHES)))
    assert list(plan_batches([], 8, 4096, policy=BATCHES)) == []


def test_cost_model_cuts_far_apart_lengths_and_keeps_near_ones_together():
    far = [req(i, 2, 4) for i in range(20)] + [req(20 + i, 900, 4) for i in range(20)]
    batches = list(plan_batches(far, 64, BIG, policy=BATCHES))
    assert sorted({len(r.token_ids) for r in b} for b in batches) == [{2}, {900}]
    assert [len(b) for b in batches] == [20, 20]

    near = [req(i, 10) for i in range(20)] + [req(20 + i, 14) for i in range(20)]
    assert [len(b) for b in plan_batches(near, 64, BIG, policy=BATCHES)] == [40]

    # 512 steps for rows that want 4 cost more than a second batch
    steps = [req(i, 10, 4) for i in range(20)] + [req(20 + i, 10, 512) for i in range(20)]
    batches = plan_batches(steps, 64, BIG, policy=BATCHES)
    assert sorted({r.params.max_new_tokens for r in b} for b in batches) == [{4}, {512}]


def test_cut_batches_keeps_the_given_order():
    """cut_batches does not sort: arrival order in, consecutive batches out."""
    requests = random_requests(50, 1, 30, seed=4)
    batches = list(cut_batches(requests, 8, BIG))
    assert [r for b in batches for r in b] == requests and [len(b) for b in batches] == [8] * 6 + [2]


def test_batch_cost_matches_the_measured_step_times():
    """Decode steps at batch 1 / 8 / 64 took 32 / 64 / 150 ms: the per-row cost must fall with the batch,
    and stay within 2x of those ratios."""
    per_step = {b: batch_cost(b, 1, 100) - batch_cost(b, 1, 99) for b in (1, 8, 64)}
    assert 1 < per_step[8] / per_step[1] < 4 and 150 / 64 / 2 < per_step[64] / per_step[8] < 150 / 64 * 2
    assert per_step[64] / 64 < per_step[8] / 8 < per_step[1]
    assert batch_cost(4, 100, 10) > batch_cost(4, 50, 10) and batch_cost(4, 50, 20) > batch_cost(4, 50, 10)


def test_beam_transform_emits_every_request_once():
    requests = [req(i, 1 + i % 30, 8) for i in range(100)]

    def check(batches):
        ids = sorted(r.id for b in batches for r in b)
        assert ids == sorted(r.id for r in requests), ids
        assert sorted(len(b) for b in batches) == [4] + [16] * 6, [len(b) for b in batches]

    with beam.Pipeline(runner="FnApiRunner") as p:
        batches = p | beam.Create(requests) | BatchByLength(16, BIG, block=32, policy=BATCHES)
        assert_that(batches, check)


def test_runs_sort_by_prompt_length_and_hold_a_fixed_number_of_requests_per_slot():
    """Generation's runs (continuous batching): sorted by prompt length only (max_new_tokens may differ within a
    run: a row that ends frees its slot), RUN_ROWS_PER_SLOT x batch_size requests each, across blocks."""
    rng = random.Random(3)
    requests = [req(i, rng.randint(1, 66), rng.randint(1, 128)) for i in range(1000)]
    runs = list(plan_batches(requests, 16, BIG))
    assert_each_once(requests, runs)
    per_run = 16 * RUN_ROWS_PER_SLOT
    assert [len(r) for r in runs] == [per_run] * (1000 // per_run) + [1000 % per_run]
    lengths = [len(r.token_ids) for run in runs for r in run]
    assert lengths == sorted(lengths)  # one block: the whole job in prompt-length order
    assert len({r.params.max_new_tokens for r in runs[0]}) > 10
    runs = list(plan_batches(requests, 16, BIG, block=300))
    assert_each_once(requests, runs)
    assert all(len(r) <= per_run for r in runs) and sum(len(r) < per_run for r in runs) <= 1


def test_run_slots_come_from_the_memory_budget():
    run = [req(i, 10 + i, 20) for i in range(50)]  # each slot's cache: longest prompt 59 + 20 new tokens = 79
    assert run_slots(run, 128, 12288) == 50  # no more slots than rows
    assert run_slots(run, 16, 12288) == 16  # batch_size
    assert run_slots(run, 128, 79 * 10 + 78) == 10  # max_batch_tokens
    assert run_slots(run, 128, 10) == 1  # a row always runs


def test_a_run_stretches_its_slots_a_little_when_that_saves_a_wave():
    run = [req(i, 66) for i in range(256)]  # 130 positions a row: 16384 allows 126 slots
    assert run_slots(run, 128, 16384) == 128  # two waves, not 126 + 126 + 4 (a cache 1.6% over the budget)
    assert run_slots(run[:252], 128, 16384) == 126  # whole waves already
    assert run_slots(run, 128, 120 * 130) == 120  # 128 would be 6.7% over: three waves (120 + 120 + 16)
    assert run_slots(run, 127, 16384) == 126  # never beyond batch_size
