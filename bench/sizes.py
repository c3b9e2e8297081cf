"""Export and load cost by model size: seconds and peak resident memory, each step its own process.

  python -m bench.sizes                   # 124M, 355M, 774M, 1558M (~15 min on 2 cores, ~13 GB of disk at 1558M)
  python -m bench.sizes --quick           # the tiny model: a smoke run (the tests run it)
  python -m bench.sizes --sizes 124M --hf_sizes 124M --code /tmp/old-tree   # measure another checkout's code

For each size, one after another (never two large models at once; each size's files are deleted before the next):
  - export from random weights: `python -m pipeline.export --random SIZE` (float32 weights file, the default);
  - for --hf_sizes, export from a Hugging Face checkpoint (config.json + model.safetensors, float32) written
    beforehand by `gpt2.checkpoint.save_hf` (not measured);
  - load at bfloat16: `GenerationModel(dir, precision="bfloat16")` in a fresh process, which reports its own load
    seconds (TensorFlow's import excluded) and their stages.
Peak RSS is each process's ru_maxrss from os.wait4 (bench.whole_job.run_child). Ratios: export peak over the
checkpoint's float32 bytes; load peak over the bytes of the weights as the bfloat16 graph holds them (matrices
bfloat16, vectors and wpe float32). Targets (issue 17): export <= 1.5x; load <= 1.3x + 1 GB (and 2.0 GB at 124M).
--code runs the children in another checkout (e.g. the commit before a change); the checkpoints are always
written by this one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.machine import cpu_features  # noqa: E402
from bench.whole_job import ROOT, run_child  # noqa: E402
from gpt2.checkpoint import expected_shapes  # noqa: E402
from gpt2.config import SIZES  # noqa: E402

SIZE_NAMES = ["124M", "355M", "774M", "1558M"]
GB = 1e9
MIB = 2**20  # run_child's peak RSS unit

# Run as its own process in the checkout under test: load a model at bfloat16 and print what the load reported.
LOAD = """\
import json, sys, time
from gpt2.loader import GenerationModel
m = GenerationModel(sys.argv[1], precision="bfloat16")
print(json.dumps({"seconds": m.load_seconds, "stages": getattr(m, "load_breakdown", {})}))
"""
# Run in this checkout: a Hugging Face checkpoint of random weights, written a tensor at a time.
WRITE_HF = """\
import shutil, sys
from pathlib import Path
from gpt2.checkpoint import random_tensors, save_hf
from gpt2.config import SIZES
from gpt2.tokenizer import default_vocab_dir
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


def measure_size(size: str, hf: bool, code: Path, work: Path) -> dict:
    """Export (random, and from a HF checkpoint if `hf`) and load at bfloat16; every model file deleted after."""
    row: dict = {"size": size}
    model = work / f"model-{size}"
    try:
        row["export"] = run_child([sys.executable, "-m", "pipeline.export", "--random", size, "--output", str(model)],
                                  work / f"export-{size}.log", cwd=code)
        seconds, rss = run_child([sys.executable, "-c", LOAD, str(model)], work / f"load-{size}.log", cwd=code)
        row["load"] = (seconds, rss)
        row["load_reported"] = last_json(work / f"load-{size}.log")
        shutil.rmtree(model)
        if hf:
            ckpt = work / f"hf-{size}"
            run_child([sys.executable, "-c", WRITE_HF, size, str(ckpt)], work / f"hf-{size}.log")
            row["export_hf"] = run_child([sys.executable, "-m", "pipeline.export", "--checkpoint", str(ckpt),
                                          "--output", str(model)], work / f"export-hf-{size}.log", cwd=code)
            shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(work / f"hf-{size}", ignore_errors=True)
    return row


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sizes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny model only, with its HF export (a smoke run)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=SIZE_NAMES)
    p.add_argument("--hf_sizes", nargs="*", choices=list(SIZES), default=["124M", "1558M"],
                   help="sizes also exported from a Hugging Face checkpoint")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose export and loader are measured")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one, removed)")
    args = p.parse_args(argv)
    sizes, hf_sizes = (["tiny"], ["tiny"]) if args.quick else (args.sizes, args.hf_sizes)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sizes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for size in sizes:
            rows.append(measure_size(size, size in hf_sizes, args.code.resolve(), work))
            print(f"{size} done: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cpu, flags = cpu_features()
    print(f"Machine: {cpu} ({os.cpu_count()} cores; vector units: {', '.join(flags) or 'none listed'}); "
          f"code: {args.code.resolve()}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
