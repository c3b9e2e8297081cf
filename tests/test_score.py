"""The scoring job (python -m pipeline.score) and ScoreText: every token's log-probability, the first given
<|endoftext|>, as transformers computes it on the same weights (within 1e-4 relative); a completion given its
prompt; text longer than the context in sliding windows, as Hugging Face's perplexity guide scores them; the
generation job's dead letters, accounting, run report and --skip_existing."""
from __future__ import annotations

import json
import math

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmgraph.config import EOT_TOKEN
from lmgraph.tokenizer import Tokenizer
from pipeline.score import main, run
from transforms import ScoreText
from transforms.score_text import score_windows, scores_schema

N_CTX = 128  # the tiny model's
LONG = "the cat sat on the warm mat " * 45  # 316 tokens: three windows at stride 64
TEXTS = {"t0": "the cat sat on the mat", "t1": "while rain fell over quiet hills", "long": LONG,
         "blank": "   ", "one": "a"}
BAD_TEXTS = {"null": (None, "text is null"), "empty": ("", "text is empty")}
PAIRS = {  # id -> (prompt, completion)
    "c0": ("the cat sat on", " the mat"),
    "c1": ("", "once upon a time"),  # no prompt: scored as a text
    "c2": (LONG, " and then the rain fell"),  # the prompt pushes the completion past the context: windows
}


def hf_reference(hf_model, ids: list[int], start: int, stride: int = N_CTX // 2) -> list[float]:
    """log p(ids[t] | ids[<t]) for t >= start, by transformers, over the windows of Hugging Face's perplexity
    guide (written out here as the guide does, not with score_windows)."""
    out: dict[int, float] = {}
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + N_CTX, len(ids))
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids[begin:end]])).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        for t in range(max(prev_end, begin + 1), end):  # the guide's targets: what the last window did not score
            out[t] = logprobs[t - begin - 1, ids[t]].item()
        prev_end = end
        if end == len(ids):
            break
    return [out[t] for t in range(start, len(ids))]


def test_windows_score_every_position_once():
    for n, start, stride in [(10, 1, 64), (128, 1, 64), (129, 1, 64), (317, 1, 64), (317, 1, 100), (317, 1, 1),
                             (300, 250, 64), (300, 299, 127)]:
        windows = score_windows(n, start, N_CTX, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(start, n)), (n, start, stride)
        assert all(end - begin <= N_CTX and begin < first for begin, end, first in windows)
    assert score_windows(317, 1, N_CTX, 64) == [(0, 128, 1), (64, 192, 128), (128, 256, 192), (192, 317, 256)]
    assert score_windows(300, 250, N_CTX, 64)[0] == (128, 256, 250)  # windows of the prompt alone are left out
    with pytest.raises(ValueError, match="stride"):
        score_windows(10, 1, N_CTX, N_CTX)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_in")
    texts = {**TEXTS, **{k: v for k, (v, _) in BAD_TEXTS.items()}}
    pq.write_table(pa.table({"id": list(texts) + ["t0"], "text": list(texts.values()) + ["a duplicate id"]}),
                   d / "texts.parquet", row_group_size=3)
    lines = [{"id": k, "prompt": p, "completion": c} for k, (p, c) in PAIRS.items()]
    lines += [{"id": "no-prompt", "prompt": None, "completion": "x"}, {"id": "no-key", "prompt": "x"},
              {"id": "int", "prompt": "x", "completion": 5}]
    (d / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, inputs, model_dir):
    out = tmp_path_factory.mktemp("score_out")
    report = run(["--input", str(inputs / "texts.parquet"), "--output", str(out), "--model_dir", str(model_dir),
                  "--precision", "float32", "--token_logprobs", "--batch_size", "4", "--progress_seconds", "0"])
    return report, pq.read_table(out / "scores" / "texts.parquet"), pq.read_table(out / "errors" / "texts.parquet")


def test_texts_match_transformers(text_run, hf_model, model_dir):
    report, table, _ = text_run
    assert table.schema.remove_metadata() == scores_schema(token_logprobs=True)
    tok = Tokenizer(model_dir)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert list(rows) == list(TEXTS)  # input order
    assert len(tok.encode(LONG)) + 1 > 2 * N_CTX  # the long text takes several windows
    for rid, text in TEXTS.items():
        r = rows[rid]
        ids = tok.encode(text)
        ref = hf_reference(hf_model, [EOT_TOKEN] + ids, 1)
        assert r["token_ids"] == ids and r["tokens"] == len(ids) == len(r["token_logprobs"])
        assert math.isclose(r["logprob_sum"], sum(ref), rel_tol=1e-4), rid
        assert max(abs(a - b) / abs(b) for a, b in zip(r["token_logprobs"], ref)) < 1e-4, rid
        assert math.isclose(r["mean_logprob"], r["logprob_sum"] / len(ids), rel_tol=1e-12)
        assert math.isclose(r["perplexity"], math.exp(-r["mean_logprob"]), rel_tol=1e-12)
        assert r["precision"] == "float32" and r["model"].startswith("tiny@")


def test_dead_letters_and_the_report(text_run, inputs):
    report, table, errors = text_run
    reasons = {(e["id"], e["error"].split(": ", 1)[1]) for e in errors.to_pylist()}
    assert reasons == {("null", "text is null"), ("empty", "text is empty"),
                       ("t0", f"duplicate id 't0': also at row 0 of {inputs / 'texts.parquet'}, which is the row kept")}
    assert (report["rows_read"], report["rows_written"], report["rows_dead_lettered"]) == (8, 5, 3)
    assert report["accounted"] and report["precision"] == ["float32"]
    assert report["scored_tokens"] == sum(table.column("tokens").to_pylist()) > 0
    assert report["tokens_per_second"] > 0 and "generated_tokens" not in report


def test_completions_given_their_prompts(tmp_path, inputs, hf_model, model_dir):
    out = tmp_path / "out"
    argv = ["--input", str(inputs / "*.jsonl"), "--output", str(out), "--model_dir", str(model_dir),
            "--prompt_column", "prompt", "--completion_column", "completion", "--precision", "float32",
            "--output_format", "jsonl", "--skip_existing", "--progress_seconds", "0"]
    report = run(argv)
    rows = {r["id"]: r for r in map(json.loads, (out / "scores" / "pairs.jsonl").read_text().splitlines())}
    assert list(rows) == list(PAIRS) and "token_logprobs" not in rows["c0"]
    tok = Tokenizer(model_dir)
    for rid, (prompt, completion) in PAIRS.items():
        context = [EOT_TOKEN] + tok.encode(prompt)
        ref = hf_reference(hf_model, context + tok.encode(completion), len(context))
        assert rows[rid]["tokens"] == len(tok.encode(completion)) == len(ref)
        assert math.isclose(rows[rid]["logprob_sum"], sum(ref), rel_tol=1e-4), rid
    errors = {e["id"]: e["error"] for e in map(json.loads, (out / "errors" / "pairs.jsonl").read_text().splitlines())}
    assert "prompt is null: a completion is scored given its prompt" in errors["no-prompt"]
    assert "no 'completion' key (keys: ['id', 'prompt']; see --completion_column)" in errors["no-key"]
    assert "completion is not a string but int" in errors["int"]
    assert (report["rows_read"], report["rows_written"], report["rows_dead_lettered"], report["accounted"]) == \
        (6, 3, 3, True)

    # resume: the same input renamed is not scored again
    (inputs / "pairs.jsonl").rename(inputs / "pairs-2.jsonl")
    try:
        again = run(argv)
    finally:
        (inputs / "pairs-2.jsonl").rename(inputs / "pairs.jsonl")
    # the ids with a score or a dead letter are skipped; a line the reader rejects is read, and rejected, again
    assert (again["rows_read"], again["rows_skipped_existing"], again["rows_written"], again["rows_dead_lettered"],
            again["accounted"]) == (6, 5, 0, 1, True)


OUT: dict[str, list] = {"scores": [], "errors": []}


def collect(row: dict, tag: str) -> None:
    OUT[tag].append(row)  # the in-process runner runs this in this process


def test_score_text_in_a_pipeline(model, model_dir):
    """dict rows in: scores with the row's other keys, errors with id, error and the row's other keys."""
    for rows in OUT.values():
        rows.clear()
    rows = [{"id": 1, "text": "the cat sat", "user": "ann"}, {"id": 2, "text": None, "user": "bob"}, "not a dict"]
    with beam.Pipeline(runner="FnApiRunner") as p:
        result = p | beam.Create(rows) | ScoreText(str(model_dir), precision="float32", intra_op_threads=2)
        _ = result.scores | "Scores" >> beam.Map(collect, "scores")
        _ = result.errors | "Errors" >> beam.Map(collect, "errors")
    [score] = OUT["scores"]
    ids = [EOT_TOKEN] + Tokenizer(model_dir).encode("the cat sat")
    assert math.isclose(score["logprob_sum"], math.fsum(model.score([ids])[0]), rel_tol=1e-6)
    assert (score["id"], score["text"], score["user"], score["tokens"]) == (1, "the cat sat", "ann", 3)
    assert sorted(OUT["errors"], key=str) == sorted([
        {"id": 2, "error": "text is null", "text": None, "user": "bob"},
        {"id": None, "error": "a row must be a dict with id and text, not str"}], key=str)


def test_usage_errors_exit_2(tmp_path, inputs, model_dir, capsys):
    base = ["--input", str(inputs / "texts.parquet"), "--output", str(tmp_path / "o"), "--model_dir", str(model_dir)]
    assert main(base + ["--prompt_column", "p"]) == 2
    assert "--prompt_column goes with --completion_column" in capsys.readouterr().err
    assert main(base + ["--stride", "128"]) == 2
    assert "--stride must be below the model's context of 128" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
