"""JSON Lines in and out: `--input '*.jsonl'` reads like Parquet (a bad line is a dead letter naming its file and
line), `--output_format jsonl` writes the same fields as Parquet, one whole file per shard; the run report and
--skip_existing work alike."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import run
from transforms.detokenize import COMPLETION_FIELDS
from transforms.write import ERRORS_SCHEMA

GOOD = [{"id": "g0", "prompt": "the cat sat on the mat"},
        {"id": "g1", "prompt": "while rain fell", "max_new_tokens": 2, "note": "other keys are ignored"},
        {"prompt": "a row without an id"},
        {"id": 7, "prompt": "an id that is a number", "temperature": 0.9, "seed": 5},
        {"id": "g4", "prompt": "caf\u00e9 \u65e5\u672c \U0001F469\u200d\U0001F469 \u2028 line separator"}]
# (line as written, reason in its dead letter); the line number is the position in this list + 1
BAD = [('{"id": "b0", "prompt": "fine"', "not a JSON object: Expecting ',' delimiter"),
       ("just some text", "not a JSON object: Expecting value"),
       ("[1, 2, 3]", "not a JSON object but an array"),
       ('"a string"', "not a JSON object but a string"),
       ('{"id": "b4", "text": "no prompt key"}', "no 'prompt' key (keys: ['id', 'text']; see --prompt_column)"),
       ('{"id": "b5", "prompt": null}', "prompt is null"),
       ('{"id": "b6", "prompt": ""}', "prompt is empty"),
       ('{"id": "b7", "prompt": 42}', "prompt is not a string but int"),
       ('{"id": "b8", "prompt": "fine", "top_p": 1.5}', "top_p must be in (0, 1], got 1.5"),
       ('{"id": "b9", "prompt": "lone \\ud800 surrogate"}', "prompt is not valid Unicode text"),
       ("", None),  # blank lines are not rows
       ("   ", None),
       ('{"id": "g0", "prompt": "a duplicate id"}', "duplicate id 'g0': also at line 1 of "),
       (b'{"id": "b13", "prompt": "\xff\xfe"}', "not valid UTF-8")]


def write_jsonl(path: Path, lines: list) -> None:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("jsonl_in")
    write_jsonl(d / "good.jsonl", [json.dumps(r, ensure_ascii=False) for r in GOOD])
    write_jsonl(d / "z-bad.jsonl", [line for line, _ in BAD])
    pq.write_table(pa.table({"id": ["g0", "g1", None, "7", "g4"], "prompt": [r["prompt"] for r in GOOD],
                             "max_new_tokens": [None, 2, None, None, None],
                             "temperature": [None, None, None, 0.9, None], "seed": [None, None, None, 5, None]}),
                   d / "good.parquet")
    return d


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, inputs, model_dir):
    out = tmp_path_factory.mktemp("jsonl_out")
    argv = ["--input", str(inputs / "*.jsonl"), "--output", str(out), "--model_dir", str(model_dir),
            "--max_new_tokens", "4", "--output_format", "jsonl", "--skip_existing"]
    return argv, run(argv), out


def test_bad_lines_are_dead_letters_naming_file_and_line(jsonl_run, inputs):
    _, report, out = jsonl_run
    errors = read_jsonl(out / "errors" / "z-bad.jsonl")
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD, 1) if reason]
    assert len(errors) == len(expected)
    for e, (line, reason) in zip(errors, expected):  # in line order
        assert e["error"].startswith(f"line {line} of {inputs / 'z-bad.jsonl'}: ") and reason in e["error"], e
        assert list(e) == ERRORS_SCHEMA.names and e["source"] == str(inputs / "z-bad.jsonl")
    by_id = {e["id"]: e for e in errors}
    assert "z-bad:1" in by_id and "z-bad:2" in by_id  # unparseable lines: ids from the shard and line
    assert by_id["b5"]["prompt"] is None and by_id["b7"]["prompt"] == "42"
    assert by_id["b9"]["prompt"] == "lone \\ud800 surrogate"  # kept as text that UTF-8 can hold
    assert (out / "completions" / "z-bad.jsonl").read_bytes() == b""  # the shard is done: no completions
    assert report["rows_read"] == len(GOOD) + len(expected)  # blank lines are not rows
    assert report["rows_written"] == len(GOOD) and report["rows_dead_lettered"] == len(expected)
    assert report["accounted"]


def test_jsonl_round_trip_equals_parquet(jsonl_run, inputs, model_dir, tmp_path):
    _, _, out = jsonl_run
    rows = read_jsonl(out / "completions" / "good.jsonl")
    assert [list(r) for r in rows] == [list(COMPLETION_FIELDS)] * len(GOOD)  # exactly the Parquet fields
    assert [r["id"] for r in rows] == ["g0", "g1", "good:3", "7", "g4"]  # line order; ids as text
    assert rows[4]["prompt"] == GOOD[4]["prompt"]  # Unicode round-trips, U+2028 inside a line too
    parquet = run(["--input", str(inputs / "good.parquet"), "--output", str(tmp_path / "pq"),
                   "--model_dir", str(model_dir), "--max_new_tokens", "4"])
    assert parquet["accounted"]
    expected = pq.read_table(tmp_path / "pq" / "completions" / "good.parquet").to_pylist()
    expected[2]["id"] = "good:3"  # without an id: <shard>:<row from 0> in Parquet, <shard>:<line from 1> in JSONL
    assert rows == expected


def test_skip_existing_with_jsonl_outputs(jsonl_run, inputs, tmp_path):
    argv, _, out = jsonl_run
    again = run(argv)  # both shards have both files: nothing is read again
    assert again["shards_skipped_existing"] == [str(inputs / "good.jsonl"), str(inputs / "z-bad.jsonl")]
    assert again["rows_read"] == 0 and again["accounted"]
    # the good shard under another name: its ids are in the JSONL outputs, except the id-less row's, which is
    # named after the shard
    (tmp_path / "good-renamed.jsonl").write_bytes((inputs / "good.jsonl").read_bytes())
    renamed = run([*argv[:1], str(tmp_path / "good-renamed.jsonl"), *argv[2:]])
    assert (renamed["rows_read"], renamed["rows_skipped_existing"], renamed["rows_written"]) == (5, 4, 1)
    assert [r["id"] for r in read_jsonl(out / "completions" / "good-renamed.jsonl")] == ["good-renamed:3"]
    assert renamed["accounted"]
