"""Bad input: every bad row or shard is a dead letter naming the file, the row and what is wrong; the good rows
beside it are generated; user errors exit 2 with one line and no traceback. One pipeline run checks all rows."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.run import main
from transforms.records import PromptRow
from transforms.unique_ids import split_duplicates
from transforms.validate import row_seed

MAX_NEW = 4
ONE_MB = "word " * 200_000

# id -> (prompt, overrides, expected reason); reason None = generated. All in rows.parquet, in this order.
ROWS = {
    "good": ("the cat sat on the mat", {}, None),
    "null": (None, {}, "prompt is null"),
    "empty": ("", {}, "prompt is empty"),
    "blank": (" \t\r\n ", {}, "prompt is only whitespace"),
    "ideographic-space": ("\u3000\u2003", {}, "prompt is only whitespace"),
    "one-mb": (ONE_MB, {}, "prompt tokens + 4 new tokens exceed the model context of 128 (use --truncate left"),
    "too-long": (" ".join(["cat"] * 150), {}, "150 prompt tokens + 4 new tokens exceed the model context of 128"),
    "negative-max-new": ("fine", {"max_new_tokens": -1}, "max_new_tokens must be an integer >= 1, got -1"),
    "no-room": ("fine", {"max_new_tokens": 200}, "max_new_tokens 200 leaves no room for a prompt"),
    "temperature-nan": ("fine", {"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    "temperature-inf": ("fine", {"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    "top-p-above-1": ("fine", {"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    "top-p-zero": ("fine", {"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    "top-k-negative": ("fine", {"top_k": -2}, "top_k must be an integer >= 0, got -2"),
    "seed-fraction": ("fine", {"seed": 1.5}, "column seed: expected an integer, got 1.5"),
    "emoji-zwj": ("family: \U0001F469\u200d\U0001F469\u200d\U0001F467 and \U0001D518", {}, None),
    "combining": ("cafe\u0301 na\u0308ive", {}, None),
    "rtl": ("\u0645\u0631\u062d\u0628\u0627 world", {}, None),
    "cjk": ("\u65e5\u672c\u8a9e\u306e\u6587", {}, None),
    "nul-and-controls": ("a\x00b\x07c\x1b[0m", {}, None),
    "zero-width-only": ("\u200b\ufeff", {}, None),  # not whitespace to Python: real (if odd) text
    "endoftext-literal": ("<|endoftext|> is plain text here", {}, None),
}
DUP_PROMPTS = ["the first row with the id dup", "a second row with the id dup"]  # the last two rows
ROW_IDS = list(ROWS) + ["dup", "dup"]


def write_rows(path: Path) -> None:
    overrides = [o for _, o, _ in ROWS.values()] + [{}, {}]
    columns = {"id": ROW_IDS, "prompt": [p for p, _, _ in ROWS.values()] + DUP_PROMPTS}
    for name, dtype in [("max_new_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()),
                        ("top_k", pa.int64()), ("seed", pa.float64())]:
        columns[name] = pa.array([o.get(name) for o in overrides], dtype)
    pq.write_table(pa.table(columns), path, row_group_size=5)


def corrupt_first_row_group(path: Path) -> None:
    """Flip the last bytes of row group 0's prompt column chunk (its data page; pages carry CRCs)."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    for i in range(end - 4, end):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_prompts")
    write_rows(d / "rows.parquet")
    pq.write_table(pa.table({"id": ["int0", "int1"], "prompt": [1, 2]}), d / "ints.parquet")
    utf8 = pa.array([b"fine text", b"\xff\xfe broken", b"more fine text"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["u0", "u1", "u2"], "prompt": utf8}), d / "utf8.parquet")
    pq.write_table(pa.table({"id": ["x"], "text": ["no prompt column"]}), d / "nocolumn.parquet")
    (d / "notparquet.parquet").write_text("id,prompt\n1,hello\n")
    pq.write_table(pa.table({"id": ["t0", "t1"], "prompt": ["a", "b"]}), d / "whole.tmp")
    (d / "truncated.parquet").write_bytes((d / "whole.tmp").read_bytes()[:-20])
    pq.write_table(pa.table({"prompt": [f"row {i} of a shard with a corrupt page" for i in range(6)]}),
                   d / "corrupt.parquet", row_group_size=3, write_page_checksum=True, compression="none")
    corrupt_first_row_group(d / "corrupt.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}),
                   d / "empty.parquet")
    pq.write_table(pa.table({"id": ["good", "z-own"], "prompt": ["same id as rows.parquet row 0", "mine"]}),
                   d / "z-later.parquet")  # sorts after rows.parquet: its "good" is the duplicate
    return d


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, shards, model_dir):
    out = tmp_path_factory.mktemp("bad_out")
    code = main(["--input", str(shards / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
                 "--max_new_tokens", str(MAX_NEW), "--batch_size", "4"])
    report = json.loads((out / "run_report.json").read_text())
    read = lambda sub, name: pq.read_table(out / sub / f"{name}.parquet").to_pylist()  # noqa: E731
    return code, report, out, read


def errors_by_id(read, name: str) -> dict[str, str]:
    return {e["id"]: e["error"] for e in read("errors", name)}


def test_bad_rows_are_dead_letters_naming_file_row_and_reason(bad_run, shards):
    _, _, _, read = bad_run
    errors = errors_by_id(read, "rows")
    expected = {i: reason for i, (_, _, reason) in ROWS.items() if reason}
    assert set(errors) == set(expected) | {"dup"}
    for row, rid in enumerate(ROWS):
        if rid in expected:
            assert errors[rid].startswith(f"row {row} of {shards / 'rows.parquet'}: "), errors[rid]
            assert expected[rid] in errors[rid], (rid, errors[rid])
    rows = shards / "rows.parquet"
    assert errors["dup"] == (f"row {len(ROWS) + 1} of {rows}: duplicate id 'dup': also at row {len(ROWS)} of "
                             f"{rows}, which is the row kept")
    dead = {e["id"]: e for e in read("errors", "rows")}
    assert dead["null"]["prompt"] is None and dead["one-mb"]["prompt"] == ONE_MB  # the original value is kept


def test_good_rows_beside_them_are_generated(bad_run, engines, model_dir):
    _, _, _, read = bad_run
    rows = {r["id"]: r for r in read("completions", "rows")}
    good = [i for i, (_, _, reason) in ROWS.items() if reason is None]
    assert sorted(rows) == sorted(good + ["dup"])
    assert rows["dup"]["prompt"] == DUP_PROMPTS[0]
    tok = Tokenizer(model_dir)
    for rid in good + ["dup"]:
        r = rows[rid]
        assert r["prompt"] == (ROWS[rid][0] if rid != "dup" else DUP_PROMPTS[0])  # Unicode round-trips exactly
        expected = engines[r["precision"]].generate([tok.encode(r["prompt"])], SamplingParams(MAX_NEW, seed=row_seed(0, rid)))[0]
        assert r["completion_token_ids"] == expected.token_ids and r["prompt_tokens"] == len(tok.encode(r["prompt"]))


def test_non_string_and_invalid_utf8_prompts(bad_run, shards):
    _, _, _, read = bad_run
    assert errors_by_id(read, "ints") == {f"int{i}": f"row {i} of {shards / 'ints.parquet'}: prompt is not a "
                                          "string but int" for i in (0, 1)}
    assert errors_by_id(read, "utf8") == {"u1": f"row 1 of {shards / 'utf8.parquet'}: prompt is not valid UTF-8 text"}
    assert [r["id"] for r in read("completions", "utf8")] == ["u0", "u2"]  # the rest of the batch is generated


def test_unreadable_shards_are_one_dead_letter_and_not_done(bad_run, shards):
    _, report, out, read = bad_run
    for name, what in [("nocolumn", "no prompt column 'prompt' (columns: ['id', 'text']; see --prompt_column)"),
                       ("notparquet", "magic bytes not found"), ("truncated", "")]:
        [e] = read("errors", name)
        assert e["id"] == f"{name}:*" and e["source"] == str(shards / f"{name}.parquet")
        assert e["error"].startswith(f"unreadable shard {shards / name}.parquet: ") and what in e["error"]
        assert not (out / "completions" / f"{name}.parquet").exists()  # --skip_existing will try it again
    assert sorted(report["unreadable_shards"]) == [str(shards / f"{n}.parquet")
                                                   for n in ("nocolumn", "notparquet", "truncated")]


def test_corrupt_row_group_dead_letters_its_rows_only(bad_run, shards):
    _, _, _, read = bad_run
    errors = errors_by_id(read, "corrupt")
    assert sorted(errors) == ["corrupt:0", "corrupt:1", "corrupt:2"]
    for i in range(3):
        assert errors[f"corrupt:{i}"].startswith(f"row {i} of {shards / 'corrupt.parquet'}: unreadable "
                                                 "(row group 0, rows 0..2): ")
    assert [r["id"] for r in read("completions", "corrupt")] == ["corrupt:3", "corrupt:4", "corrupt:5"]


def test_duplicate_across_shards_keeps_the_first_file(bad_run, shards):
    _, _, _, read = bad_run
    assert errors_by_id(read, "z-later") == {"good": (
        f"row 0 of {shards / 'z-later.parquet'}: duplicate id 'good': also at row 0 of {shards / 'rows.parquet'}, "
        "which is the row kept")}
    assert [r["id"] for r in read("completions", "z-later")] == ["z-own"]


def test_duplicates_keep_the_same_row_whatever_the_arrival_order():
    rows = [PromptRow("x", f"p{i}", {}, src, i) for src in ("b.parquet", "a.parquet") for i in (5, 3, 9)]
    splits = [split_duplicates(rows[k:] + rows[:k]) for k in range(len(rows))]
    assert {(first.source, first.row_index) for first, _ in splits} == {("a.parquet", 3)}
    assert all(len(dead) == 5 and "also at row 3 of a.parquet" in dead[0]["error"] for _, dead in splits)


def test_accounting_recorded_in_the_report(bad_run):
    code, report, out, _ = bad_run
    assert report["rows_read"] == report["rows_written"] + report["rows_dead_lettered"] and report["accounted"]
    written = sum(pq.read_metadata(f).num_rows for f in (out / "completions").glob("*.parquet"))
    dead = sum(pq.read_metadata(f).num_rows for f in (out / "errors").glob("*.parquet")) - 3  # 3 unreadable
    assert (report["rows_written"], report["rows_dead_lettered"]) == (written, dead)
    assert report["rows_read"] == len(ROW_IDS) + 2 + 3 + 6 + 0 + 2  # rows, ints, utf8, corrupt, empty, z-later
    assert pq.read_metadata(out / "completions" / "empty.parquet").num_rows == 0
    assert code == 1  # unreadable shards: the others are written, and the run says something needs a look
    assert not list((out / ".tmp").iterdir())


def user_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_user_errors_are_one_line_exit_2(tmp_path, shards, model_dir, capsys):
    base = ["--input", str(shards / "rows.parquet"), "--output", str(tmp_path / "o")]
    ok = base + ["--model_dir", str(model_dir)]
    pattern = str(tmp_path / "nothing-*.parquet")
    assert f"--input {pattern!r} matches no files" in user_error(capsys, "--input", pattern, *ok[2:])
    assert not (tmp_path / "o").exists()  # before any work
    assert "required: --model_dir" in user_error(capsys, *base)
    assert "unknown option(s): --max_new_tokes" in user_error(capsys, *ok, "--max_new_tokes", "3")
    assert "unknown option(s): --bogus" in user_error(capsys, *ok, "--bogus")
    assert "--max_new_tokens: invalid int value: 'many'" in user_error(capsys, *ok, "--max_new_tokens", "many")
    assert "--max_new_tokens must be >= 1, got -1" in user_error(capsys, *ok, "--max_new_tokens", "-1")
    assert "--temperature must be a finite number >= 0, got nan" in user_error(capsys, *ok, "--temperature", "nan")
    assert "--top_p must be in (0, 1], got 1.5" in user_error(capsys, *ok, "--top_p", "1.5")
    assert "--run_seconds must be > 0, got 0.0" in user_error(capsys, *ok, "--run_seconds", "0")
    assert "--direct_num_workers: invalid int value: 'two'" in user_error(capsys, *ok, "--direct_num_workers",
                                                                          "two")
    (tmp_path / "afile").write_text("")
    assert f"--output '{tmp_path / 'afile'}': cannot create completions/" in user_error(
        capsys, *ok[:2], "--output", str(tmp_path / "afile"), *ok[4:])


def test_broken_model_dirs_are_one_line_exit_2(tmp_path, shards, model_dir, capsys):
    base = ["--input", str(shards / "rows.parquet"), "--output", str(tmp_path / "o"), "--model_dir"]
    assert "no manifest.json" in user_error(capsys, *base, str(tmp_path / "missing"))
    broken = tmp_path / "m"
    shutil.copytree(model_dir, broken)
    (broken / "merges.txt").write_text("tampered")
    assert "merges.txt does not match its sha256" in user_error(capsys, *base, str(broken))
    (broken / "merges.txt").unlink()
    assert f"{broken}: merges.txt is listed in the manifest but missing" in user_error(capsys, *base, str(broken))
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert "format_version 99 is newer than this loader supports" in user_error(capsys, *base, str(broken))
    assert not (tmp_path / "o").exists()


def test_the_command_line_prints_no_traceback(tmp_path, model_dir):
    pattern = str(tmp_path / "none-*.parquet")
    p = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", pattern, "--output", str(tmp_path / "o"),
                        "--model_dir", str(model_dir)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=Path(__file__).parents[1])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    ours = [line for line in p.stderr.splitlines() if line.startswith("error: ")]  # TF's C++ start-up noise aside
    assert ours == [f"error: --input {pattern!r} matches no files"]
