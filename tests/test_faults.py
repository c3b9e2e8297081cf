"""Nothing lost: a failing batch costs only the rows that fail alone, a run killed midway leaves no partial file and
its re-run completes the job, a worker process keeps one model and frees it, and --skip_existing redoes exactly the
shards that are not done. Real model, real DoFns and pipelines; only the faults are injected."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.utils.shared import Shared

from lmgraph.loader import GenerationModel
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.run import run
from transforms.generate import GenerateBatches
from transforms.records import ERRORS, Request
from transforms.validate import row_seed

REPO = Path(__file__).parents[1]
# The DirectRunner's in-process engine, named: these tests look into the process that runs the DoFns, and the
# DirectRunner would first try Prism wherever it can download it.
IN_PROCESS = "FnApiRunner"

# --- 1. a failing batch is split and retried down to single rows ---------------------------------------------------

FITS = 2  # batches of more rows run out of memory
POISON = "this prompt fails whatever batch it is in"
CALLS: list[int] = []  # sizes of the batches tried, in order (the DirectRunner runs in this process)
OUT: dict[str, list] = {"ok": [], ERRORS: []}


def collect(element, tag: str) -> None:
    OUT[tag].append(element)


class FaultyModel:
    """The real model, except that a batch of more than FITS rows runs out of memory and the poison prompt fails
    anywhere, alone too."""

    def __init__(self, model: GenerationModel, poison: list[int]):
        self.model, self.poison = model, poison
        self.precision = model.precision

    def generate_parts(self, prompts, params, logprobs=True, slots=None, stops=(), seconds=None):
        CALLS.append(len(prompts))
        if len(prompts) > FITS:
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating tensor for {len(prompts)} rows")
        if self.poison in [list(p) for p in prompts]:
            raise tf.errors.InvalidArgumentError(None, None, "logits are NaN")
        yield from self.model.generate_parts(prompts, params, logprobs, slots, stops, seconds)


class FaultyGenerate(GenerateBatches):
    """GenerateBatches as it is, its model (loaded by its own setup) wrapped in FaultyModel."""

    def __init__(self, model_dir: str, poison: list[int]):
        super().__init__(model_dir, precision="float32", intra_threads=2)  # compared with the float32 `model`
        self.poison = poison

    def setup(self):
        super().setup()
        self._model = FaultyModel(self._model, self.poison)


def test_failing_batch_is_split_down_to_the_rows_that_fail_alone(model, model_dir):
    """Out of memory on a big batch must cost a retry, not rows; a row that fails even alone costs only itself,
    and its dead letter says which row of which file and why."""
    tok = Tokenizer(model_dir)
    prompts = ["the cat sat", "on a warm mat", "while rain fell", "over quiet hills", "and rivers ran",
               POISON, "to the sea", "the end"]
    batch = [Request(f"r{i}", text, tok.encode(text), SamplingParams(
        max_new_tokens=5, temperature=0.8 * (i % 2), seed=row_seed(0, f"r{i}")), "in/part-0.parquet", i)
        for i, text in enumerate(prompts)]
    CALLS.clear()
    for rows in OUT.values():
        rows.clear()
    p = beam.Pipeline(runner=IN_PROCESS)
    out = (p | beam.Create([batch])
           | beam.ParDo(FaultyGenerate(str(model_dir), tok.encode(POISON))).with_outputs(ERRORS, main="ok"))
    _ = out.ok | "Ok" >> beam.Map(collect, "ok")
    _ = out[ERRORS] | "Dead" >> beam.Map(collect, ERRORS)
    result = p.run()
    result.wait_until_finish()

    # 8 rows in order: halves of 4 fail, their halves of 2 fit, except [r4, poison], whose r4 alone fits and
    # poison fails
    assert CALLS == [8, 4, 2, 2, 4, 2, 1, 1, 2]
    results = {r.request.id: r for r in OUT["ok"]}
    assert sorted(results) == [f"r{i}" for i in range(8) if i != 5]
    for r in batch:
        if r.id in results:
            alone = model.generate([r.token_ids], [r.params])[0]
            assert (results[r.id].token_ids, results[r.id].finish_reason) == (alone.token_ids, alone.finish_reason)
    assert OUT[ERRORS] == [{"id": "r5", "prompt": POISON, "source": "in/part-0.parquet", "row_index": 5,
                            "error": "row 5 of in/part-0.parquet: generation failed: InvalidArgumentError: "
                                     "logits are NaN"}]
    metrics = result.metrics().query(MetricsFilter().with_namespace("gpt2"))
    counters = {c.key.metric.name: c.result for c in metrics["counters"]}
    assert (counters["dead_letters"], counters["prompts"]) == (1, 7)
    sizes = [d.result for d in metrics["distributions"] if d.key.metric.name == "rows_per_part"][0]
    assert (sizes.count, sizes.sum, sizes.max) == (4, 7, 2)  # only the batches that worked: 2, 2, 1, 2


# --- 2. a run killed midway --------------------------------------------------------------------------------------

def write_shards(directory: Path, shards: int, rows: int) -> None:
    """Row 0 of each shard is empty (a dead letter), so that every shard has both files with rows in them."""
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        prompts = [""] + [f"shard {s} row {i} " * (1 + i % 4) for i in range(1, rows)]
        pq.write_table(pa.table({"id": [f"s{s}-{i}" for i in range(rows)], "prompt": prompts}),
                       directory / f"part-{s:02d}.parquet")


def outputs(out: Path) -> dict[str, list[dict]]:
    return {f"{f.parent.name}/{f.name}": pq.read_table(f).to_pylist()
            for sub in ("completions", "errors") for f in sorted((out / sub).glob("*"))}


def test_killed_run_leaves_no_partial_file_and_its_rerun_completes_it(tmp_path, model_dir):
    """Preemption or a crash mid-job: every final file is whole (written to .tmp/, then renamed), and running the
    same command again does the shards that are not done and gives what one uninterrupted run gives."""
    shards, rows = 10, 12
    write_shards(tmp_path / "in", shards, rows)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in" / "*.parquet"), "--model_dir", str(model_dir), "--max_new_tokens", "4",
            "--batch_size", "4", "--skip_existing"]
    command = [sys.executable, "-m", "pipeline.run", *args, "--output", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while job.poll() is None and time.monotonic() < deadline:
            if (out / "completions").is_dir() and any((out / "completions").iterdir()):
                break
            time.sleep(0.001)
    finally:
        job.kill()
    assert job.wait() == -signal.SIGKILL, "the job ended before it was killed"
    done = sorted(f.name for f in (out / "completions").iterdir())
    assert 1 <= len(done) < shards  # killed while writing: some shards done, some not
    dead = {f"part-{s:02d}.parquet": [f"s{s}-0"] for s in range(shards)}  # each shard's empty prompt
    for f in (out / "completions").iterdir():  # whole files only, each with all its shard's rows
        assert pq.read_table(f).num_rows == rows - 1
    for f in (out / "errors").iterdir():
        assert pq.read_table(f).column("id").to_pylist() == dead[f.name]
    assert set(done) <= {f.name for f in (out / "errors").iterdir()}  # errors are written first
    assert not (out / "run_report.json").exists()
    # a kill within a write leaves a partial temporary file (too brief a moment to hit by timing): as it would be
    (out / ".tmp" / "0123abcd-part-00.parquet").write_bytes((out / "completions" / done[0]).read_bytes()[:100])

    with open(tmp_path / "rerun.log", "w") as log:
        rerun = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        fresh = run([*args, "--output", str(tmp_path / "fresh")])  # uninterrupted, meanwhile
        assert rerun.wait(timeout=300) == 0, (tmp_path / "rerun.log").read_text()[-2000:]
    assert fresh["rows_read"] == shards * rows and fresh["accounted"]
    report = json.loads((out / "run_report.json").read_text())
    assert report["shards_skipped_existing"] == [str(tmp_path / "in" / name) for name in done]
    assert report["rows_read"] == (shards - len(done)) * rows and report["accounted"]
    assert outputs(out) == outputs(tmp_path / "fresh")
    assert not list((out / ".tmp").iterdir())


# --- 3. one model per worker process, freed when done -------------------------------------------------------------

def rss_mb() -> float:
    """Resident memory after handing freed heap back to the OS: glibc keeps freed memory in per-thread arenas, which
    would show as growth where nothing is alive."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_a_worker_process_keeps_one_model_for_all_its_bundles_and_frees_it(tmp_path, model_dir, monkeypatch):
    """A model per bundle or DoFn instance would multiply load time and memory; a model kept after its job would
    grow a long-lived process (a notebook, a test session) by one model per job. Three workers (threads, each
    with its own DoFn and bundle) per run, three runs."""
    write_shards(tmp_path / "in", shards=6, rows=4)
    built: list[tuple[weakref.ref, tf.compat.v1.Session]] = []  # every GenerationModel of this process
    setups: list[int] = []  # threads that set up a GenerateBatches
    init, setup = GenerationModel.__init__, GenerateBatches.setup

    def counting_init(self, model_dir, **kwargs):
        init(self, model_dir, **kwargs)
        built.append((weakref.ref(self), self.session))

    def counting_setup(self):
        setups.append(threading.get_ident())
        setup(self)

    monkeypatch.setattr(GenerationModel, "__init__", counting_init)
    monkeypatch.setattr(GenerateBatches, "setup", counting_setup)
    memory = []
    for i in range(3):
        before, threads = len(built), len(setups)
        report = run(["--input", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / f"out{i}"),
                      "--model_dir", str(model_dir), "--max_new_tokens", "2", "--batch_size", "2",
                      "--runner", IN_PROCESS, "--direct_num_workers", "3", "--direct_running_mode", "multi_threading"])
        assert report["accounted"] and report["rows_written"] == 6 * 3
        assert len(built) == before + 1  # one model for the run...
        assert len(set(setups[threads:])) >= 2  # ...though DoFns on several threads set up and used it
        gc.collect()
        # earlier runs' models are gone and their sessions closed; Beam's Shared keeps the last one acquired
        assert all(ref() is None and session._closed for ref, session in built[:-1])
        memory.append(rss_mb())
    assert memory[-1] - memory[0] < 100, memory  # a model left alive per run costs ~145 MB


class Other:
    """Something else acquired through Shared: Beam keeps only the last object acquired alive on its own."""


def test_teardown_drops_the_model_and_its_session_closes(model_dir):
    """A torn-down DoFn must not keep the model: its Session (graph, weights, threads) goes with the last reference."""
    dofn = GenerateBatches(str(model_dir), intra_threads=1)
    dofn.setup()
    model, session = weakref.ref(dofn._model), dofn._model.session
    const = next(op for op in session.graph.get_operations() if op.type == "Const").outputs[0]
    Shared().acquire(Other)  # displaces Shared's own reference to the model
    gc.collect()
    assert model() is not None and not session._closed  # the set-up DoFn holds it
    session.run(const)
    dofn.teardown()
    gc.collect()
    assert model() is None and session._closed  # the finalizer ran with the last reference
    with pytest.raises(RuntimeError, match="closed Session"):
        session.run(const)


# --- 4. --skip_existing ------------------------------------------------------------------------------------------

def test_skip_existing_redoes_exactly_the_shards_not_done(tmp_path, model_dir):
    """Daily incremental runs and re-runs: a shard is done when both its files exist, and only then skipped and
    left untouched; a new shard, one that was unreadable, or one that lost a file is done (again)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()

    def table(name: str, n: int) -> pa.Table:
        return pa.table({"id": [f"{name}{i}" for i in range(n)], "prompt": [f"prompt {i} of {name}" for i in range(n)]})

    for name, n in [("a", 3), ("b", 2), ("e", 2)]:
        pq.write_table(table(name, n), src / f"{name}.parquet")
    (src / "c.parquet").write_text("not parquet yet")
    argv = ["--input", str(src / "*.parquet"), "--output", str(out), "--model_dir", str(model_dir),
            "--max_new_tokens", "3", "--skip_existing"]
    first = run(argv)
    assert first["unreadable_shards"] == [str(src / "c.parquet")] and first["shards_skipped_existing"] == []
    assert not (out / "completions" / "c.parquet").exists()
    kept = {f: f.stat().st_mtime_ns for f in [out / "completions" / "a.parquet", out / "errors" / "a.parquet"]}
    b_rows = pq.read_table(out / "completions" / "b.parquet").to_pylist()

    pq.write_table(table("d", 4), src / "d.parquet")  # a new shard
    pq.write_table(table("c", 1), src / "c.parquet")  # readable now
    (out / "completions" / "b.parquet").unlink()  # a shard with its errors file only
    (out / "errors" / "e.parquet").unlink()  # and one with its completions file only
    time.sleep(0.01)  # mtimes would differ if a's files were rewritten
    second = run(argv)
    assert second["shards_skipped_existing"] == [str(src / "a.parquet")] and second["shards"] == 4
    assert (second["rows_read"], second["rows_written"], second["accounted"]) == (2 + 1 + 4 + 2, 9, True)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert pq.read_table(out / "completions" / "b.parquet").to_pylist() == b_rows
    for name, n in [("c", 1), ("d", 4), ("e", 2)]:
        assert pq.read_table(out / "completions" / f"{name}.parquet").column("id").to_pylist() == \
            [f"{name}{i}" for i in range(n)]
        assert pq.read_metadata(out / "errors" / f"{name}.parquet").num_rows == 0
