"""The benchmark runs end to end (a smoke run: nothing here is about speed) and its bookkeeping is right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import peers, pipeline_job, ragged, run, whole_job
from lmgraph.sampling import SamplingParams


def test_quick_benchmark_runs_every_side(tmp_path):
    """The documented command, in its own process (it sets TensorFlow's thread pools, which must come first)."""
    p = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--workdir", str(tmp_path)], text=True,
                       capture_output=True, timeout=600, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for precision in run.precisions():  # float32, and bfloat16 on a CPU with bf16 units
        table = [line for line in out.splitlines() if line.startswith(f"| {precision} | 8 |")]
        assert len(table) == 2  # T=8 at B=1 and B=4, each with engine and HF figures (float32: and the limit)
        assert "| 4 |" in table[1] and table[1].count("x |") == (2 if precision == "float32" else 1)  # naive
    assert "vector units:" in out
    assert "`pipeline.run`" in out and "Padding" in out


def test_quick_ragged_benchmark_runs_every_side(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.ragged", "--quick", "--workdir", str(tmp_path)], text=True,
                       capture_output=True, timeout=600, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for row in ("| uniform | continuous |", "| uniform | static |", "| ragged | continuous |", "| ragged | static |",
                "| in the graph |", "| cut after |", "| ragged |"):
        assert row in out, row
    assert "vector units:" in out and "the kept rows are the same on both sides: 48/48" in out


def test_ragged_limits_spread_evenly_around_the_mean():
    limits = ragged.max_new_tokens(512, 64, ragged=True)
    assert min(limits) == 1 and max(limits) == 127 and sum(limits) == 512 * 64 and limits != sorted(limits)
    assert ragged.max_new_tokens(3, 64, ragged=False) == [64] * 3


def test_padding_fraction_and_length_aware_batches():
    p = SamplingParams(max_new_tokens=1)
    rows = [pipeline_job._Row([1] * n, p) for n in (2, 30, 3, 31, 2, 29)]
    arrival = [rows[:2], rows[2:4], rows[4:]]
    assert abs(pipeline_job.padding_fraction(arrival) - (1 - 97 / 180)) < 1e-9
    assert pipeline_job.arrival_order(rows, batch_size=2, max_batch_tokens=1000) == arrival
    assert pipeline_job.arrival_order(rows, batch_size=3, max_batch_tokens=64) == arrival  # 3 x (31 + 1) > 64
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


def test_quick_whole_job_runs_both_sides(tmp_path):
    """bench.whole_job --quick: ours and the transformers script (float32, bfloat16) each run once, as processes;
    the table counts every token asked of HF (it never stops early) and at most that for ours (end-of-text)."""
    p = subprocess.run([sys.executable, "-m", "bench.whole_job", "--quick", "--workdir", str(tmp_path)], text=True,
                       capture_output=True, timeout=600, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    cells = ([c.strip() for c in line.strip().strip("|").split("|")] for line in p.stdout.splitlines())
    rows = {r[0]: r for r in cells if r[0].startswith(("ours", "transformers"))}
    ours = rows.pop("ours: pipeline.run")
    assert sorted(rows) == ["transformers script, batch 32, bfloat16", "transformers script, batch 32, float32"]
    asked = 24 * 4  # --quick: 24 prompts, 4 new tokens
    assert 0 < int(ours[3]) <= asked and float(ours[4]) > 0
    for hf in rows.values():
        assert int(hf[3]) == asked and float(hf[4]) > 0 and hf[5].endswith("x")
    assert "Machine: " in p.stdout and "vector units" in p.stdout


def test_whole_job_results_go_between_their_markers(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\nkept\n")
    whole_job.write_results("first", doc)  # markers missing: appended at the end
    assert doc.read_text() == f"# Benchmarks\nkept\n\n{whole_job.MARKERS[0]}\nfirst\n{whole_job.MARKERS[1]}\n"
    doc.write_text(doc.read_text() + "## After\n")
    whole_job.write_results("second", doc)
    assert doc.read_text() == (f"# Benchmarks\nkept\n\n{whole_job.MARKERS[0]}\nsecond\n{whole_job.MARKERS[1]}\n"
                               "## After\n")


def test_quick_sizes_benchmark_measures_export_and_load(tmp_path):
    """bench.sizes --quick: the tiny model exported (random and from a HF checkpoint) and loaded, each a process
    with its peak RSS; its files are removed after."""
    p = subprocess.run([sys.executable, "-m", "bench.sizes", "--quick", "--workdir", str(tmp_path)], text=True,
                       capture_output=True, timeout=600, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    [row] = [line.split("|")[1:-1] for line in p.stdout.splitlines() if line.startswith("| tiny |")]
    cells = [c.strip() for c in row]
    assert all(float(cells[i]) > 0 for i in (2, 3, 5, 6, 9, 10))  # seconds and peaks of both exports and the load
    assert "bind" in cells[12] and "warm_up" in cells[12]
    assert "Machine: " in p.stdout and not [d for d in tmp_path.iterdir() if d.is_dir()]  # logs only are kept


def test_an_isa_cap_reaches_every_engines_switch_and_the_machine_line(tmp_path, monkeypatch):
    """--max_isa AVX2 sets each engine's own switch (oneDNN, OpenVINO, CTranslate2, PyTorch), and a table made
    under it names the cap and lists no vector units above it."""
    from bench.machine import cpu_features

    caps = whole_job.ISA_CAPS["AVX2"]
    assert set(caps) == {"ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA", "CT2_FORCE_CPU_ISA", "ATEN_CPU_CAPABILITY"}
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Zen 4\nflags\t\t: fma avx2 avx512f avx512_bf16 avx512_vnni\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", caps["ONEDNN_MAX_CPU_ISA"])
    assert cpu_features(info) == ("Zen 4 (ISA capped at AVX2)", ["avx2"])
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu_features(info) == ("Zen 4", ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"])


def test_ct2_plan_sorts_by_length_and_keeps_each_rows_own_new_tokens():
    """bench.peers' CTranslate2 batches, against CTranslate2's behaviour with include_prompt_in_result=False as
    simulated here: a batch's prompts are forwarded up to its shortest one, the rest of a longer prompt heads that
    row's result and counts toward max_length. Every row must keep exactly its own new tokens."""
    lengths = [5, 1, 66, 3, 3, 40, 2, 66] * 40  # 320 rows: batches of 128, 128, 64
    new = 16
    plan = list(peers.ct2_plan(lengths, new))
    assert [len(rows) for rows, _, _ in plan] == [128, 128, 64]
    assert sorted(i for rows, _, _ in plan for i in rows) == list(range(len(lengths)))
    batch_lengths = [[lengths[i] for i in rows] for rows, _, _ in plan]
    assert sum(batch_lengths, []) == sorted(lengths)  # like lengths together: short batches are cheap
    for (rows, max_length, heads), ls in zip(plan, batch_lengths):
        shortest = ls[0]
        assert max_length == new + ls[-1] - shortest
        for i, head in zip(rows, heads):
            prompt = [f"p{i}.{k}" for k in range(lengths[i])]
            result = prompt[shortest:] + [f"n{i}.{k}" for k in range(max_length - (lengths[i] - shortest))]
            assert len(result) == max_length and result[head:head + new] == [f"n{i}.{k}" for k in range(new)]
    assert "include_prompt_in_result=False" in peers.CT2_SCRIPT and "end_token=[]" in peers.CT2_SCRIPT
    compile(peers.CT2_SCRIPT, "ct2_generate.py", "exec")  # ct2_plan went in as source
