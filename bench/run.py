"""The benchmark: our engine vs Hugging Face vs the naive recipe vs the machine's limit, and the pipeline's overhead.

  python -m bench.run            # GPT-2 124M shape, random weights: about 15 minutes on 2 cores
  python -m bench.run --quick    # a tiny model, seconds: a smoke run (the test suite runs it)

Everything is measured side by side in one process, on the same weights and thread count, so the machine's
noise hits all sides alike. Greedy, fixed lengths: end-of-text is ignored, so every run makes B x N tokens.
The results table is printed and, in a full run, written into BENCHMARKS.md between its results markers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import baselines, machine, pipeline_job  # noqa: E402
from bench.results import BENCHMARKS, write_between  # noqa: E402
from lmgraph.checkpoint import random_weights, save_hf  # noqa: E402
from lmgraph.config import SIZES, ModelConfig  # noqa: E402
from lmgraph.device import Placement, choose_precision, cpu_flags  # noqa: E402
from lmgraph.export import export  # noqa: E402
from lmgraph.loader import GenerationModel  # noqa: E402
from lmgraph.sampling import SamplingParams  # noqa: E402
from lmgraph.tokenizer import default_vocab_dir  # noqa: E402

MARKERS = ("<!-- results: written by python -m bench.run -->", "<!-- /results -->")
FULL = dict(size="124M", Ts=(32, 128), Bs=(1, 8, 64), N=64, naive_B=8, naive_steps=6,
            pipeline=dict(rows=2000, max_words=40, new_tokens=8, batch_size=128, max_batch_tokens=12288))
QUICK = dict(size="tiny", Ts=(8,), Bs=(1, 4), N=4, naive_B=4, naive_steps=None,
             pipeline=dict(rows=40, max_words=12, new_tokens=2, batch_size=8, max_batch_tokens=4096))


def engine_seconds(model: GenerationModel, prompts: np.ndarray, n: int) -> float:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    model.generate(prompts.tolist(), SamplingParams(max_new_tokens=2, ignore_eos=True))  # same shapes, warm
    start = time.perf_counter()
    out = model.generate(prompts.tolist(), params)
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == n for c in out)
    return elapsed


def machine_text() -> str:
    import torch

    cpu, units = machine.cpu_features()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, vector units: {' '.join(units) or 'none of AVX2/AVX-512/AMX'}; "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, PyTorch {torch.__version__}")


def precisions() -> list[str]:
    """float32, and bfloat16 where the CPU has bf16 units (what --precision auto then picks)."""
    best, _ = choose_precision(["float32", "bfloat16"], Placement("/CPU:0"), cpu_flags())
    return ["float32"] + ([best] if best != "float32" else [])


def run(spec: dict, workdir: Path, threads: int) -> tuple[str, dict]:
    cfg: ModelConfig = SIZES[spec["size"]]
    weights = random_weights(cfg, seed=0)
    export(cfg, weights, workdir / "model", default_vocab_dir(), source={"random": True}, name="bench")
    save_hf(workdir / "hf", cfg, weights)
    print(f"machine: {machine_text()}; {threads} threads", flush=True)
    limits = machine.measure()
    print(f"limits: fp32 matmul {limits.gflops:.1f} GFLOP/s, bandwidth {limits.gbs:.1f} GB/s", flush=True)

    naive = baselines.NaiveSession(cfg, weights, threads)
    rng = np.random.default_rng(0)
    N, rows = spec["N"], []
    for precision in precisions():
        engine = GenerationModel(workdir / "model", precision=precision, intra_threads=threads)
        hf = baselines.HuggingFace(workdir / "hf", threads, precision)
        for T in spec["Ts"]:
            for B in spec["Bs"]:
                prompts = rng.integers(0, cfg.n_vocab - 1, (B, T)).astype(np.int32)
                ours = B * N / engine_seconds(engine, prompts, N)
                hf.seconds(prompts[:, :4], 2)  # warm-up
                theirs = B * N / hf.seconds(prompts, N)
                fp32 = precision == "float32"
                slow = B * N / naive.seconds(prompts, N, spec["naive_steps"]) if B == spec["naive_B"] and fp32 else None
                limit = limits.limit_tokens_per_s(cfg, B, T, N) if fp32 else None  # the roofline is float32's
                rows.append((precision, T, B, ours, theirs, slow, limit))
                print(f"{precision} T={T} B={B}: engine {ours:.1f} tok/s, HF {theirs:.1f} ({ours / theirs:.2f}x)"
                      + (f", naive {slow:.2f} ({ours / slow:.0f}x)" if slow else "")
                      + (f", limit {limit:.1f} ({ours / limit:.0%})" if limit else ""), flush=True)
        engine.close()
        del hf
    naive.close()

    job = pipeline_job.run(workdir / "model", workdir / "job", threads=threads, **spec["pipeline"])
    print(f"pipeline: {job}", flush=True)
    return render(spec, cfg, threads, limits, rows, job), {"rows": rows, "job": job}


def render(spec: dict, cfg: ModelConfig, threads: int, limits: machine.Machine, rows: list, job: dict) -> str:
    N = spec["N"]
    lines = [
        f"Machine: {machine_text()}. {threads} threads for every side. Model: GPT-2 {spec['size']} shape "
        f"({cfg.n_layer} layers, {cfg.n_embd} wide), random weights, greedy, {N} new tokens per row; each side "
        "in the precision of its row (HF's model cast whole to it).",
        f"Measured limits (float32 rows): fp32 matmul {limits.gflops:.1f} GFLOP/s, DRAM read bandwidth "
        f"{limits.gbs:.1f} GB/s.",
        "",
        "| precision | prompt T | batch B | engine tok/s | HF tok/s | engine / HF | naive tok/s | engine / naive "
        "| limit tok/s | engine / limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, T, B, ours, theirs, slow, limit in rows:
        naive = f"{slow:.2f} | {ours / slow:.0f}x" if slow else " | "
        bound = f"{limit:.0f} | {ours / limit:.0%}" if limit else " | "
        lines.append(f"| {precision} | {T} | {B} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {naive} "
                     f"| {bound} |")
    p, e = job["pipeline_tokens"] / job["pipeline_seconds"], job["engine_tokens"] / job["engine_seconds"]
    lines += [
        "",
        f"Pipeline job: {job['prompts']} prompts of mixed length ({job['prompt_tokens']} prompt tokens), "
        f"{spec['pipeline']['new_tokens']} new tokens each, batch size {spec['pipeline']['batch_size']}, "
        "DirectRunner, model load included on both sides.",
        "",
        "| | tokens | seconds | tok/s | vs engine alone |",
        "|---|---:|---:|---:|---:|",
        f"| `pipeline.run` (read, validate, tokenize, batch, generate, write) | {job['pipeline_tokens']} "
        f"| {job['pipeline_seconds']:.1f} | {p:.1f} | {p / e:.0%} |",
        f"| engine alone, same prompts, same batches | {job['engine_tokens']} | {job['engine_seconds']:.1f} "
        f"| {e:.1f} | 100% |",
        "",
        f"Padding (share of computed prompt slots): length-aware batching {job['padding_length_aware']:.1%} "
        f"({job['batches_length_aware']} batches), arrival order {job['padding_arrival_order']:.1%} "
        f"({job['batches_arrival_order']} batches).",
    ]
    return "\n".join(lines)


def write_results(text: str, path: Path = BENCHMARKS) -> None:
    write_between(text, MARKERS, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", help="where models and outputs go (default: a temporary directory)")
    p.add_argument("--no_write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # the eager limit measurements
    with tempfile.TemporaryDirectory() as tmp:
        text, _ = run(QUICK if args.quick else FULL, Path(args.workdir or tmp), args.threads)
    print("\n" + text)
    if not args.quick and not args.no_write:
        write_results(text)
        print(f"\nwritten to {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
