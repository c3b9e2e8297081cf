"""Continuous batching: rows of different lengths and stop strings, against the same work in even rows.

  python -m bench.ragged            # GPT-2 124M shape, 512 prompts, 64 new tokens on average (~12 min, 2 cores)
  python -m bench.ragged --quick    # tiny model, 48 prompts, 8 new tokens on average: a smoke run (the tests run it)
  python -m bench.ragged --write    # also write the tables into BENCHMARKS.md between its ragged markers
  python -m bench.ragged --engine_only   # the engine tables only (~10 min)
  python -m bench.ragged --job_only --prompts 192 --mean 48   # the whole job only

Workloads, on the same prompts (real words, 1..66 tokens, shuffled; random GPT-2 weights; greedy; ignore_eos, so a
row runs exactly to its max_new_tokens):
  - uniform: every row's max_new_tokens is MEAN;
  - ragged: max_new_tokens spread evenly over 1..2 x MEAN - 1 (mean MEAN), in shuffled order, as a per-row column.

Measured:
  - the whole job (`python -m pipeline.run`, a process timed from start to exit, at its defaults: continuous
    batching), uniform and ragged, alternated; tokens/s = generated tokens (from the output files) / wall seconds.
    The target: ragged at least 0.85x uniform.
  - the engine alone, in this process: continuous (one run, SLOTS rows decoded at a time, a row that ends taking the
    next) against static batching (runs of SLOTS rows in arrival order, each to its longest row: no refill).
  - stop strings: every row sampled (temperature 1, top-k 50, its own seed) up to 2 x MEAN tokens with stop STOP: rows
    ended in the graph as the text holds it, against rows generated to max_new_tokens and cut after (what the job
    did before). Useful tokens (those left after the cut, the same on both sides) per second.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.machine import cpu_features  # noqa: E402
from bench.results import BENCHMARKS, write_between  # noqa: E402
from bench.whole_job import MAX_PROMPT_TOKENS, SHARDS, prompt_texts, run_child, setup  # noqa: E402
from lmgraph.config import SIZES  # noqa: E402
from lmgraph.tokenizer import Tokenizer, default_vocab_dir  # noqa: E402

MARKERS = ("<!-- ragged: written by python -m bench.ragged -->", "<!-- /ragged -->")
STOP = "."  # in ~2% of GPT-2's tokens: sampled rows from random weights end after ~50 tokens, spread widely


def max_new_tokens(n: int, mean: int, ragged: bool, seed: int = 1) -> list[int]:
    """Every row `mean`, or spread evenly over 1..2*mean-1 (mean `mean`) in shuffled order."""
    if not ragged:
        return [mean] * n
    spread = np.linspace(1, 2 * mean - 1, n).round().astype(int)
    return np.random.default_rng(seed).permutation(spread).tolist()


def write_inputs(directory: Path, texts: list[str], limits: list[int] | None) -> str:
    """Parquet shards of the prompts (and a max_new_tokens column when given); returns their glob."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for s in range(SHARDS):
        columns = {"id": [f"{s}-{i}" for i in range(len(texts[s::SHARDS]))], "prompt": texts[s::SHARDS]}
        if limits is not None:
            columns["max_new_tokens"] = pa.array(limits[s::SHARDS], pa.int32())
        pq.write_table(pa.table(columns), directory / f"prompts-{s:03d}.parquet")
    return str(directory / "*.parquet")


def whole_job(model_dir: Path, inputs: str, out: Path, mean: int, threads: int,
              extra: list[str] | tuple[str, ...] = ()) -> tuple[float, int]:
    """(wall seconds, generated tokens) of `pipeline.run` at its defaults (and `extra` options)."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, _ = run_child([sys.executable, "-m", "pipeline.run", "--input", inputs, "--output", str(out),
                            "--model_dir", str(model_dir), "--max_new_tokens", str(mean), "--ignore_eos",
                            "--runner", "FnApiRunner", "--intra_op_threads", str(threads), *extra],
                           out.with_suffix(".log"))
    tables = [pq.read_table(p, columns=["completion_tokens"]) for p in sorted((out / "completions").glob("*"))]
    return seconds, sum(sum(t.column("completion_tokens").to_pylist()) for t in tables)


def engine(model_dir: Path, prompts: list[list[int]], mean: int, slots: int, threads: int) -> dict:
    """The engine alone: continuous vs static on uniform and ragged rows; stop strings in the graph vs cut after."""
    from lmgraph.loader import GenerationModel
    from lmgraph.sampling import SamplingParams
    from transforms.detokenize import apply_stop

    model = GenerationModel(model_dir, intra_threads=threads)
    tokenizer = Tokenizer(default_vocab_dir())
    n = len(prompts)

    def timed(fn) -> tuple[list, float]:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def static(params):  # runs of `slots` rows in arrival order, every row admitted at once: no refill
        return [c for i in range(0, n, slots)
                for c in model.generate(prompts[i:i + slots], params[i:i + slots], logprobs=False)]

    results = {"precision": model.precision, "slots": slots}
    for kind in ("uniform", "ragged"):
        params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in max_new_tokens(n, mean, kind == "ragged")]
        for mode, fn in (("continuous", lambda: model.generate(prompts, params, logprobs=False, slots=slots)),
                         ("static", lambda: static(params))):
            out, seconds = timed(fn)
            results[f"{kind} {mode}"] = (seconds, sum(len(c.token_ids) for c in out))
    params = [SamplingParams(max_new_tokens=2 * mean, temperature=1.0, top_k=50, seed=i, ignore_eos=True)
              for i in range(n)]
    kept = {}
    for mode, stops in (("stop in the graph", [STOP]), ("stop cut after", [])):
        out, seconds = timed(lambda: model.generate(prompts, params, logprobs=False, slots=slots, stops=stops))
        kept[mode] = [apply_stop(tokenizer, c.token_ids, [STOP])[1] for c in out]
        results[mode] = (seconds, sum(map(len, kept[mode])))
        results[f"{mode} generated"] = sum(len(c.token_ids) for c in out)
    results["stop rows same"] = sum(a == b for a, b in zip(*kept.values()))
    results["stop rows stopped"] = sum(len(k) < 2 * mean for k in kept["stop in the graph"])
    model.close()
    return results


def render(args: argparse.Namespace, rows: int, jobs: dict, eng: dict | None) -> str:
    cpu, vector = cpu_features()
    cfg = SIZES[args.size]
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, vector units: {' '.join(vector) or 'none of AVX2+'}; "
        f"{args.threads} threads.",
        f"Model: GPT-2 {args.size} shape ({cfg.n_layer} layers, {cfg.n_embd} wide), random weights, "
        f"{eng['precision'] if eng else 'the default precision'}. {rows} prompts of 1-{MAX_PROMPT_TOKENS} tokens, shuffled. Uniform: {args.mean} new "
        f"tokens per row; ragged: max_new_tokens spread evenly over 1-{2 * args.mean - 1} (mean {args.mean}).",
    ]
    if jobs:
        tps = {k: v[1] / v[0] for k, v in jobs.items()}
        lines += ["", "Whole job (`pipeline.run` at its defaults, start to exit; medians of alternated runs):", "",
                  "| workload | wall s | new tokens | tok/s | / uniform |", "|---|---:|---:|---:|---:|"]
        for kind in ("uniform", "ragged"):
            s, t = jobs[kind]
            lines.append(f"| {kind} | {s:.1f} | {t} | {tps[kind]:.1f} | {tps[kind] / tps['uniform']:.2f}x |")
    if eng is None:
        return "\n".join(lines)
    lines += ["", f"Engine alone ({eng['slots']} slots; static: runs of {eng['slots']} rows in arrival order, "
              "each to its longest row):", "",
              "| workload | batching | s | new tokens | tok/s | / uniform continuous |", "|---|---|---:|---:|---:|---:|"]
    base = eng["uniform continuous"][1] / eng["uniform continuous"][0]
    for kind in ("uniform", "ragged"):
        for mode in ("continuous", "static"):
            s, t = eng[f"{kind} {mode}"]
            lines.append(f"| {kind} | {mode} | {s:.1f} | {t} | {t / s:.1f} | {t / s / base:.2f}x |")
    lines += ["", f"Stop string {STOP!r}, rows sampled (temperature 1, top-k 50) up to {2 * args.mean} tokens ({eng['stop rows stopped']} of "
              f"{rows} rows hold it; the kept rows are the same on both sides: {eng['stop rows same']}/{rows}):", "",
              "| stop | s | tokens generated | tokens kept | kept tok/s | / cut after |", "|---|---:|---:|---:|---:|---:|"]
    after = eng["stop cut after"][1] / eng["stop cut after"][0]
    for mode in ("stop in the graph", "stop cut after"):
        s, t = eng[mode]
        lines.append(f"| {mode[5:]} | {s:.1f} | {eng[mode + ' generated']} | {t} | {t / s:.1f} | "
                     f"{t / s / after:.2f}x |")
    return "\n".join(lines)


def write_results(text: str, path: Path = BENCHMARKS) -> None:
    write_between(text, MARKERS, path)


def run(args: argparse.Namespace, workdir: Path) -> str:
    print(f"setup: GPT-2 {args.size}, {args.prompts} prompts in {workdir}", flush=True)
    s = setup(args.size, args.prompts, workdir)
    tokenizer = Tokenizer(default_vocab_dir())
    texts = prompt_texts(args.prompts, tokenizer)
    inputs = {"uniform": write_inputs(workdir / "uniform", texts, None),
              "ragged": write_inputs(workdir / "ragged", texts, max_new_tokens(len(texts), args.mean, True))}
    runs: dict[str, list[tuple[float, int]]] = {"uniform": [], "ragged": []}
    for r in range(0 if args.engine_only else args.repeats):
        for kind in (("uniform", "ragged") if r % 2 == 0 else ("ragged", "uniform")):
            seconds, tokens = whole_job(s.model_dir, inputs[kind], workdir / f"out-{kind}-{r}", args.mean,
                                        args.threads)
            runs[kind].append((seconds, tokens))
            print(f"whole job {kind} {r + 1}/{args.repeats}: {seconds:.1f} s, {tokens} tokens, "
                  f"{tokens / seconds:.1f} tok/s", flush=True)
    jobs = {k: (float(np.median([s for s, _ in v])), v[0][1]) for k, v in runs.items() if v}
    eng = None if args.job_only else engine(s.model_dir, tokenizer.encode_batch(texts), args.mean, args.slots,
                                            args.threads)
    for k, v in (eng or {}).items():
        print(f"engine {k}: {v}", flush=True)
    return render(args, len(texts), jobs, eng)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ragged", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", choices=sorted(SIZES))
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--mean", type=int, default=64, help="mean new tokens per row")
    p.add_argument("--slots", type=int, default=128, help="the engine's slots (the job's default batch size)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2, help="whole-job rounds, alternating the order")
    p.add_argument("--workdir", help="where models, prompts and outputs go (default: a temporary directory)")
    p.add_argument("--engine_only", action="store_true", help="skip the whole-job runs and their table")
    p.add_argument("--job_only", action="store_true", help="skip the engine's tables")
    p.add_argument("--quick", action="store_true", help="tiny model, 48 prompts, 8 new tokens, 8 slots, 1 round")
    p.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.prompts, args.mean, args.slots, args.repeats = "tiny", 48, 8, 8, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        text = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-ragged-") as tmp:
            text = run(args, Path(tmp))
    print(text)
    if args.write:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
