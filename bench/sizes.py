"""Export and load cost by model size: seconds and peak resident memory, each step its own process.

  python -m bench.sizes                   # 124M, 355M, 774M, 1558M (~15 min on 2 cores, ~13 GB of disk at 1558M)
  python -m bench.sizes --quick           # the tiny model: a smoke run (the tests run it)
  python -m bench.sizes --sizes 124M --hf_sizes 124M --code /tmp/old-tree   # measure another checkout's code
  python -m bench.sizes --job --job_only  # the whole job against transformers only, by size (~40 min on 2 cores)

For each size, one after another (never two large models at once; each size's files are deleted before the next):
  - export from random weights: `python -m pipeline.export --random SIZE` (float32 weights file, the default);
  - for --hf_sizes, export from a Hugging Face checkpoint (config.json + model.safetensors, float32) written
    beforehand by `lmgraph.checkpoint.save_hf` (not measured);
  - load at bfloat16: `GenerationModel(dir, precision="bfloat16")` in a fresh process, which reports its own load
    seconds (TensorFlow's import excluded) and their stages.
Peak RSS is each process's ru_maxrss from os.wait4 (bench.whole_job.run_child). Ratios: export peak over the
checkpoint's float32 bytes; load peak over the bytes of the weights as the bfloat16 graph holds them (matrices
bfloat16, vectors and wpe float32). Targets (issue 17): export <= 1.5x; load <= 1.3x + 1 GB (and 2.0 GB at 124M).
--code runs the children in another checkout (e.g. the commit before a change); the checkpoints are always
written by this one.

--job (--job_only: nothing else): per size, a HF checkpoint of random weights written by transformers' layout
(`save_hf`), exported by `pipeline.export --checkpoint` at its defaults (timed: the HF export columns), then the
whole job as bench.whole_job runs it: ours, `python -m pipeline.run` at its defaults (bfloat16 on a CPU with bf16
units), against the transformers script (GPT2LMHeadModel.generate, batch 32) in float32 and bfloat16, on the same
weights and the same --prompts prompts of 1-66 tokens with --new_tokens each, every side a process timed start to
exit. Sides alternate (ours, fp32, bf16, then reversed) for --repeats rounds; ratios are per round (the machine's
noise hits a round's sides alike) and their median. Job targets (issue 17): peak <= 1.3x the bfloat16 weights + 1 GB
at 1558M, <= 2.0 GB at 124M.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.machine import cpu_features  # noqa: E402
from bench.whole_job import MAX_PROMPT_TOKENS, ROOT, Setup, prompt_texts, run_child, run_hf, run_ours  # noqa: E402
from lmgraph.checkpoint import expected_shapes  # noqa: E402
from lmgraph.config import SIZES  # noqa: E402
from lmgraph.tokenizer import Tokenizer, default_vocab_dir  # noqa: E402

SIZE_NAMES = ["124M", "355M", "774M", "1558M"]
HF_SIDES = {"hf_fp32": "float32", "hf_bf16": "bfloat16"}
GB = 1e9
MIB = 2**20  # run_child's peak RSS unit

# Run as its own process in the checkout under test: load a model at bfloat16 and print what the load reported.
LOAD = """\
import json, sys, time
from lmgraph.loader import GenerationModel
m = GenerationModel(sys.argv[1], precision="bfloat16")
print(json.dumps({"seconds": m.load_seconds, "stages": getattr(m, "load_breakdown", {})}))
"""
# Run in this checkout: a Hugging Face checkpoint of random weights, written a tensor at a time.
WRITE_HF = """\
import shutil, sys
from pathlib import Path
from lmgraph.checkpoint import random_tensors, save_hf
from lmgraph.config import SIZES
from lmgraph.tokenizer import default_vocab_dir
cfg, out = SIZES[sys.argv[1]], Path(sys.argv[2])
save_hf(out, cfg, random_tensors(cfg, seed=0))
shutil.copyfile(default_vocab_dir() / "encoder.json", out / "vocab.json")
shutil.copyfile(default_vocab_dir() / "vocab.bpe", out / "merges.txt")
"""


def weight_bytes(size: str) -> tuple[int, int]:
    """(float32 bytes of the checkpoint, bytes of the weights as the bfloat16 graph holds them)."""
    shapes = expected_shapes(SIZES[size])
    f32 = 4 * sum(math.prod(s) for s in shapes.values())
    bf16 = sum(math.prod(s) * (2 if n == "wte" or n.endswith("/w") else 4) for n, s in shapes.items())
    return f32, bf16


def last_json(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def measure_size(size: str, hf: bool, code: Path, work: Path, job: argparse.Namespace | None = None,
                 export_load: bool = True) -> dict:
    """Export (random, and from a HF checkpoint if `hf`) and load at bfloat16, and with `job` the whole job on the
    HF checkpoint's export against transformers; every model file deleted after."""
    row: dict = {"size": size}
    model = work / f"model-{size}"
    try:
        if export_load:
            row["export"] = run_child([sys.executable, "-m", "pipeline.export", "--random", size, "--output",
                                       str(model)], work / f"export-{size}.log", cwd=code)
            seconds, rss = run_child([sys.executable, "-c", LOAD, str(model)], work / f"load-{size}.log", cwd=code)
            row["load"] = (seconds, rss)
            row["load_reported"] = last_json(work / f"load-{size}.log")
            shutil.rmtree(model)
        if hf or job:
            ckpt = work / f"hf-{size}"
            run_child([sys.executable, "-c", WRITE_HF, size, str(ckpt)], work / f"hf-{size}.log")
            row["export_hf"] = run_child([sys.executable, "-m", "pipeline.export", "--checkpoint", str(ckpt),
                                          "--output", str(model)], work / f"export-hf-{size}.log", cwd=code)
            if job:
                row["job"] = measure_job(size, ckpt, model, code, work, job)
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(work / f"hf-{size}", ignore_errors=True)
    return row


def measure_job(size: str, ckpt: Path, model: Path, code: Path, work: Path, job: argparse.Namespace) -> dict:
    """Our whole job and the transformers script, alternated: {side: [(seconds, peak MB, tokens)] a round}."""
    texts = prompt_texts(job.prompts, Tokenizer(default_vocab_dir()))
    prompts = work / f"prompts-{size}"
    prompts.mkdir(exist_ok=True)
    for shard in range(4):
        ids = [f"{shard}-{i}" for i in range(len(texts[shard::4]))]
        pq.write_table(pa.table({"id": ids, "prompt": texts[shard::4]}), prompts / f"prompts-{shard}.parquet")
    s = Setup(ckpt, model, str(prompts / "*.parquet"), job.prompts, 0)
    sides, runs = ["ours", *HF_SIDES], {}
    for r in range(job.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            out = work / f"job-{size}-{r}-{side}"
            if side == "ours":
                result = run_ours(side, s, out, job.new_tokens, job.threads, [])
            else:
                result = run_hf(side, HF_SIDES[side], s, out, job.new_tokens, 32, job.threads)
            same = sum(runs["ours"][0][3].get(k) == v for k, v in result.completions.items()) if runs.get("ours") \
                else "-"
            runs.setdefault(side, []).append((result.seconds, result.peak_rss_mb, result.tokens, result.completions))
            print(f"{size} round {r + 1} {side}: {result.seconds:.1f} s, {result.tokens} tokens, "
                  f"{result.tokens_per_s:.1f} tok/s, peak {result.peak_rss_mb:.0f} MB, rows as ours: {same}",
                  file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(prompts)
    return {side: [run[:3] for run in rs] for side, rs in runs.items()}


def table(rows: list[dict]) -> str:
    lines = ["| size | float32 GB | export s | export peak GB | x checkpoint | HF export s | HF peak GB | "
             "x checkpoint | bf16 weights GB | load s | load peak GB | x bf16 weights | load stages s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f32, bf16 = weight_bytes(r["size"])
        (es, erss), (ls, lrss) = r["export"], r["load"]
        hf = r.get("export_hf")
        hf_cells = f"{hf[0]:.1f} | {hf[1] * MIB / GB:.2f} | {hf[1] * MIB / f32:.2f}x" if hf else "- | - | -"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["load_reported"]["stages"].items()) or "-"
        lines.append(f"| {r['size']} | {f32 / GB:.2f} | {es:.1f} | {erss * MIB / GB:.2f} | {erss * MIB / f32:.2f}x | "
                     f"{hf_cells} | {bf16 / GB:.2f} | {r['load_reported']['seconds']:.1f} | "
                     f"{lrss * MIB / GB:.2f} | {lrss * MIB / bf16:.2f}x | {stages} |")
    return "\n".join(lines)


def job_table(rows: list[dict], job: argparse.Namespace) -> str:
    """Job peak against the target, and tokens/s against transformers: medians over the rounds, ratios per round
    (a side not run: -)."""
    lines = [f"Whole job: {job.prompts} prompts of 1-{MAX_PROMPT_TOKENS} tokens x {job.new_tokens} new tokens, "
             f"{job.threads} threads, {job.repeats} alternated round(s); s = process wall seconds, tok/s = generated "
             "tokens / s (medians).", "",
             "| size | bf16 weights GB | job peak GB (x bf16 weights) | target GB | ours s / tok/s | "
             "HF fp32 s / tok/s | ours / HF fp32 | HF bf16 s / tok/s | ours / HF bf16 | HF fp32 / bf16 peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "job" not in r:
            continue
        runs, (_, bf16) = r["job"], weight_bytes(r["size"])
        tps = {side: [tokens / seconds for seconds, _, tokens in rs] for side, rs in runs.items()}
        peak = {side: f"{max(mb for _, mb, _ in rs) * MIB / GB:.2f}" for side, rs in runs.items()}
        speed = {side: f"{statistics.median(s for s, _, _ in rs):.1f} / {statistics.median(tps[side]):.1f}"
                 for side, rs in runs.items()}
        target = 2.0 if r["size"] in ("tiny", "124M") else 1.3 * bf16 / GB + 1
        cells = []
        for side in HF_SIDES:
            ratios = [o / h for o, h in zip(tps["ours"], tps.get(side, []))]
            each = ", ".join(f"{x:.2f}" for x in ratios)
            cells += [speed.get(side, "-"), f"{statistics.median(ratios):.2f}x ({each})" if ratios else "-"]
        ours = float(peak["ours"])
        lines.append(f"| {r['size']} | {bf16 / GB:.2f} | {ours:.2f} ({ours * GB / bf16:.2f}x) | {target:.2f} | "
                     f"{speed['ours']} | {' | '.join(cells)} | {peak.get('hf_fp32', '-')} / "
                     f"{peak.get('hf_bf16', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny model only, with its HF export (a smoke run)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=SIZE_NAMES)
    p.add_argument("--hf_sizes", nargs="*", choices=list(SIZES), default=["124M", "1558M"],
                   help="sizes also exported from a Hugging Face checkpoint")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose export and loader are measured")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one, removed)")
    j = p.add_argument_group("whole job")
    j.add_argument("--job", action="store_true", help="also the whole job against transformers, every size")
    j.add_argument("--job_only", action="store_true", help="with --job: no random export and load")
    j.add_argument("--prompts", type=int, default=64)
    j.add_argument("--new_tokens", type=int, default=32)
    j.add_argument("--repeats", type=int, default=2, help="rounds of the three sides, alternating the order")
    j.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for every side")
    args = p.parse_args(argv)
    sizes, hf_sizes = (["tiny"], ["tiny"]) if args.quick else (args.sizes, args.hf_sizes)
    if args.quick and args.job:
        args.prompts, args.new_tokens, args.repeats = 8, 4, 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for size in sizes:
            rows.append(measure_size(size, size in hf_sizes, args.code.resolve(), work, args if args.job else None,
                                     export_load=not (args.job and args.job_only)))
            print(f"{size} done: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cpu, flags = cpu_features()
    print(f"Machine: {cpu} ({os.cpu_count()} cores; vector units: {', '.join(flags) or 'none listed'}); "
          f"code: {args.code.resolve()}\n")
    if "export" in rows[0]:
        print(table(rows))
    if args.job:
        print(("\n" if "export" in rows[0] else "") + job_table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
