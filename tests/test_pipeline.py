"""The Beam job end to end on the DirectRunner with a tiny model and several shards."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmgraph.device import process_placement, resolve_precision
from lmgraph.manifest import PRECISIONS
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.run import main, run
from transforms.validate import row_seed
from transforms.write import COMPLETIONS_SCHEMA, ERRORS_SCHEMA

WORDS = "the cat sat on a warm mat while rain fell over quiet hills and rivers ran to the sea".split()


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + (i * 5) % 23))  # 1..23 words


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prompts")
    # shard 0: ids, good rows of many lengths; shard 1: no id column, per-row overrides; shard 2: bad rows
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(20)], "prompt": [prompt(i) for i in range(20)]}),
                   d / "part-0.parquet", row_group_size=7)
    pq.write_table(pa.table({
        "prompt": [prompt(i) for i in range(20, 26)],
        "max_new_tokens": [2, None, 5, 1, None, 3],
        "temperature": [None, 0.9, None, None, 1.2, 0.0],
        "seed": [None, 7, None, None, None, None],
    }), d / "part-1.parquet")
    pq.write_table(pa.table({"id": ["c0", "c1", "c2", "c3", "c4"],
                             "prompt": ["fine prompt", None, "", "   ", "the " * 200],
                             "top_p": [1.0, 1.0, 1.0, 1.0, 1.0]}), d / "part-2.parquet")
    pq.write_table(pa.table({"id": ["d0", "d1"], "prompt": ["bad top_p", "bad max_new"],
                             "top_p": [1.5, None], "max_new_tokens": [None, -3]}), d / "part-3.parquet")
    return d


def run_job(out: Path, shards: Path, model_dir: Path, *extra: str) -> tuple[dict, list[dict], list[dict]]:
    report = run(["--input", str(shards / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
                  "--max_new_tokens", "6", *extra])
    completions = [r for f in sorted((out / "completions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    errors = [r for f in sorted((out / "errors").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return report, completions, errors


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory, shards, model_dir):
    return run_job(tmp_path_factory.mktemp("out"), shards, model_dir, "--batch_size", "4")


def test_every_row_exactly_once(greedy_run, shards):
    report, completions, errors = greedy_run
    ids = [r["id"] for r in completions] + [r["id"] for r in errors]
    expected = [f"a{i}" for i in range(20)] + [f"part-1:{i}" for i in range(6)] + [f"c{i}" for i in range(5)] + \
        ["d0", "d1"]
    assert sorted(ids) == sorted(expected)
    assert report["rows_read"] == 33 and report["rows_written"] == len(completions) == 27
    assert report["rows_dead_lettered"] == len(errors) == 6 and report["accounted"]
    reasons = {r["id"]: r["error"] for r in errors}
    assert "prompt is null" in reasons["c1"] and "prompt is empty" in reasons["c2"]
    assert "only whitespace" in reasons["c3"] and "exceed the model context of 128" in reasons["c4"]
    assert "top_p must be in (0, 1]" in reasons["d0"] and "max_new_tokens must be an integer >= 1" in reasons["d1"]
    assert all("of " + str(shards) in r["error"] for r in errors)  # each reason names the file
    assert errors[0]["source"].endswith(".parquet")


def test_completions_equal_the_engine(greedy_run, engines, model_dir):
    _, completions, _ = greedy_run
    [precision] = {r["precision"] for r in completions}  # what --precision auto picked on this CPU, for every row
    assert precision == resolve_precision("auto", PRECISIONS, process_placement())[0]
    assert greedy_run[0]["precision"] == [precision]  # recorded in the run report
    model = engines[precision]
    tok = Tokenizer(model_dir)
    rows = [r for r in completions if r["id"].startswith("a")]
    params = [SamplingParams(max_new_tokens=6, seed=row_seed(0, r["id"])) for r in rows]
    expected = model.generate([tok.encode(r["prompt"]) for r in rows], params)
    for r, e in zip(rows, expected):
        assert r["completion_token_ids"] == e.token_ids
        assert r["completion"] == tok.decode(e.token_ids)
        assert r["prompt_tokens"] == len(tok.encode(r["prompt"])) and r["completion_tokens"] == len(e.token_ids)
        assert r["finish_reason"] == e.finish_reason and r["model"] == model.name
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(20)]  # input order within the shard


def test_per_row_overrides(greedy_run, engines, model_dir):
    _, completions, _ = greedy_run
    rows = {r["id"]: r for r in completions}
    model = engines[rows["part-1:1"]["precision"]]
    assert [rows[f"part-1:{i}"]["completion_tokens"] for i in (0, 2, 3, 5)] == [2, 5, 1, 3]
    tok = Tokenizer(model_dir)
    r = rows["part-1:1"]  # temperature 0.9 with its own seed 7
    e = model.generate([tok.encode(r["prompt"])], SamplingParams(max_new_tokens=6, temperature=0.9, seed=7))[0]
    assert r["completion_token_ids"] == e.token_ids
    greedy = model.generate([tok.encode(r["prompt"])], SamplingParams(max_new_tokens=6))[0]
    assert e.token_ids != greedy.token_ids


def test_output_schema_is_exact(greedy_run, tmp_path_factory):
    out = Path(greedy_run[0]["options"]["output"])
    assert pq.read_schema(out / "completions" / "part-0.parquet").remove_metadata() == COMPLETIONS_SCHEMA
    assert pq.read_schema(out / "errors" / "part-2.parquet").remove_metadata() == ERRORS_SCHEMA
    report = json.loads((out / "run_report.json").read_text())
    assert report["generated_tokens"] == sum(r["completion_tokens"] for r in greedy_run[1])


SAMPLING = ["--temperature", "0.8", "--top_p", "0.9", "--seed", "11"]


@pytest.mark.parametrize("sampling", [[], SAMPLING], ids=["greedy", "sampled"])
def test_same_completions_whatever_the_batching_and_workers(tmp_path, shards, model_dir, sampling):
    runs = [run_job(tmp_path / f"r{i}", shards, model_dir, *sampling, *extra)[1] for i, extra in enumerate([
        ["--batch_size", "1"],
        ["--batch_size", "16", "--max_batch_tokens", "100000"],
        ["--batch_size", "3", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    ])]
    key = lambda rows: sorted((r["id"], r["completion_token_ids"], r["finish_reason"]) for r in rows)  # noqa
    for a, b, c in zip(key(runs[0]), key(runs[1]), key(runs[2])):
        assert a == b == c
    assert len(runs[0]) == 27


def test_stop_strings_and_truncate_left(tmp_path, shards, model_dir, greedy_run):
    rows = {r["id"]: r for r in greedy_run[1]}
    stop = rows["a3"]["completion"][3:6]  # a piece of a known completion
    _, completions, errors = run_job(tmp_path / "o", shards, model_dir, "--stop", stop, "--truncate", "left")
    r = {x["id"]: x for x in completions}["a3"]
    assert r["finish_reason"] == "stop" and r["completion"] == rows["a3"]["completion"].split(stop)[0]
    # the token ids are those wholly inside the cut text (a stop string may end mid-token)
    kept = Tokenizer(model_dir).decode(r["completion_token_ids"])
    assert r["completion"].startswith(kept) and len(r["completion_token_ids"]) < rows["a3"]["completion_tokens"]
    assert "c4" in {x["id"] for x in completions}  # too long, kept by --truncate left
    assert {x["id"] for x in errors} == {"c1", "c2", "c3", "d0", "d1"}


def test_user_errors_exit_2_without_traceback(tmp_path, shards, model_dir, capsys):
    assert main(["--input", str(tmp_path / "none*.parquet"), "--output", str(tmp_path / "o"),
                 "--model_dir", str(model_dir)]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert main(["--input", str(shards / "*.parquet"), "--output", str(tmp_path / "o"),
                 "--model_dir", str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["--input", str(shards / "*.parquet"), "--output", str(tmp_path / "o"),
                 "--model_dir", str(model_dir), "--bogus_flag", "1"]) == 2
    assert "unknown option(s): --bogus_flag" in capsys.readouterr().err
