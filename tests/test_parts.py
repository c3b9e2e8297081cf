"""A run decoded in parts: each Session.run stops at its deadline and the next goes on from the loop state and KV
cache it left, so rows are the same bits as in one part; the skeleton's split-and-retry redoes only the units a
failed run had not finished."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to

from lmgraph.sampling import SamplingParams
from transforms.generate import GenerateBatches
from transforms.records import ERRORS, Request
from transforms.work import Done, RunBatches, Task, split_and_retry

IN_PROCESS = "BundleBasedDirectRunner"


def ragged_rows(seed: int, n: int, vocab: int = 50257):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, k).tolist() for k in rng.integers(1, 20, n)]
    params = [SamplingParams(max_new_tokens=int(k), temperature=0.8 * (i % 2), top_k=40 * (i % 3 == 0), seed=i)
              for i, k in enumerate(rng.integers(1, 30, n))]
    return prompts, params


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_run_in_parts_is_the_same_bits_as_in_one(model_dir, precision):
    """A deadline already past: every part is one loop iteration (an admission or a decode step), and the run
    goes on across some 40 Session.runs. Greedy and sampled rows, a stop string and logprobs come out the same bits
    as one Session.run, rows end in the parts along the way, and the parts' tokens add up to the run's."""
    from lmgraph.loader import GenerationModel

    model = GenerationModel(model_dir, precision=precision, intra_threads=2)
    prompts, params = ragged_rows(5, 70)
    whole = model.generate(prompts, params, slots=64, stops=["q"])
    parts = list(model.generate_parts(prompts, params, slots=64, stops=["q"], seconds=1e-9))
    assert len(parts) > 20
    done = {}
    for part in parts:
        assert not set(part.done) & set(done)  # each row once
        done.update(part.done)
    assert [done[r] for r in range(len(prompts))] == whole
    assert sum(p.tokens for p in parts) == sum(len(c.token_ids) for c in whole)
    assert sum(bool(p.done) for p in parts[:len(parts) // 2]) >= 2  # rows ended early, not all at the end
    assert {c.finish_reason for c in whole} == {"stop", "length"}
    model.close()


def test_a_pipeline_run_in_parts_gives_every_row_what_it_gets_alone(model_dir, model, monkeypatch):
    """GenerateBatches with parts far shorter than a step: a row's samples come out together once the last has
    ended, every row as the engine gives it alone."""
    prompts, params = ragged_rows(3, 30)
    requests = [Request(f"r{i}", "", p, q, "in.parquet", i, num_samples=1) for i, (p, q) in
                enumerate(zip(prompts, params))]
    samples = [Request("s", "", [5, 6, 7], SamplingParams(max_new_tokens=k, temperature=1.0, seed=9), "in.parquet",
                       30, num_samples=3, sample=k - 2) for k in (2, 12, 25)]
    fn = GenerateBatches(str(model_dir), precision="float32", intra_threads=2, batch_size=8, target_seconds=1e-9)
    fn._model = model
    parts = []
    real = model.generate_parts
    monkeypatch.setattr(model, "generate_parts", lambda *a, **k: (parts.append(p) or p for p in real(*a, **k)))
    results = list(fn.process(requests[:15] + samples + requests[15:]))
    assert len(parts) > 10
    assert sorted(r.request.id for r in results) == sorted([r.id for r in requests] + ["s"] * 3)
    at = [i for i, r in enumerate(results) if r.request.id == "s"]
    assert at == list(range(at[0], at[0] + 3))  # a row's samples together
    for r in results:
        alone = model.generate([r.request.token_ids], [r.request.params])[0]
        assert (r.token_ids, r.finish_reason) == (alone.token_ids, alone.finish_reason)


class Doubling(Task):
    """A task without a model: a request is a number, its result twice it. A run ends its units one part at a
    time, and fails (as out of memory would) when it holds more than `fits` units or a unit of 13."""
    name = "doubling"
    stage = "Double"
    fits = 4

    def prepare(self, tokenizer, row):
        return [row]

    def format(self, tokenizer, result):
        return {"doubled": result}

    def run(self, model, units):
        for i, u in enumerate(units):
            if len(units) > self.fits or 13 in u:
                raise MemoryError(f"{len(units)} units")
            yield Done({i: [2 * x for x in u]}, len(u))


def test_split_and_retry_redoes_only_what_a_failed_run_had_not_finished():
    task = Doubling()
    calls = []

    def run(units):
        calls.append([u[0] for u in units])
        yield from task.run(None, units)

    outcomes = list(split_and_retry(run, [[x] for x in (1, 2, 13, 4)]))
    # 1 and 2 end before 13 fails the run; 13 and 4 go on in halves: 13 fails alone, 4 works
    assert calls == [[1, 2, 13, 4], [13], [4]]
    assert [(o.units, o.results if not isinstance(o.results, Exception) else "error") for o in outcomes] == [
        ([[1]], [2]), ([[2]], [4]), ([[13]], "error"), ([[4]], [8])]


class Number(int):
    """A request of Doubling's."""

    def dead_letter(self, error):
        return {"id": int(self), "error": error}


class NoModel:
    def get(self):
        return None


def test_the_skeleton_runs_a_task_through_retries_dead_letters_and_metrics():
    """RunBatches with a fake task in a real pipeline: a batch of 9 is too big, its halves retried; the row that
    fails alone is a dead letter naming the task; the others come out once, and the metrics count them."""
    task = Doubling()
    p = beam.Pipeline(runner=IN_PROCESS)
    out = (p | beam.Create([[Number(x) for x in (1, 2, 3, 13, 5, 6, 7, 8, 9)]])
           | beam.ParDo(RunBatches(task, NoModel())).with_outputs(ERRORS, main="ok"))
    ok = out.ok | "Ok" >> beam.combiners.ToList()
    errors = out[ERRORS] | "Errors" >> beam.combiners.ToList()
    assert_that(ok | beam.Map(sorted), equal_to([[2, 4, 6, 10, 12, 14, 16, 18]]), label="doubled")
    assert_that(errors, equal_to([[{"id": 13, "error": "doubling failed: MemoryError: 1 units"}]]),
                label="dead letters")
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.result
                for c in result.metrics().query(MetricsFilter().with_namespace("gpt2"))["counters"]}
    assert (counters["requests"], counters["tokens"], counters["dead_letters"]) == (8, 8, 1)
