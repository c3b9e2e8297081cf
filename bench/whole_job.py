"""Our whole job against the transformers script a user would otherwise write, model load included.

  python -m bench.whole_job            # GPT-2 124M shape, 256 prompts, 64 new tokens, 2 repeats (~15 min, 2 cores)
  python -m bench.whole_job --quick    # tiny model, 24 prompts, 4 new tokens, 1 repeat: a smoke run (the tests run it)
  python -m bench.whole_job --write    # also write the table into BENCHMARKS.md between its whole_job markers
  python -m bench.whole_job --ours_args "--precision bfloat16"   # extra options for our side
  python -m bench.whole_job --peers ct2-int8 ct2-float32 ov-bf16 ov-int8   # the CPU engines too (bench/peers.py;
                                       # the `peers` extra, or --peers_python from an environment that has them)
  python -m bench.whole_job --shape smollm2-135m   # a Llama-family shape (bench/checkpoints.py SHAPES) instead

What is measured: the product promise, a whole job (start to exit: imports, model load, reading Parquet,
tokenizing, generating, decoding, writing Parquet) against the plain transformers script a competent user would
write for the same job, on the same CPU, weights, prompts and thread count. Each side is its own process, timed
from start to exit, so nothing is warmed up for either side; a user pays that load on every run too.

  - ours: `python -m pipeline.run ... --runner FnApiRunner`, at its defaults otherwise (precision included), on
    the model `python -m pipeline.export` writes at its defaults from the same checkpoint.
    With --shape, if that export refuses the checkpoint's model type, our side is reported unavailable.
  - transformers: AutoModelForCausalLM + AutoTokenizer (left padding, pad = end-of-text), greedy `generate` in
    batches of 32 in file order under `torch.inference_mode()`, float32, and again in bfloat16.

Workload: random GPT-2 weights (real vocabulary; or, with --shape, a Llama/Qwen2/Mistral shape's random weights
written by transformers, its tokenizer GPT-2's byte-level BPE plus chat tokens), N prompts of real words whose token
lengths spread evenly over 1..66, in shuffled order (real data comes in no particular order), greedy, 64 new tokens
per row. The HF side and the peers never stop early (`min_new_tokens`); ours may stop at end-of-text, so tokens/s
(new tokens counted from each side's output files / wall seconds) is what is compared. Sides run alternately (ours,
fp32, bf16, then in reverse) so the shared machine's noise hits all of them alike; each side's median over the
repeats is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # bench.machine imports TensorFlow

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.checkpoints import SHAPES, make_checkpoint  # noqa: E402
from bench.hf_tokenizers import CHATML, LLAMA3, write_byte_level_tokenizer  # noqa: E402
from bench.machine import cpu_features  # noqa: E402
from bench.peers import PEERS, convert  # noqa: E402
from bench.results import BENCHMARKS, write_between  # noqa: E402
from lmgraph.checkpoint import random_weights, save_hf  # noqa: E402
from lmgraph.config import SIZES  # noqa: E402
from lmgraph.tokenizer import Tokenizer, default_vocab_dir  # noqa: E402
from pipeline.sample_data import PROMPTS  # noqa: E402

ROOT = Path(__file__).parents[1]
# --max_isa: each engine's own switch to keep below an ISA, so an AVX-512 machine runs every side as an AVX2-only
# CPU would (the same instructions; not its caches, clocks or memory). Ours and transformers' oneDNN read
# ONEDNN_MAX_CPU_ISA, OpenVINO both it and OV_CPU_MAX_ISA, CTranslate2 CT2_FORCE_CPU_ISA, PyTorch's own
# kernels ATEN_CPU_CAPABILITY. (numpy's few AVX-512 loops stay; no side spends its time there.)
ISA_CAPS = {
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2", "CT2_FORCE_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"},
    "AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "OV_CPU_MAX_ISA": "AVX512_CORE",
                    "CT2_FORCE_CPU_ISA": "AVX512", "ATEN_CPU_CAPABILITY": "avx512"},
}
MARKERS = ("<!-- whole_job: written by python -m bench.whole_job -->", "<!-- /whole_job -->")
MAX_PROMPT_TOKENS = 66
SHARDS = 4
WORDS = " ".join(PROMPTS).split()

# The script a user would write, run as its own process:
#   python hf_generate.py HF_DIR GLOB OUT BATCH NEW_TOKENS THREADS DTYPE
HF_SCRIPT = '''\
"""Batch generation with transformers, as a user would write it (written by bench.whole_job)."""
import glob
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

hf_dir, inputs, output, batch_size, new_tokens, threads, dtype = sys.argv[1:]
batch_size, new_tokens = int(batch_size), int(new_tokens)
torch.set_num_threads(int(threads))
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
tokenizer.pad_token = tokenizer.eos_token

table = pa.concat_tables(pq.read_table(path, columns=["id", "prompt"]) for path in sorted(glob.glob(inputs)))
prompts = table.column("prompt").to_pylist()
completions, counts = [], []
with torch.inference_mode():
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        counts += [new.shape[1]] * len(new)
pq.write_table(table.append_column("completion", pa.array(completions))
               .append_column("completion_tokens", pa.array(counts, pa.int32())), output)
'''


@dataclasses.dataclass
class Run:
    side: str
    seconds: float  # process start to exit
    peak_rss_mb: float
    tokens: int  # generated, counted from the output files
    completions: dict[str, str]  # id -> completion text, to check that the sides did the same work

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclasses.dataclass(frozen=True)
class Setup:
    hf_dir: Path
    model_dir: Path
    prompts_glob: str
    rows: int
    prompt_tokens: int
    ours_unavailable: str | None = None  # why pipeline.export could not take the checkpoint, if it could not


def prompt_texts(n: int, tokenizer: Tokenizer, seed: int = 0) -> list[str]:
    """n prompts of real words whose token lengths spread evenly over 1..MAX_PROMPT_TOKENS, shuffled."""
    lengths = np.linspace(1, MAX_PROMPT_TOKENS, n).round().astype(int)
    texts = []
    for i, length in enumerate(lengths):
        text, w = "", i * 7  # each prompt starts at a different word
        while len(tokenizer.encode(text)) < length:
            candidate = f"{text} {WORDS[w % len(WORDS)]}" if text else WORDS[w % len(WORDS)]
            if len(tokenizer.encode(candidate)) <= length:  # a word too long here is skipped; "a" always fits
                text = candidate
            w += 1
        texts.append(text)
    assert [len(t) for t in tokenizer.encode_batch(texts)] == lengths.tolist()
    return [texts[i] for i in np.random.default_rng(seed).permutation(n)]


def adds_bos(shape: str) -> bool:
    return shape.startswith("llama-3")  # Llama 3's tokenizer adds <|begin_of_text|>; SmolLM2's and Qwen2's nothing


def write_shape(hf_dir: Path, shape: str) -> None:
    """A random-weight checkpoint of a Llama-family shape with its tokenizer beside it: GPT-2's byte-level BPE plus
    chat tokens. Llama 3 shapes add a BOS to every text (its template LLAMA3); the others (SmolLM2, Qwen2, Mistral
    here) add nothing and chat in ChatML."""
    shutil.rmtree(hf_dir, ignore_errors=True)
    llama3 = adds_bos(shape)
    ids = write_byte_level_tokenizer(hf_dir, bos=llama3, chat_template=LLAMA3 if llama3 else CHATML)
    if not llama3:
        # CTranslate2's converter needs a BOS token's name (its config's bos_token must be a string). SmolLM2 ships
        # <|im_start|> as its bos_token and never adds it to a text: the same here (the encoding does not change).
        path = hf_dir / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["bos_token"] = "<|im_start|>"
        path.write_text(json.dumps(config, indent=2))
    make_checkpoint(hf_dir, shape, vocab_size=ids.n_vocab, eos_token_id=list(ids.eos_ids), bos_token_id=ids.bos_id)


def export_ours(hf_dir: Path, model_dir: Path, shape: str | None) -> str | None:
    """Our model dir from the checkpoint (not timed). None when done; for a shape our export does not take yet,
    its message, and our side is reported unavailable instead of failing the whole run."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(hf_dir), "--output",
                             str(model_dir)], cwd=ROOT, capture_output=True, text=True)
    if export.returncode == 0:
        return None
    # pipeline.export refuses what it does not take by name ("model_type 'x' is not supported", rope types too)
    if shape and any(m in export.stderr.lower() for m in ("unsupported model type", "is not supported")):
        return export.stderr.strip().splitlines()[-1]
    raise RuntimeError(f"pipeline.export exited {export.returncode}:\n{export.stderr[-3000:]}")


def setup(size: str, rows: int, workdir: Path, shape: str | None = None) -> Setup:
    """Not timed: the same random weights as a Hugging Face checkpoint and as our model dir, and the prompts."""
    hf_dir, model_dir = workdir / "hf", workdir / "model"
    vocab = default_vocab_dir()
    if shape:
        # In a child: torch building the model here would raise this process's peak RSS, and every side's process
        # reports at least its parent's peak as its own ru_maxrss (Linux carries it over fork and exec).
        code = ("import sys; from pathlib import Path; from bench.whole_job import write_shape; "
                "write_shape(Path(sys.argv[1]), sys.argv[2])")
        done = subprocess.run([sys.executable, "-c", code, str(hf_dir), shape], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"writing the {shape} checkpoint failed:\n{done.stderr[-3000:]}")
    else:
        cfg = SIZES[size]
        save_hf(hf_dir, cfg, random_weights(cfg, seed=0))
        # HF's names for the same files (as tests/conftest.py write_hf_checkpoint)
        shutil.copyfile(vocab / "encoder.json", hf_dir / "vocab.json")
        shutil.copyfile(vocab / "vocab.bpe", hf_dir / "merges.txt")
    unavailable = export_ours(hf_dir, model_dir, shape)

    # A shape's tokenizer is GPT-2's BPE with chat tokens added: plain words encode to the same ids, so the prompts'
    # lengths are GPT-2's (plus the BOS a Llama 3 shape adds, which every side's tokenizer adds alike).
    tokenizer = Tokenizer(vocab)
    texts = prompt_texts(rows, tokenizer)
    prompts = workdir / "prompts"
    shutil.rmtree(prompts, ignore_errors=True)
    prompts.mkdir(parents=True)
    shards = min(SHARDS, rows)
    for s in range(shards):
        part = texts[s::shards]
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(len(part))], "prompt": part}),
                       prompts / f"prompts-{s:03d}.parquet")
    bos = rows if shape and adds_bos(shape) else 0
    return Setup(hf_dir, model_dir, str(prompts / "*.parquet"), rows,
                 sum(len(t) for t in tokenizer.encode_batch(texts)) + bos, unavailable)


def run_child(cmd: list[str], log: Path, cwd: Path = ROOT) -> tuple[float, float]:
    """Run cmd in cwd to exit: (wall seconds from just before the fork to its reaping, peak RSS in MB).

    The peak is the child's ru_maxrss from os.wait4 (the kernel's high-water mark of the process, kept after it
    exits): per child and exact, unlike RUSAGE_CHILDREN (a max over all children so far), and with no sampling
    gap, unlike polling /proc/PID/status (VmHWM vanishes when the process exits). It covers the child's own
    reaped children too, as a max not a sum; both sides here do their work in one process (FnApiRunner runs the
    Beam worker in process).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def run_ours(side: str, s: Setup, out: Path, new_tokens: int, threads: int, extra: list[str]) -> Run:
    seconds, rss = run_child(
        [sys.executable, "-m", "pipeline.run", "--input", s.prompts_glob, "--output", str(out), "--model_dir",
         str(s.model_dir), "--max_new_tokens", str(new_tokens), "--runner", "FnApiRunner",
         "--intra_op_threads", str(threads), *extra], out.with_suffix(".log"))
    columns = ["id", "completion", "completion_tokens"]
    table = pa.concat_tables(pq.read_table(p, columns=columns) for p in sorted((out / "completions").glob("*")))
    assert table.num_rows == s.rows, f"{side} wrote {table.num_rows} of {s.rows} rows"
    return Run(side, seconds, rss, sum(table.column("completion_tokens").to_pylist()), completions(table))


def run_hf(side: str, dtype: str, s: Setup, out: Path, new_tokens: int, batch_size: int, threads: int) -> Run:
    script = out.parent / "hf_generate.py"
    script.write_text(HF_SCRIPT)
    output = out.with_suffix(".parquet")
    seconds, rss = run_child([sys.executable, str(script), str(s.hf_dir), s.prompts_glob, str(output),
                              str(batch_size), str(new_tokens), str(threads), dtype], out.with_suffix(".log"))
    table = pq.read_table(output, columns=["id", "completion", "completion_tokens"])
    assert table.num_rows == s.rows, f"{side} wrote {table.num_rows} of {s.rows} rows"
    return Run(side, seconds, rss, sum(table.column("completion_tokens").to_pylist()), completions(table))


def run_peer(side: str, key: str, s: Setup, out: Path, new_tokens: int, threads: int, python: str,
             models: Path) -> Run:
    peer = PEERS[key]
    model = convert(peer, python, s.hf_dir, models / key)
    script = out.parent / f"{key}_generate.py"
    script.write_text(peer.script)
    output = out.with_suffix(".parquet")
    seconds, rss = run_child([python, str(script), str(model), str(s.hf_dir), s.prompts_glob, str(output),
                              str(new_tokens), str(threads), peer.option], out.with_suffix(".log"))
    table = pq.read_table(output, columns=["id", "completion", "completion_tokens"])
    assert table.num_rows == s.rows, f"{side} wrote {table.num_rows} of {s.rows} rows"
    return Run(side, seconds, rss, sum(table.column("completion_tokens").to_pylist()), completions(table))


def completions(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column("id").to_pylist(), table.column("completion").to_pylist()))


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def render(args: argparse.Namespace, s: Setup, sides: list[str], runs: list[Run]) -> str:
    cpu, vector = cpu_features()
    by_side = {side: [r for r in runs if r.side == side] for side in sides}
    ours = median(by_side[sides[0]], "tokens_per_s")
    extra = "; ".join(f"`{shlex.join(a)}`" for a in args.ours_args if a)
    extra = f" (plus {extra})" if extra else ""
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, vector units: {' '.join(vector) or 'none of AVX2+'}; "
        f"{args.threads} threads for every side.",
        f"Model: {model_line(args)}, random weights. {s.rows} prompts "
        f"of 1-{MAX_PROMPT_TOKENS} tokens ({s.prompt_tokens} in all, shuffled, {min(SHARDS, s.rows)} Parquet shards), "
        f"greedy, {args.new_tokens} new tokens per row.",
        "Each side is one process timed from start to exit (imports, model load, read, generate, write); "
        f"{args.repeats} alternated run(s) each. Ours: `pipeline.run --runner FnApiRunner`{extra}; transformers: "
        f"`generate` in batches of {args.batch_size} in file order.",
        "",
        f"| side | wall s | peak RSS MB | new tokens | tok/s | {sides[0]} / side (tok/s) | completions same as it |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    reference = by_side[sides[0]][0].completions
    for side, rs in by_side.items():
        tps = median(rs, "tokens_per_s")
        ratio, same = "", ""
        if side != sides[0]:
            ratio = f"{ours / tps:.2f}x"
            same = f"{sum(rs[0].completions.get(k) == v for k, v in reference.items())}/{len(reference)}"
        lines.append(f"| {side} | {median(rs, 'seconds'):.1f} | {max(r.peak_rss_mb for r in rs):.0f} "
                     f"| {rs[0].tokens} | {tps:.1f} | {ratio} | {same} |")
    lines += ["", "Wall s and tok/s: medians over the runs; peak RSS: the largest. Same weights, greedy: the side "
              "in ours' precision should match it row for row (rounding can flip a near tie), the other drifts."]
    if s.ours_unavailable:
        lines += ["", f"Ours: unavailable, pipeline.export does not take this checkpoint yet ({s.ours_unavailable})."]
    return "\n".join(lines)


def model_line(args: argparse.Namespace) -> str:
    if args.shape:
        f = SHAPES[args.shape]
        return (f"{args.shape} shape ({f['model_type']}, {f['num_hidden_layers']} layers, {f['hidden_size']} wide, "
                "HF layout)")
    cfg = SIZES[args.size]
    return f"GPT-2 {args.size} shape ({cfg.n_layer} layers, {cfg.n_embd} wide)"


def write_results(text: str, path: Path = BENCHMARKS) -> None:
    write_between(text, MARKERS, path)


def run(args: argparse.Namespace, workdir: Path) -> str:
    print(f"setup: {model_line(args)}, {args.prompts} prompts in {workdir}", flush=True)
    s = setup(args.size, args.prompts, workdir, args.shape)
    hf = f"transformers script, batch {args.batch_size}"
    dtypes = {} if args.no_hf else {f"{hf}, {dtype}": dtype for dtype in ("float32", "bfloat16")}
    peers = {PEERS[k].name: k for k in args.peers}
    ours = {"ours: pipeline.run" + (f" {shlex.join(a)}" if a else ""): a for a in args.ours_args}
    if s.ours_unavailable:
        print(f"ours: unavailable ({s.ours_unavailable})", flush=True)
        ours = {}
    sides = [*ours, *dtypes, *peers]
    if not sides:
        raise SystemExit("no side to run")
    models = workdir / "peer-models"
    models.mkdir(exist_ok=True)
    runs_dir = workdir / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir()
    runs = []
    for r in range(args.repeats):
        for i, side in enumerate(sides if r % 2 == 0 else sides[::-1]):
            out = runs_dir / f"{r}-{i}"
            if side in ours:
                result = run_ours(side, s, out, args.new_tokens, args.threads, ours[side])
            elif side in peers:
                result = run_peer(side, peers[side], s, out, args.new_tokens, args.threads, args.peers_python,
                                  models)
            else:
                result = run_hf(side, dtypes[side], s, out, args.new_tokens, args.batch_size, args.threads)
            runs.append(result)
            print(f"run {r + 1}/{args.repeats} {side}: {result.seconds:.1f} s, {result.tokens} tokens, "
                  f"{result.tokens_per_s:.1f} tok/s, peak RSS {result.peak_rss_mb:.0f} MB", flush=True)
    return render(args, s, sides, runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.whole_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", choices=sorted(SIZES), help="a GPT-2 size")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a Llama-family shape instead of GPT-2 (random weights in HF layout, made by transformers)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32, help="the transformers script's batch size")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for every side")
    p.add_argument("--repeats", type=int, default=2, help="rounds of all sides, alternating the order")
    p.add_argument("--workdir", help="where models, prompts and outputs go (default: a temporary directory)")
    p.add_argument("--ours_args", action="append", default=None,
                   help='extra options for pipeline.run, e.g. "--precision int8"; given several times, one side each '
                        '(the first is the one the others are compared with)')
    p.add_argument("--peers", nargs="*", default=[], choices=sorted(PEERS), help="CPU engines to run too")
    p.add_argument("--peers_python", default=sys.executable, help="the Python that has the peers installed")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers sides")
    p.add_argument("--max_isa", choices=sorted(ISA_CAPS),
                   help="run every side below this ISA, through each engine's own switch (an AVX2-only CPU's "
                        "instructions on this one; the table's machine line says so)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (GPT-2's, unless --shape), 24 prompts, 4 new tokens, 1 repeat")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.prompts, args.new_tokens, args.repeats = "tiny", 24, 4, 1
    args.ours_args = [shlex.split(a) for a in args.ours_args or [""]]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(ISA_CAPS.get(args.max_isa, {}))  # every side inherits it; cpu_features names the cap
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        text = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            text = run(args, Path(tmp))
    print("\n" + text)
    if args.write:
        write_results(text)
        print(f"\nwritten to {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
