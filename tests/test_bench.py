"""The benchmark runs end to end (a smoke run: nothing here is about speed) and its bookkeeping is right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import pipeline_job, run
from gpt2.loader import SamplingParams


def test_quick_benchmark_runs_every_side(tmp_path):
    """The documented command, in its own process (it sets TensorFlow's thread pools, which must come first)."""
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--workdir", str(tmp_path)], text=True,
                       capture_output=True, timeout=600, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    table = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(table) == 2  # T=8 at B=1 and B=4, each with engine, HF and limit figures
    assert "| 4 |" in table[1] and table[1].count("x |") == 2  # B=4 also has the naive baseline
    assert "`pipeline.run`" in out and "Padding" in out


def test_padding_fraction_and_length_aware_batches():
    p = SamplingParams(max_new_tokens=1)
    rows = [pipeline_job._Row([1] * n, p) for n in (2, 30, 3, 31, 2, 29)]
    arrival = [rows[:2], rows[2:4], rows[4:]]
    assert abs(pipeline_job.padding_fraction(arrival) - (1 - 97 / 180)) < 1e-9
    aware = pipeline_job.length_aware(rows, batch_size=3, max_batch_tokens=1000)
    assert sorted(len(b) for b in aware) == [3, 3] and pipeline_job.padding_fraction(aware) < 0.05


def test_results_replace_only_the_marked_part(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\nmethod\n{run.MARKERS[0]}\nold table\n{run.MARKERS[1]}\n## Attempts\nkept\n")
    run.write_results("new table", doc)
    assert doc.read_text() == (f"# Benchmarks\nmethod\n{run.MARKERS[0]}\nnew table\n{run.MARKERS[1]}\n"
                               "## Attempts\nkept\n")


def test_step_breakdown_runs_and_reports_each_batch(model_dir):
    """bench.step on the tiny model: one table row per batch with both sides measured (a smoke run)."""
    p = subprocess.run([sys.executable, "-m", "bench.step", "--model_dir", str(model_dir), "--batches", "1", "3",
                        "--steps", "2", "--repeats", "1", "--prompt", "4"], text=True, capture_output=True,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in p.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [int(r[0]) for r in rows] == [1, 3]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # the kernel floor was timed
