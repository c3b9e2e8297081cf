"""--logprobs: each completion token's log-probability under the model (full softmax, before temperature, top-k and
top-p), as transformers computes it, cut with the tokens by a stop string; without the option the schema is as
before."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmgraph.tokenizer import Tokenizer
from pipeline.run import run
from transforms.detokenize import COMPLETION_FIELDS, completion_fields, completion_row
from transforms.write import COMPLETIONS_SCHEMA, completions_schema

PROMPTS = ["the cat sat on the mat", "while rain fell over quiet hills", "and rivers ran to the sea", "once upon"]


@pytest.fixture(scope="module")
def logprob_rows(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("logprobs")
    # greedy rows, and sampled ones: their log-probabilities are still the model's, not the sampling distribution's
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(4)], "prompt": PROMPTS,
                             "temperature": [None, 1.5, 0.7, None], "top_k": [None, 5, None, None],
                             "top_p": [None, None, 0.8, None]}), d / "in.parquet")
    report = run(["--input", str(d / "in.parquet"), "--output", str(d / "out"), "--model_dir", str(model_dir),
                  "--max_new_tokens", "8", "--precision", "float32", "--logprobs", "--seed", "3"])
    assert report["accounted"] and report["rows_written"] == 4
    table = pq.read_table(d / "out" / "completions" / "in.parquet")
    return table


def test_schema_has_logprobs_only_when_asked(logprob_rows):
    assert logprob_rows.schema.remove_metadata() == completions_schema(logprobs=True)
    assert logprob_rows.schema.field("logprobs").type == pa.list_(pa.float32())
    assert completions_schema(logprobs=False) == COMPLETIONS_SCHEMA and "logprobs" not in COMPLETION_FIELDS
    assert list(completion_fields(True)) == logprob_rows.schema.names


def test_logprobs_match_transformers(logprob_rows, hf_model, model_dir):
    tok = Tokenizer(model_dir)
    for r in logprob_rows.to_pylist():
        assert r["precision"] == "float32"
        ids = r["completion_token_ids"]
        assert len(r["logprobs"]) == len(ids) > 0
        prompt = tok.encode(r["prompt"])
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + ids])).logits[0]
        ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(ids)[:, None])[:, 0]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], ref.tolist())) < 1e-3, r["id"]


def test_a_stop_string_cuts_the_logprobs_with_the_tokens(model_dir):
    tok = Tokenizer(model_dir)
    ids = tok.encode(" one two three four")
    logprobs = [-0.5, -1.0, -1.5, -2.0]
    row = completion_row(tok, "x", "p", 1, ids, "length", [" three"], "m", "float32", logprobs)
    assert row["completion"] == " one two" and row["finish_reason"] == "stop"
    assert row["completion_token_ids"] == ids[:2] and row["logprobs"] == logprobs[:2]
    assert list(row) == list(completion_fields(True))
    assert "logprobs" not in completion_row(tok, "x", "p", 1, ids, "length", [], "m", "float32")
