"""--num_samples: N completions per prompt, each with `sample` and a seed of its own derived from (run seed, id,
sample), the same alone and in any batch; a row's samples batched together (its prompt prefilled once), written
whole or dead-lettered once; N=1 is the job as it was."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.run import run
from transforms import GenerateText
from transforms.batching import BATCHES, cut_batches, plan_batches, sort_key
from transforms.generate import row_units
from transforms.records import Request
from transforms.validate import expand_samples, row_seed, sample_seed
from transforms.write import COMPLETIONS_SCHEMA, completions_schema, whole_rows

PROMPTS = ["the cat sat on the mat", "while rain fell over quiet hills", "and rivers ran to the sea", "once upon",
           "a warm mat"]
SAMPLED = ["--temperature", "1.5", "--seed", "5", "--max_new_tokens", "6", "--precision", "float32"]


def req(rid: str, length: int, n: int, new_tokens: int = 8) -> Request:
    return Request(rid, "", [len(rid)] * length, SamplingParams(max_new_tokens=new_tokens, seed=1), "in.parquet",
                   int(rid[1:]), num_samples=n, with_sample=n > 1)


def test_samples_stay_together_unless_they_alone_exceed_a_batch():
    rows = [req(f"r{i}", 5 + i % 3, 3) for i in range(10)]
    samples = [s for r in rows for s in expand_samples(r)]
    assert [s.sample for s in samples[:3]] == [0, 1, 2]
    assert [s.params.seed for s in samples[:3]] == [1, sample_seed(1, 1), sample_seed(1, 2)]
    batches = list(plan_batches(samples, 8, 1 << 30, block=7, policy=BATCHES))  # blocks end mid-row: read on
    assert sorted(s.id for b in batches for s in b) == sorted(s.id for s in samples)
    assert all(len(b) <= 8 for b in batches) and len(batches) == 5  # 2 rows (6 samples) a batch of 8
    for b in batches:
        for r in {s.id for s in b}:
            assert [s.sample for s in b if s.id == r] == [0, 1, 2]  # all of a row's samples, adjacent, in order
    # a row of 10 samples in batches of 4: split only because it alone exceeds one
    ten = list(expand_samples(req("r0", 5, 10)))
    assert [[s.sample for s in b] for b in cut_batches(ten, 4, 1 << 30)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # ... or max_batch_tokens: (5 + 8) tokens per row, 26 tokens a batch
    assert [len(b) for b in cut_batches(ten, 64, 26)] == [2] * 5
    # interleaved arrival is sorted back to rows
    mixed = sorted([s for r in rows[:2] for s in expand_samples(r)][::-1], key=sort_key)
    assert [(s.id, s.sample) for s in mixed] == [("r0", 0), ("r0", 1), ("r0", 2), ("r1", 0), ("r1", 1), ("r1", 2)]
    assert [[s.sample for s in u] for u in row_units(mixed + [req("r9", 5, 1)])] == [[0, 1, 2], [0, 1, 2], [0]]


def test_a_row_is_written_whole_or_dead_lettered_once():
    out = [{"id": "a", "sample": k, "row_index": 0} for k in range(3)] + \
        [{"id": "b", "sample": k, "row_index": 1} for k in (0, 2)]
    errors = [{"id": "b", "row_index": 1, "error": "generation failed (samples 1..1 of 3): X"},
              {"id": "b", "row_index": 1, "error": "generation failed (samples 3..3 of 3): X"}]
    kept, dead = whole_rows(out[::-1], errors)
    assert [(r["id"], r["sample"]) for r in kept] == [("a", 0), ("a", 1), ("a", 2)]
    assert len(dead) == 1 and dead[0]["error"].startswith("generation failed (samples 1..1 of 3): X (2 other")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples_in")
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(5)] + ["empty"], "prompt": PROMPTS + [""]}),
                   d / "in.parquet")
    return d


def run_job(out, shards, model_dir, *extra):
    report = run(["--input", str(shards / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
                  "--progress_seconds", "0", *extra])
    return report, pq.read_table(out / "completions" / "in.parquet"), pq.read_table(out / "errors" / "in.parquet")


@pytest.fixture(scope="module")
def three(tmp_path_factory, shards, model_dir):
    return run_job(tmp_path_factory.mktemp("three"), shards, model_dir, *SAMPLED, "--num_samples", "3",
                   "--batch_size", "16")


def test_three_samples_per_id_each_equal_to_the_engine_alone(three, model, model_dir):
    report, table, errors = three
    assert table.schema.remove_metadata() == completions_schema(samples=True)
    rows = table.to_pylist()
    assert [(r["id"], r["sample"]) for r in rows] == [(f"p{i}", k) for i in range(5) for k in range(3)]
    tok = Tokenizer(model_dir)
    for i, prompt in enumerate(PROMPTS):
        mine = [r for r in rows if r["id"] == f"p{i}"]
        assert len({tuple(r["completion_token_ids"]) for r in mine}) == 3  # distinct at temperature 1.5
        for r in mine:
            seed = sample_seed(row_seed(5, r["id"]), r["sample"])
            alone = model.generate([tok.encode(prompt)], SamplingParams(max_new_tokens=6, temperature=1.5,
                                                                         seed=seed))[0]
            assert r["completion_token_ids"] == alone.token_ids and r["finish_reason"] == alone.finish_reason
    # one dead letter for the empty prompt, not three; rows written are samples, rows completed are input rows
    assert errors.column("id").to_pylist() == ["empty"]
    assert (report["rows_read"], report["rows_written"], report["rows_completed"], report["rows_dead_lettered"]) == \
        (6, 15, 5, 1) and report["accounted"]


def test_the_same_samples_in_batches_of_one(three, tmp_path, shards, model_dir):
    _, table, _ = run_job(tmp_path, shards, model_dir, *SAMPLED, "--num_samples", "3", "--batch_size", "1")
    assert table.to_pylist() == three[1].to_pylist()


def test_one_sample_is_the_job_as_it_was(three, tmp_path, shards, model_dir):
    """Without --num_samples: today's schema and rows; --num_samples 1: the same rows with sample 0; and sample 0
    of N is that row (its seed is the row's seed)."""
    _, plain, _ = run_job(tmp_path / "plain", shards, model_dir, *SAMPLED, "--batch_size", "16")
    _, one, _ = run_job(tmp_path / "one", shards, model_dir, *SAMPLED, "--num_samples", "1", "--batch_size", "16")
    assert plain.schema.remove_metadata() == COMPLETIONS_SCHEMA
    assert one.column("sample").to_pylist() == [0] * 5
    assert one.drop_columns(["sample"]).to_pylist() == plain.to_pylist()
    first = [r for r in three[1].to_pylist() if r["sample"] == 0]
    assert [{k: v for k, v in r.items() if k != "sample"} for r in first] == plain.to_pylist()


def test_a_num_samples_column_and_resume(tmp_path, model_dir):
    """Per-row num_samples (null: the run's); with --skip_existing an id is done once its row was written (all
    its samples: a row is written whole), so a re-exported shard generates only its new ids."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": PROMPTS[:3], "num_samples": [2, None, 0]}),
                   src / "a.parquet")
    argv = ["--input", str(src / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
            "--max_new_tokens", "3", "--temperature", "1", "--skip_existing", "--progress_seconds", "0"]
    first = run(argv)
    table = pq.read_table(out / "completions" / "a.parquet")
    assert table.schema.remove_metadata() == completions_schema(samples=True)  # the column gives `sample`
    assert [(r["id"], r["sample"]) for r in table.to_pylist()] == [("a", 0), ("a", 1), ("b", 0)]
    assert "num_samples must be an integer >= 1, got 0" in \
        pq.read_table(out / "errors" / "a.parquet").column("error")[0].as_py()
    assert (first["rows_written"], first["rows_completed"], first["rows_dead_lettered"]) == (3, 2, 1)

    (src / "a.parquet").unlink()
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": PROMPTS[:4], "num_samples": [2, None, 0, 3]}),
                   src / "a2.parquet")
    second = run(argv)
    assert second["rows_skipped_existing"] == 3 and second["accounted"]
    again = pq.read_table(out / "completions" / "a2.parquet").to_pylist()
    assert [(r["id"], r["sample"]) for r in again] == [("d", 0), ("d", 1), ("d", 2)]
    assert (second["rows_written"], second["rows_completed"]) == (3, 1)


OUT: list = []


def collect(row: dict) -> None:
    OUT.append(row)  # the in-process runner runs this in this process


def test_generate_text_samples_rows_that_ask(model_dir):
    """GenerateText without num_samples: only rows that set num_samples get `sample`."""
    OUT.clear()
    rows = [{"id": "x", "prompt": "the cat", "num_samples": 2}, {"id": "y", "prompt": "a mat"}]
    with beam.Pipeline(runner="FnApiRunner") as p:
        result = p | beam.Create(rows) | GenerateText(str(model_dir), max_new_tokens=2, temperature=1.0,
                                                       precision="float32")
        _ = result.completions | beam.Map(collect)
    rows = sorted(OUT, key=lambda r: (r["id"], r.get("sample", -1)))
    assert [(r["id"], r.get("sample")) for r in rows] == [("x", 0), ("x", 1), ("y", None)]
    assert "num_samples" not in rows[0] and list(rows[0])[:2] == ["id", "sample"]
