"""GPT2ModelHandler under Beam's RunInference: plain strings, keyed pairs, dict rows, Beam's batching arguments and
with_exception_handling; completions equal to the engine's with the same seeds."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from transforms import GPT2ModelHandler
from transforms.batching import DEFAULT_BATCH_SIZE
from transforms.detokenize import COMPLETION_FIELDS
from transforms.validate import row_seed

IN_PROCESS = "FnApiRunner"  # in this process: the collecting Map below fills OUT
OUT: dict[str, list] = {}
PROMPTS = ["the cat sat on the mat", "while rain fell", "over quiet hills and rivers ran to the sea", "a"]


def collect(element, tag: str) -> None:
    OUT.setdefault(tag, []).append(element)


def handler(model_dir, **kwargs) -> GPT2ModelHandler:
    return GPT2ModelHandler(str(model_dir), precision="float32", intra_op_threads=2, **kwargs)  # as `model`


def run(build) -> dict[str, list]:
    OUT.clear()
    p = beam.Pipeline(runner=IN_PROCESS)
    build(p)
    p.run().wait_until_finish()
    return dict(OUT)


def test_plain_strings(model_dir, model):
    out = run(lambda p: p | beam.Create(PROMPTS)
              | RunInference(handler(model_dir, max_new_tokens=5, temperature=0.7, max_batch_size=3))
              | beam.Map(collect, "results"))
    results = out["results"]
    assert sorted(r.example for r in results) == sorted(PROMPTS)
    tok = Tokenizer(model_dir)
    for r in results:
        assert isinstance(r, PredictionResult) and r.model_id == model.name
        assert list(r.inference) == list(COMPLETION_FIELDS)
        # a string's seed: the run seed and the prompt itself
        e = model.generate([tok.encode(r.example)], SamplingParams(max_new_tokens=5, temperature=0.7,
                                                                 seed=row_seed(0, r.example)))[0]
        assert r.inference["completion_token_ids"] == e.token_ids and r.inference["finish_reason"] == e.finish_reason
        assert r.inference["id"] is None and r.inference["prompt"] == r.example
        assert r.inference["model"] == model.name and r.inference["precision"] == "float32"
        assert r.inference["completion"] == tok.decode(e.token_ids)


def test_keyed_pairs_and_dict_rows(model_dir, model):
    rows = [{"id": "x1", "prompt": PROMPTS[0], "max_new_tokens": 2},
            {"id": "x2", "prompt": PROMPTS[1], "temperature": 0.9, "seed": 5}]
    out = run(lambda p: p | beam.Create([(f"k{i}", row) for i, row in enumerate(rows)])
              | RunInference(KeyedModelHandler(handler(model_dir, max_new_tokens=4, seed=3)))
              | beam.Map(collect, "results"))
    results = dict(out["results"])
    assert sorted(results) == ["k0", "k1"]
    tok = Tokenizer(model_dir)
    e0 = model.generate([tok.encode(PROMPTS[0])], SamplingParams(max_new_tokens=2, seed=row_seed(3, "x1")))[0]
    e1 = model.generate([tok.encode(PROMPTS[1])], SamplingParams(max_new_tokens=4, temperature=0.9, seed=5))[0]
    assert results["k0"].inference["completion_token_ids"] == e0.token_ids and results["k0"].inference["id"] == "x1"
    assert results["k1"].inference["completion_token_ids"] == e1.token_ids


def test_with_exception_handling_routes_the_failing_example(model_dir, model):
    """Beam's dead-letter output for RunInference gets the batches that raised; one example per batch routes just
    the bad one, with the reason; the good ones go on."""
    inputs = ["the cat sat", "", "the " * 200, "on a warm mat"]

    def build(p):
        main, dlq = (p | beam.Create(inputs)
                     | RunInference(handler(model_dir, max_new_tokens=3, max_batch_size=1)).with_exception_handling())
        _ = main | "Ok" >> beam.Map(collect, "ok")
        _ = dlq.failed_inferences | "Failed" >> beam.Map(collect, "failed")

    out = run(build)
    assert sorted(r.example for r in out["ok"]) == ["on a warm mat", "the cat sat"]
    failed = {tuple(batch): str(error) for batch, error in out["failed"]}
    assert sorted(failed) == [("",), ("the " * 200,)]
    assert "example 0 ('')" in failed[("",)] and "prompt is empty" in failed[("",)]
    assert "exceed the model context of 128" in failed[("the " * 200,)]


def test_batching_arguments_and_checks(model_dir):
    h = handler(model_dir, max_new_tokens=3, min_batch_size=2, max_batch_duration_secs=5)
    assert h.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": DEFAULT_BATCH_SIZE, "max_batch_duration_secs": 5}
    assert handler(model_dir, max_batch_size=4).batch_elements_kwargs()["max_batch_size"] == 4
    with pytest.raises(TypeError, match="unknown keyword argument.*max_batch_sise"):
        handler(model_dir, max_batch_sise=4)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        handler(model_dir, temperature=-1.0)
    with pytest.raises(ValueError, match="inference_args may hold sampling values"):
        h.validate_inference_args({"beams": 4})
    h.validate_inference_args({"temperature": 0.5, "seed": 9})


def test_inference_args_and_a_batch_of_mixed_lengths_in_fewer_slots(model_dir, model):
    """A batch of very different lengths whose cache allows one slot (40 // (longest prompt + 3)): the rows go one
    by one through it and come back in the batch's order, each as alone."""
    h = handler(model_dir, max_new_tokens=3, max_batch_tokens=40)
    engine = h.load_model()
    batch = ["a " * 30, "b", "c " * 20, "d d"]
    results = h.run_inference(batch, engine, {"temperature": 0.8, "seed": 4})
    assert [r.example for r in results] == batch
    tok = Tokenizer(model_dir)
    for r in results:
        e = model.generate([tok.encode(r.example)], SamplingParams(max_new_tokens=3, temperature=0.8,
                                                                 seed=row_seed(4, r.example)))[0]
        assert r.inference["completion_token_ids"] == e.token_ids


def test_a_model_shared_across_processes(model_dir, model):
    """large_model=True: Beam holds the engine in a process of its own and hands out a proxy (methods only)."""
    out = run(lambda p: p | beam.Create(PROMPTS[:2])
              | RunInference(handler(model_dir, max_new_tokens=3, large_model=True))
              | beam.Map(collect, "results"))
    tok = Tokenizer(model_dir)
    for r in out["results"]:
        e = model.generate([tok.encode(r.example)], SamplingParams(max_new_tokens=3, seed=row_seed(0, r.example)))[0]
        assert r.inference["completion_token_ids"] == e.token_ids and r.model_id == model.name
