"""What the job prints: its own lines (model and precision, shards, progress, summary) and Beam's warnings, not Beam's
internals; progress lines (rows done of the total, tokens/s, ETA) while a local run runs, in-process and with
worker processes."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.progress import duration, progress_line, read_totals
from pipeline.run import configure_logging, run
from tests.helpers import write_shards
from transforms import progress as progress_counters
from transforms.progress import PROGRESS_DIR_ENV, ROWS_DONE, ROWS_SKIPPED, TOKENS

REPO = Path(__file__).resolve().parents[1]
SHARDS, ROWS = 3, 4
PROGRESS = re.compile(rf"progress: \d+/{SHARDS * ROWS} rows \(\d+%\).*, [\d.]+ tokens/s, ETA \S+")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("console_in")
    write_shards(d, SHARDS, ROWS)
    return d


def test_the_console_shows_the_jobs_lines_not_beams_internals(shards, model_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", str(shards / "*.parquet"),
                        "--output", str(tmp_path / "o"), "--model_dir", str(model_dir), "--max_new_tokens", "4",
                        "--progress_seconds", "0.2"],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Converting string literal type hint" not in p.stderr
    assert "prism" not in p.stderr.lower()  # the default runner does not try to download Prism
    assert re.search(r"INFO model tiny@[0-9a-f]{12}, precision auto; 3 shard\(s\) to do \(12 rows\)", p.stderr)
    assert re.search(r"INFO model tiny@[0-9a-f]{12} loaded .*(float32|bfloat16|float16)", p.stderr)  # as run
    assert PROGRESS.search(p.stderr), p.stderr[-3000:]
    assert re.search(r"INFO done: 12 rows read, 12 written, 0 dead-lettered, 0 skipped as done; 48 generated tokens in "
                     r".* precision \w+", p.stderr)
    assert p.stdout == ""


TF_STARTUP = ("cuInit", "oneDNN custom operations", "absl::InitializeLog", "rebuild TensorFlow")


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_tensorflows_startup_lines_only_with_debug(shards, model_dir, tmp_path, log_level):
    """A job on the launcher and 2 worker processes, in an environment that does not set TF_CPP_MIN_LOG_LEVEL:
    TensorFlow's C++ start-up lines (its oneDNN notice, and "failed call to cuInit" on every CPU machine) are shown
    with --log_level DEBUG only."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", str(shards / "*.parquet"),
                        "--output", str(tmp_path / "o"), "--model_dir", str(model_dir), "--max_new_tokens", "2",
                        "--log_level", log_level, "--direct_num_workers", "2",
                        "--direct_running_mode", "multi_processing"],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    shown = [line for line in p.stderr.splitlines() if any(s in line for s in TF_STARTUP)]
    if log_level == "DEBUG":
        assert shown, p.stderr[-3000:]  # which lines depends on the CPU: the oneDNN notice only where oneDNN is on by default
    else:
        assert shown == [], shown


def test_progress_lines_with_worker_processes(model_dir, tmp_path, caplog):
    """multi_processing: the workers are other processes, and the launcher still sees their counts."""
    write_shards(tmp_path / "in", 3, 40)  # 30 batches of 4: long enough for counts to show before the end
    caplog.set_level(logging.INFO, logger="pipeline")
    report = run(["--input", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / "o"), "--model_dir",
                  str(model_dir), "--max_new_tokens", "8", "--batch_size", "4", "--progress_seconds", "0.3",
                  "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    assert report["accounted"] and report["rows_written"] == 120
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    progress = re.compile(r"progress: (\d+)/120 rows \(\d+%\), [\d.]+ tokens/s, ETA \S+")
    assert all(progress.fullmatch(line) for line in lines), lines
    assert any(int(progress.fullmatch(line)[1]) > 0 for line in lines), lines  # the workers' counts came through


def test_progress_line_and_eta():
    assert duration(42) == "42s" and duration(125) == "2m05s" and duration(3 * 3600 + 61) == "3h01m"
    counts = {ROWS_DONE: 100, ROWS_SKIPPED: 500, TOKENS: 6400}
    # 100 rows in 10 s: 10 rows/s, 400 left: 40 s; the 500 skipped as done do not count in the rate
    assert progress_line(counts, 1000, 10.0) == \
        "progress: 600/1,000 rows (60%), 500 skipped as done, 640.0 tokens/s, ETA 40s"
    assert progress_line({}, 10, 5.0) == "progress: 0/10 rows (0%), 0.0 tokens/s, ETA unknown"
    # rates over the last 5 s, since the counts were {ROWS_DONE: 50, ...}: 10 rows/s, 300 tokens/s
    since = {ROWS_DONE: 50, ROWS_SKIPPED: 500, TOKENS: 4900}
    assert progress_line(counts, 1000, 5.0, since) == \
        "progress: 600/1,000 rows (60%), 500 skipped as done, 300.0 tokens/s, ETA 40s"


def test_log_levels():
    beam, ours = logging.getLogger("apache_beam.typehints"), logging.getLogger("transforms.read")
    try:
        configure_logging("INFO")
        assert ours.isEnabledFor(logging.INFO) and not ours.isEnabledFor(logging.DEBUG)
        assert beam.isEnabledFor(logging.WARNING) and not beam.isEnabledFor(logging.INFO)
        configure_logging("DEBUG")  # ours from DEBUG, Beam's from INFO
        assert ours.isEnabledFor(logging.DEBUG) and beam.isEnabledFor(logging.INFO)
        assert not beam.isEnabledFor(logging.DEBUG)
        configure_logging("WARNING")
        assert not ours.isEnabledFor(logging.INFO)
    finally:
        configure_logging("INFO")


def test_a_closed_totals_file_is_written_once_and_never_after(tmp_path, monkeypatch):
    """The launcher removes the totals directory as the run ends: the last totals are written when the run
    closes them, and a write that was due later does not come (it raced the removal: CI stop 13)."""
    monkeypatch.setattr(progress_counters, "FLUSH_SECONDS", 0.3)
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(tmp_path))
    counter = progress_counters.Counter(ROWS_DONE)
    counter.inc(2)
    counter.inc(3)  # due in 0.3 s
    progress_counters.close_local_totals()
    assert read_totals(str(tmp_path)) == {ROWS_DONE: 5}  # written at once
    for f in tmp_path.iterdir():
        f.unlink()
    time.sleep(0.6)
    assert list(tmp_path.iterdir()) == []  # the write that was due did not come
