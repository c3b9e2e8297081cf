"""How far int8 (and bfloat16) stray from float32 on the same weights, and CTranslate2 int8 beside them.

  python -m bench.accuracy                                  # GPT-2 124M shape, random weights
  python -m bench.accuracy --outliers                       # the same with planted outlier dimensions
  python -m bench.accuracy --peers_python /tmp/pv/bin/python   # CTranslate2 int8 and float32 too (peers extra)

float32's greedy completion of each prompt (64 tokens, end-of-text ignored) is the reference text. Each side then
- scores prompt + reference teacher-forced: |log p - float32's log p| over the completion's tokens, mean and max;
- completes each prompt greedily itself: how many of its 64 tokens equal float32's at the same position, and how
  many come before the first that differs (mean over prompts).
CTranslate2 float32 is there to check the harness: it should agree with our float32 to rounding.

Random weights flatter int8 (no outlier features) but flatter every side's greedy agreement less (their
distributions are flat, so near-ties are common). --outliers plants what trained GPT-2 has instead: a few hidden
dimensions OUTLIER_GAIN x larger than the rest in the residual stream (wte and wpe columns scaled), so every
LayerNorm's output, the int8 matmuls' input, carries values far above the rest of its row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.machine import cpu_features
from bench.whole_job import ROOT, prompt_texts
from lmgraph.checkpoint import random_weights, save_hf
from lmgraph.config import SIZES
from lmgraph.device import bf16_units, cpu_flags
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer, default_vocab_dir

OUTLIER_DIMS = (138, 378, 447)  # where trained GPT-2 124M has its large residual features
OUTLIER_GAIN = 50.0

CT2_SCRIPT = '''\
"""Teacher-forced log-probabilities and greedy completions with CTranslate2 (written by bench.accuracy)."""
import json
import sys

import ctranslate2
from transformers import GPT2TokenizerFast

model_dir, hf_dir, request, compute_type = sys.argv[1:]
job = json.load(open(request))
tok = GPT2TokenizerFast.from_pretrained(hf_dir)
gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type)
scored = gen.score_batch([tok.convert_ids_to_tokens(ids) for ids in job["texts"]], max_batch_size=32)
n = job["new_tokens"]
tokens = [gen.generate_batch([tok.convert_ids_to_tokens(ids)], max_length=n, min_length=n, sampling_topk=1,
                             include_prompt_in_result=False)[0].sequences_ids[0] for ids in job["prompts"]]
json.dump({"logprobs": [list(r.log_probs) for r in scored], "tokens": tokens}, sys.stdout)
'''


def make_checkpoint(size: str, hf_dir: Path, outliers: bool) -> None:
    cfg = SIZES[size]
    weights = random_weights(cfg, seed=0)
    if outliers:
        for name in ("wte", "wpe"):
            weights[name][:, list(OUTLIER_DIMS)] *= OUTLIER_GAIN
    save_hf(hf_dir, cfg, weights)
    vocab = default_vocab_dir()
    shutil.copyfile(vocab / "encoder.json", hf_dir / "vocab.json")
    shutil.copyfile(vocab / "vocab.bpe", hf_dir / "merges.txt")


def compare(ref_logprobs: list[list[float]], ref_tokens: list[list[int]], logprobs: list[list[float]],
            tokens: list[list[int]]) -> dict[str, float]:
    """The side's stray from float32: log-probabilities of the reference completions and its own greedy tokens."""
    diff = np.concatenate([np.abs(np.subtract(a, b)) for a, b in zip(logprobs, ref_logprobs)])
    same = [np.equal(t, r) for t, r in zip(tokens, ref_tokens)]
    first = [int(np.argmin(s)) if not s.all() else len(s) for s in same]
    return {"mean_abs_logprob": float(diff.mean()), "max_abs_logprob": float(diff.max()),
            "tokens_same": float(np.mean([s.mean() for s in same])), "before_first_diff": float(np.mean(first)),
            "rows_same": int(sum(s.all() for s in same))}


def run(args: argparse.Namespace, work: Path) -> str:
    from lmgraph.loader import GenerationModel

    hf_dir, model_dir = work / "hf", work / "model"
    make_checkpoint(args.size, hf_dir, args.outliers)
    subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(hf_dir), "--output",
                    str(model_dir)], cwd=ROOT, check=True, capture_output=True)
    tokenizer = Tokenizer(default_vocab_dir())
    prompts = tokenizer.encode_batch(prompt_texts(args.prompts, tokenizer))
    greedy = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def ours(precision: str) -> tuple[list[list[int]], list[list[float]]]:
        """(greedy completions, teacher-forced log-probabilities of the reference completions); float32's
        completions are the reference."""
        m = GenerationModel(model_dir, precision=precision)
        tokens = [c.token_ids for c in m.generate(prompts, greedy, logprobs=False)]
        reference.setdefault("texts", [p + t for p, t in zip(prompts, tokens)])
        scored = [lp[len(p) - 1:] for p, lp in zip(prompts, m.score(reference["texts"]))]
        m.close()
        return tokens, scored

    reference: dict[str, list[list[int]]] = {}
    ref_tokens, ref_logprobs = ours("float32")
    reference_texts = reference["texts"]
    # bfloat16 where the CPU has bfloat16 units only: elsewhere it is not what runs (auto picks float32), and with
    # oneDNN capped below them (ONEDNN_MAX_CPU_ISA=AVX2) TensorFlow still sends it to oneDNN, which aborts.
    sides = {f"ours {p}": ours(p) for p in (("bfloat16", "int8") if bf16_units(cpu_flags()) else ("int8",))}
    if args.peers_python:
        from bench.peers import PEERS, convert

        request = work / "request.json"
        request.write_text(json.dumps({"texts": reference_texts, "prompts": prompts, "new_tokens": args.new_tokens}))
        script = work / "ct2_accuracy.py"
        script.write_text(CT2_SCRIPT)
        for key in ("ct2-float32", "ct2-int8"):
            model = convert(PEERS[key], args.peers_python, hf_dir, work / key)
            done = subprocess.run([args.peers_python, str(script), str(model), str(hf_dir), str(request),
                                   PEERS[key].option], capture_output=True, text=True, check=True)
            got = json.loads(done.stdout)
            sides[PEERS[key].name] = (got["tokens"], [lp[len(p) - 1:] for p, lp in zip(prompts, got["logprobs"])])
    cpu, vector = cpu_features()
    lines = [f"Machine: {cpu}, vector units: {' '.join(vector)}. GPT-2 {args.size} shape, random weights"
             + (f" with planted outliers (dims {', '.join(map(str, OUTLIER_DIMS))} x{OUTLIER_GAIN:g} in wte and wpe)"
                if args.outliers else "") + f"; {args.prompts} prompts of 1-64 tokens, {args.new_tokens} greedy "
             "tokens. Against our float32 on the same weights:", "",
             "| side | mean abs logprob diff | max abs logprob diff | greedy tokens same | tokens before first "
             "difference | rows all same |", "|---|---:|---:|---:|---:|---:|"]
    for side, (tokens, logprobs) in sides.items():
        c = compare(ref_logprobs, ref_tokens, logprobs, tokens)
        lines.append(f"| {side} | {c['mean_abs_logprob']:.4f} | {c['max_abs_logprob']:.3f} | "
                     f"{c['tokens_same']:.1%} | {c['before_first_diff']:.1f} of {args.new_tokens} | "
                     f"{c['rows_same']}/{args.prompts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="124M", choices=sorted(SIZES))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--outliers", action="store_true", help="plant outlier dimensions in the residual stream")
    p.add_argument("--peers_python", help="a Python with the peers extra: add CTranslate2 int8 and float32")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        print(run(args, Path(work)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
