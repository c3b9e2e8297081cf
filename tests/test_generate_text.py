"""GenerateText in any pipeline: dict rows in, completion and error rows out, equal to the engine's; unbounded input
batched by size or by a maximum wait (TestStream); one tokenizer per process; sampling fields defined once; no
TensorFlow where the model does not run; and the README's "Use it in your own pipeline" snippets (GenerateText,
ScoreText, RunInference), run as written."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue

from lmgraph.manifest import INPUTS, ModelError
from lmgraph.sampling import FIELDS, SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.options import parse
from transforms import GenerateText
from transforms.detokenize import COMPLETION_FIELDS
from transforms.generate import GenerateBatches
from transforms.validate import resolve_params, row_seed

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = "FnApiRunner"  # the DirectRunner's in-process engine: the collecting DoFns below run in this process
OUT: dict[str, list] = {"completions": [], "errors": []}
BATCHES: list[list] = []  # ids of each batch GenerateBatches got, in order (the streaming test)


def collect(element, tag: str) -> None:
    OUT[tag].append(element)


def run_generate_text(pipeline: beam.Pipeline, rows, **kwargs) -> tuple[list[dict], list[dict]]:
    for rows_out in OUT.values():
        rows_out.clear()
    result = rows | GenerateText(**kwargs)
    _ = result.completions | "Completions" >> beam.Map(collect, "completions")
    _ = result.errors | "Errors" >> beam.Map(collect, "errors")
    pipeline.run().wait_until_finish()
    return list(OUT["completions"]), list(OUT["errors"])


def expected(engine, tok: Tokenizer, prompt: str, params: SamplingParams):
    return engine.generate([tok.encode(prompt)], params)[0]


GOOD = {  # id -> (prompt, overrides, passthrough)
    "g0": ("the cat sat on the mat", {}, {"lang": "en", "meta": {"n": 1, "tags": ["a"]}}),
    "g1": ("while rain fell over quiet hills and rivers ran to the sea", {}, {"lang": "en"}),
    17: ("an id that is not a string", {}, {}),
    "o1": ("sampled with its own seed", {"temperature": 0.9, "seed": 7, "max_new_tokens": 3}, {"lang": "fr"}),
    "o2": ("top p and top k", {"temperature": 1.2, "top_k": 5, "top_p": 0.9, "max_new_tokens": None}, {}),
    "e1": ("past the end of text", {"ignore_eos": True, "max_new_tokens": 9}, {}),
    "clash": ("a passthrough key named like an output field", {}, {"model": "mine", "source": "kept"}),
}
BAD = [  # (row, expected id, reason, passthrough kept)
    ({"id": "b0", "prompt": None, "lang": "x"}, "b0", "prompt is null", {"lang": "x"}),
    ({"id": "b1", "prompt": ""}, "b1", "prompt is empty", {}),
    ({"id": "b2", "prompt": "   "}, "b2", "prompt is only whitespace", {}),
    ({"id": "b3", "prompt": "the " * 200}, "b3", "prompt tokens + 6 new tokens exceed the model context of 128", {}),
    ({"id": "b4", "prompt": "fine", "top_p": 1.5}, "b4", "top_p must be in (0, 1], got 1.5", {}),
    ({"id": "b5", "prompt": "fine", "max_new_tokens": "many"}, "b5",
     "column max_new_tokens: expected a number, got 'many'", {}),
    ({"id": "b6", "prompt": "fine", "ignore_eos": "yes"}, "b6", "column ignore_eos: expected true or false", {}),
    ({"id": "b7", "prompt": 42}, "b7", "prompt is not a string but int", {}),
    ({"prompt": "a row without an id", "k": 1}, None, "id is null", {"k": 1}),
    ("not a dict", None, "a row must be a dict with id and prompt, not str", {}),
]


def rows_in() -> list:
    good = [{"id": rid, "prompt": p, **o, **x} for rid, (p, o, x) in GOOD.items()]
    return good + [row for row, *_ in BAD]


@pytest.fixture(scope="module")
def generated(model_dir):
    p = beam.Pipeline(runner=IN_PROCESS)
    rows = p | beam.Create(rows_in())
    return run_generate_text(p, rows, model_dir=str(model_dir), max_new_tokens=6, batch_size=3,
                             precision="float32", intra_op_threads=2)


def test_every_row_once_with_its_passthrough_keys(generated):
    completions, errors = generated
    assert sorted(map(str, (r["id"] for r in completions))) == sorted(map(str, GOOD))
    for r in completions:
        prompt, _, extra = GOOD[r["id"]]
        assert r["prompt"] == prompt
        assert list(r)[:len(COMPLETION_FIELDS)] == list(COMPLETION_FIELDS)  # the job's fields, in its order...
        assert {k: v for k, v in r.items() if k not in COMPLETION_FIELDS} == \
            {k: v for k, v in extra.items() if k not in COMPLETION_FIELDS}  # ...then the row's other keys, untouched
    clash = next(r for r in completions if r["id"] == "clash")
    assert clash["model"].startswith("tiny@") and clash["source"] == "kept"  # an output field wins over a key
    assert len(errors) == len(BAD)
    by_reason = {e["error"]: e for e in errors}
    for row, rid, reason, extra in BAD:
        [e] = [e for error, e in by_reason.items() if reason in error]
        assert e["id"] == rid and {k: v for k, v in e.items() if k not in ("id", "prompt", "error")} == extra
        prompt = row.get("prompt") if isinstance(row, dict) else None
        assert e["prompt"] == (prompt if prompt is None or isinstance(prompt, str) else repr(prompt))
    assert "truncate='left'" in next(e["error"] for e in errors if e["id"] == "b3")


def test_completions_equal_the_engine(generated, model, model_dir):
    """Same rows, same seeds (the run seed and the id, or the row's own), same tokens as the engine alone."""
    completions, _ = generated
    tok = Tokenizer(model_dir)
    for r in completions:
        prompt, overrides, _ = GOOD[r["id"]]
        values = {"max_new_tokens": 6, "seed": row_seed(0, r["id"])}
        values.update({k: v for k, v in overrides.items() if v is not None})
        e = expected(model, tok, prompt, SamplingParams(**values))
        assert r["completion_token_ids"] == e.token_ids and r["finish_reason"] == e.finish_reason
        assert r["completion"] == tok.decode(e.token_ids) and r["completion_tokens"] == len(e.token_ids)
        assert r["prompt_tokens"] == len(tok.encode(prompt))
        assert r["model"] == model.name and r["precision"] == "float32"
    rows = {r["id"]: r for r in completions}
    assert rows["o1"]["completion_tokens"] == 3 and rows["e1"]["completion_tokens"] == 9  # ignore_eos kept


def test_stop_strings_and_truncate_left(model_dir, generated):
    completions, _ = generated
    known = next(r for r in completions if r["id"] == "g1")
    stop = known["completion"][2:5]
    p = beam.Pipeline(runner=IN_PROCESS)
    rows = p | beam.Create([{"id": "g1", "prompt": GOOD["g1"][0]}, {"id": "b3", "prompt": "the " * 200}])
    completions, errors = run_generate_text(p, rows, model_dir=str(model_dir), max_new_tokens=6, stop=[stop],
                                            truncate="left", precision="float32")
    rows = {r["id"]: r for r in completions}
    assert errors == [] and rows["b3"]["prompt_tokens"] == 128 - 6
    assert rows["g1"]["finish_reason"] == "stop" and rows["g1"]["completion"] == known["completion"].split(stop)[0]


def test_the_model_supplies_its_name_context_and_tokenizer(model_dir, model, tmp_path):
    t = GenerateText(str(model_dir))
    assert (t.model_label, t.n_ctx) == (model.name, 128)
    with pytest.raises(ModelError, match="no manifest.json"):
        GenerateText(str(tmp_path))
    with pytest.raises(TypeError, match="unknown sampling parameter.*temprature"):
        GenerateText(str(model_dir), temprature=0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerateText(str(model_dir), top_p=2.0)
    with pytest.raises(ValueError, match="max_wait_secs must be > 0"):
        GenerateText(str(model_dir), max_wait_secs=0)


def test_one_tokenizer_per_process(model_dir, monkeypatch):
    """Tokenize and Detokenize share one handle: one tokenizer load per worker process, not one per DoFn."""
    loads = []
    init = Tokenizer.__init__

    def counting_init(self, directory):
        loads.append(directory)
        init(self, directory)

    monkeypatch.setattr(Tokenizer, "__init__", counting_init)
    p = beam.Pipeline(runner=IN_PROCESS)
    rows = p | beam.Create([{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(4)])
    completions, _ = run_generate_text(p, rows, model_dir=str(model_dir), max_new_tokens=2, precision="float32")
    assert len(completions) == 4 and len(loads) == 1


# --- unbounded input -------------------------------------------------------------------------------------------

class FixedClock:
    """The maximum wait's clock for TestStream, as Beam's own GroupIntoBatches tests do: the DirectRunner fires
    processing-time timers on TestStream's clock, which starts at 0 and moves only with advance_processing_time."""

    def __call__(self) -> float:
        return 0.0


def test_streaming_batches_cut_by_size_or_wait_never_at_the_end(model_dir, model, monkeypatch):
    """Rows arrive in three bursts: 3 (a full batch: cut by size), 1 then a pause longer than max_wait_secs (cut by
    the wait, before the next rows arrive), 2 at the end. Had the one row waited for the end of the input or for a
    full batch, it would be in a batch with the last two."""
    process = GenerateBatches.process

    def recording(self, batch):
        BATCHES.append(sorted(r.id for r in batch))
        yield from process(self, batch)

    monkeypatch.setattr(GenerateBatches, "process", recording)
    BATCHES.clear()
    prompts = {f"s{i}": f"the river number {i} ran to the sea" for i in range(6)}  # equal lengths: no cost-model cut
    rows = [{"id": rid, "prompt": text, "arrival": i} for i, (rid, text) in enumerate(prompts.items())]
    stream = (test_stream.TestStream()
              .advance_watermark_to(0)
              .add_elements([TimestampedValue(r, i) for i, r in enumerate(rows[:3])])
              .advance_watermark_to(10)
              .add_elements([TimestampedValue(rows[3], 11)])
              .advance_processing_time(5)  # > max_wait_secs
              .advance_watermark_to(20)
              .add_elements([TimestampedValue(r, 21) for r in rows[4:]])
              .advance_watermark_to_infinity())
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    p = beam.Pipeline(options=options)  # the DirectRunner runs TestStream on its streaming engine
    source = p | stream
    assert not source.is_bounded  # GenerateText takes its streaming path from this
    completions, errors = run_generate_text(p, source, model_dir=str(model_dir), max_new_tokens=4, batch_size=3,
                                            max_wait_secs=2, clock=FixedClock(), precision="float32",
                                            intra_op_threads=2)
    assert BATCHES == [["s0", "s1", "s2"], ["s3"], ["s4", "s5"]]
    assert errors == [] and sorted(r["id"] for r in completions) == sorted(prompts)
    tok = Tokenizer(model_dir)
    for r in completions:
        e = expected(model, tok, prompts[r["id"]], SamplingParams(max_new_tokens=4, seed=row_seed(0, r["id"])))
        assert r["completion_token_ids"] == e.token_ids and r["arrival"] == int(r["id"][1:])


class Labels(PipelineVisitor):
    def __init__(self):
        self.labels = []

    def enter_composite_transform(self, node):
        self.labels.append(node.full_label)

    def visit_transform(self, node):
        self.labels.append(node.full_label)


def test_bounded_input_takes_the_cost_model_path_and_streaming_can_be_forced(model_dir):
    def labels(streaming) -> list[str]:
        p = beam.Pipeline()
        _ = p | beam.Create([{"id": "a", "prompt": "b"}]) | GenerateText(str(model_dir), streaming=streaming)
        visitor = Labels()
        p.visit(visitor)
        return visitor.labels

    bounded, forced = labels(None), labels(True)
    assert "GenerateText/Batch/GroupAll" in bounded and not any("GroupIntoBatches" in n for n in bounded)
    assert "GenerateText/Batch/GroupIntoBatches" in forced and not any("GroupAll" in n for n in forced)


# --- one list of sampling fields; no TensorFlow where the model does not run -----------------------------------

def test_sampling_fields_are_the_graph_inputs_the_options_and_the_columns():
    assert list(INPUTS)[6:] == list(FIELDS)  # export passes the inputs to lmgraph.model.generate in this order
    args, _ = parse(["--input", "x", "--output", "o", "--model_dir", "m", "--ignore_eos", "--top_k", "3"])
    assert {name: getattr(args, name) for name in FIELDS} == {
        "max_new_tokens": 64, "temperature": 0.0, "top_k": 3, "top_p": 1.0, "seed": 0, "ignore_eos": True}
    from transforms.read import OVERRIDE_COLUMNS
    assert OVERRIDE_COLUMNS == FIELDS + ("num_samples",)  # the sampling fields, and samples per row
    defaults = SamplingParams(max_new_tokens=5, temperature=0.5, ignore_eos=True)
    params = resolve_params({"top_k": 4.0, "temperature": None}, defaults, 3, "row")
    assert params == SamplingParams(5, 0.5, 4, 1.0, row_seed(3, "row"), True)  # ignore_eos kept from the defaults


def test_reading_validating_and_building_the_pipeline_import_no_tensorflow():
    code = ("import sys, transforms, transforms.read, transforms.validate, transforms.generate_text, "
            "transforms.job, pipeline.options, pipeline.run; from transforms import GenerateText; "
            "print('tensorflow' in sys.modules, 'apache_beam.ml.inference.base' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


# --- the README's snippets, as written ---------------------------------------------------------------------------

README_MODEL = "models/gpt2-124M-random"  # what the snippets name; the test puts the tiny model there


def readme_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Use it in your own pipeline\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)


def test_readme_snippets_run_as_written(model_dir, tmp_path, monkeypatch, capfd):
    snippets = readme_snippets()
    assert len(snippets) == 3 and all(README_MODEL in s for s in snippets)
    (tmp_path / "models").mkdir()
    (tmp_path / README_MODEL).symlink_to(model_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the snippets' relative paths: the model, and out/ for the first one's files
    exec(compile(snippets[0], "README.md GenerateText", "exec"), {"__name__": "readme"})
    completions = [json.loads(line) for f in sorted(tmp_path.glob("out/completions*")) for line in f.open()]
    errors = [json.loads(line) for f in sorted(tmp_path.glob("out/errors*")) for line in f.open()]
    assert sorted(r["id"] for r in completions) == ["q1", "q2"] and completions[0]["model"].startswith("tiny@")
    assert {r["id"]: r["user"] for r in completions} == {"q1": "ann", "q2": "bob"}
    assert [(e["id"], e["error"]) for e in errors] == [("q3", "prompt is empty")]
    capfd.readouterr()
    exec(compile(snippets[1], "README.md ScoreText", "exec"), {"__name__": "readme"})
    printed = capfd.readouterr().out
    assert re.search(r"^d1 5 [0-9.e+]+$", printed, re.M), printed
    assert "{'id': 'd2', 'error': 'text is null', 'text': None}" in printed, printed
    exec(compile(snippets[2], "README.md RunInference", "exec"), {"__name__": "readme"})
    printed = capfd.readouterr().out
    assert re.search(r"^'Once upon a time' -> .+ \(tiny@[0-9a-f]{12}\)$", printed, re.M), printed
    assert re.search(r"^q1 ['\"]", printed, re.M), printed
