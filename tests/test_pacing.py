"""Runs bounded in time: a worker decodes a run in parts sized from its own measured rate, whole slot-fulls, the
first one small; every row comes out once, as it would alone."""
from __future__ import annotations

import numpy as np

from lmgraph.sampling import SamplingParams
from transforms import generate as generate_module
from transforms.generate import GenerateBatches, Generation
from transforms.pacing import Pace, part_rows, parts
from transforms.records import Request


def test_the_first_part_leaves_whole_slot_fulls_and_later_ones_hold_the_target_seconds():
    assert part_rows(None, 126, 64, 256) == 4  # then 252: two whole slot-fulls
    assert part_rows(None, 126, 64, 1024) == 16
    assert part_rows(None, 128, 64, 1024) == 128  # whole slot-fulls already: one of them
    assert part_rows(None, 125, 32, 64) == 64  # fewer rows than a slot-full: all of them
    assert part_rows(None, 128, 64, 5) == 5
    # 540 tokens/s, 64 tokens a row, 30 s: 253 rows -> 1 slot-full of 128 (whole slot-fulls, rounded down)
    assert part_rows(540.0, 128, 64, 1024, 30.0) == 128
    assert part_rows(540.0, 128, 64, 1024, 60.0) == 506 // 128 * 128
    assert part_rows(20.0, 128, 64, 1024, 30.0) == 128  # a slow model: still one slot-full, never less
    assert part_rows(540.0, 128, 64, 1024 - 128 * 7 + 100, 30.0) == 228  # a remainder under a slot-full joins


def test_the_rate_follows_the_newest_parts():
    pace = Pace()
    assert pace.rate is None
    pace.record(1000, 10.0)
    assert pace.rate == 100.0
    pace.record(3000, 10.0)
    assert pace.rate == 200.0  # halfway to the newest part's 300
    pace.record(0, 0.0)  # a part with nothing generated changes nothing
    assert pace.rate == 200.0


def test_parts_keep_a_rows_samples_together_and_cover_every_unit_once_in_order():
    units = [[f"a{i}"] for i in range(20)] + [[f"s{k}" for k in range(5)]] + [[f"b{i}"] for i in range(30)]
    pace = Pace()
    got = []
    for part in parts(units, pace, slots=4, tokens=lambda u: 8 * len(u), target_seconds=1.0):
        got.append(part)
        pace.record(32, 1.0)  # 32 tokens/s: 1 s holds 4 rows of 8 tokens, one slot-full
    assert [u for part in got for u in part] == units
    assert sum(len(u) for u in got[0]) == 55 % 4  # the rows beyond whole slot-fulls
    assert all(sum(len(u) for u in part) <= 8 for part in got[1:-1])  # one slot-full, or a unit that overflows it
    assert max(sum(len(u) for u in part) for part in got[1:]) > 4  # the 5 samples overflowed a slot-full whole


def test_a_run_is_decoded_longest_prompts_first(monkeypatch):
    """A run comes sorted by prompt length; its parts take the longest first, so the first large part sizes the
    KV cache buffer that the later ones reuse."""
    monkeypatch.setattr(generate_module, "_PACE", Pace())
    run = [Request(f"r{i}", "", [7] * (i + 1), SamplingParams(max_new_tokens=8), "in.parquet", i) for i in range(10)]
    task = Generation(batch_size=4)
    got = list(task.parts(task.units(run)))
    assert [sum(len(u) for u in part) for part in got] == [2, 4, 4]
    assert [len(r.token_ids) for part in got for u in part for r in u] == list(range(10, 0, -1))


def test_a_run_in_parts_gives_every_row_what_it_gets_alone(model_dir, model, monkeypatch):
    """42 requests, 4 slots, a target so short that every part after the first (the 2 rows beyond whole
    slot-fulls) is one slot-full: each row's completion is the engine's for that row alone, and the run took
    several Session.runs."""
    monkeypatch.setattr(generate_module, "_PACE", Pace())  # no rate from earlier tests
    rng = np.random.default_rng(3)
    requests = [Request(f"r{i}", "", rng.integers(0, 50000, int(rng.integers(1, 9))).tolist(),
                        SamplingParams(max_new_tokens=int(rng.integers(1, 7)), temperature=0.8 * (i % 2), seed=i),
                        "in.parquet", i) for i in range(42)]
    runs = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda prompts, *a, **k: runs.append(len(prompts)) or generate(
        prompts, *a, **k))
    fn = GenerateBatches(str(model_dir), precision="float32", intra_threads=2, batch_size=4, target_seconds=1e-6)
    fn._model = model
    results = list(fn.process(requests))
    assert runs == [2] + [4] * 10
    assert sorted(r.request.id for r in results) == sorted(r.id for r in requests)
    for r in results:
        alone = generate([r.request.token_ids], [r.request.params])[0]
        assert r.token_ids == alone.token_ids
