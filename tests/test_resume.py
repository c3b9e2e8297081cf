"""--skip_existing resumes by id: rows whose id already has an output row (a completion or a dead letter) in DIR are
skipped, so a shard renamed or re-exported upstream is not generated again; shards whose outputs exist are not read
at all, as before. Rows read = written + dead-lettered + skipped as done."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run import run


def table(ids: list[str], prompts: list[str]) -> pa.Table:
    return pa.table({"id": ids, "prompt": prompts})


def ids_in(path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column(0).to_pylist()


def test_a_renamed_and_re_exported_shard_is_not_generated_again(tmp_path, model_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(table(["a0", "a1", "a2"], ["the cat sat", "on the mat", ""]), src / "a.parquet")  # a2: dead
    pq.write_table(table(["b0", "b1"], ["rain fell", "over hills"]), src / "b.parquet")
    argv = ["--input", str(src / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
            "--max_new_tokens", "3", "--skip_existing"]
    first = run(argv)
    assert (first["rows_read"], first["rows_written"], first["rows_dead_lettered"]) == (5, 4, 1)
    assert first["rows_skipped_existing"] == 0 and first["accounted"]
    before = {f: f.read_bytes() for f in sorted(out.glob("*/a.parquet"))}

    # upstream re-exports shard a under a new name, with one new row; b is unchanged
    (src / "a.parquet").unlink()
    pq.write_table(table(["a0", "a1", "a2", "a3"], ["the cat sat", "on the mat", "", "a new row"]),
                   src / "a-2024-06-01.parquet")
    second = run(argv)
    assert second["shards_skipped_existing"] == [str(src / "b.parquet")]  # done: not read at all
    assert second["shards"] == 1 and second["rows_read"] == 4
    assert second["rows_skipped_existing"] == 3  # a0, a1 (completions) and a2 (a dead letter): done already
    assert (second["rows_written"], second["rows_dead_lettered"], second["accounted"]) == (1, 0, True)
    assert ids_in(out / "completions" / "a-2024-06-01.parquet") == ["a3"]  # only the new row was generated
    assert ids_in(out / "errors" / "a-2024-06-01.parquet") == []
    assert {f: f.read_bytes() for f in sorted(out.glob("*/a.parquet"))} == before  # the old outputs untouched

    # the same command again: every shard is done, nothing runs
    third = run(argv)
    assert third["shards_skipped_existing"] == [str(src / "a-2024-06-01.parquet"), str(src / "b.parquet")]
    assert (third["rows_read"], third["rows_skipped_existing"], third["accounted"]) == (0, 0, True)


def test_a_shard_redone_does_not_skip_its_own_rows(tmp_path, model_dir):
    """A shard that is not done (it lost its errors file) is generated again whole: the ids in the files it is about
    to replace are not "done", or its new files would lose them."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(table(["c0", "c1"], ["the cat sat", "on the mat"]), src / "c.parquet")
    argv = ["--input", str(src / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
            "--max_new_tokens", "2", "--skip_existing"]
    run(argv)
    rows = pq.read_table(out / "completions" / "c.parquet").to_pylist()
    (out / "errors" / "c.parquet").unlink()
    again = run(argv)
    assert (again["rows_read"], again["rows_written"], again["rows_skipped_existing"]) == (2, 2, 0)
    assert pq.read_table(out / "completions" / "c.parquet").to_pylist() == rows and again["accounted"]
