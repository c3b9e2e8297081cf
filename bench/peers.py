"""The CPU engines a user would pick instead of us, as bench.whole_job runs them: CTranslate2 and OpenVINO GenAI.

Each peer gets the same Hugging Face checkpoint, converted by its own tool (not timed, as our export is not), and
runs as its own process from start to exit: read the Parquet prompts, generate greedily exactly `new_tokens`
tokens per row (as the transformers side: no early stop), write Parquet. Installed with the `peers` extra
(`pip install -e ".[peers]"`), never at run time; `--peers_python` runs them from another environment.

  - CTranslate2 (`ct2-transformers-converter`, then `Generator.generate_batch` on batches of 128 by length), int8 weights
    and activations, or float32 (its CPU has no bfloat16: that falls back to float32).
  - OpenVINO GenAI (`optimum-cli export openvino`, then `LLMPipeline.generate` over all prompts: continuous
    batching), weights fp32 run in the CPU's inference precision (bfloat16 on CPUs with bf16 units), or int8
    weights.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str  # the side's label in the table
    convert: list[str]  # the converter's command line, HF_DIR and OUT substituted
    script: str  # the generation script, run as PYTHON SCRIPT MODEL_DIR HF_DIR INPUTS OUTPUT NEW_TOKENS THREADS
    option: str  # what the script gets as its last argument (compute type / nothing)


CT2_SCRIPT = '''\
"""Batch generation with CTranslate2, as its docs show (written by bench.peers)."""
import glob
import sys

import ctranslate2
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import GPT2TokenizerFast

model_dir, hf_dir, inputs, output, new_tokens, threads, compute_type = sys.argv[1:]
new_tokens = int(new_tokens)
tokenizer = GPT2TokenizerFast.from_pretrained(hf_dir)
generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type, intra_threads=int(threads))
table = pa.concat_tables(pq.read_table(path, columns=["id", "prompt"]) for path in sorted(glob.glob(inputs)))
prompts = [tokenizer.convert_ids_to_tokens(tokenizer.encode(p)) for p in table.column("prompt").to_pylist()]
# Prompts of different lengths in one generate_batch: the results hold the prompts and max_length counts their
# tokens (all but the first; include_prompt_in_result=False would drop the prompts only for equal lengths). So
# batches of 128 by length, each run to its longest prompt + new_tokens, every row cut to its own new_tokens
# (the shorter rows of a batch take a few extra steps).
order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
ids = [None] * len(prompts)
for start in range(0, len(order), 128):
    batch = order[start:start + 128]
    longest = max(len(prompts[i]) for i in batch)
    results = generator.generate_batch([prompts[i] for i in batch], max_length=longest - 1 + new_tokens,
                                       min_length=longest - 1 + new_tokens, sampling_topk=1)
    for i, r in zip(batch, results):
        ids[i] = r.sequences_ids[0][len(prompts[i]):][:new_tokens]  # the result starts with the prompt
pq.write_table(table.append_column("completion", pa.array(tokenizer.batch_decode(ids)))
               .append_column("completion_tokens", pa.array([len(i) for i in ids], pa.int32())), output)
'''

OV_SCRIPT = '''\
"""Batch generation with OpenVINO GenAI, as its docs show (written by bench.peers)."""
import glob
import sys

import openvino_genai
import pyarrow as pa
import pyarrow.parquet as pq

model_dir, hf_dir, inputs, output, new_tokens, threads, _ = sys.argv[1:]
new_tokens = int(new_tokens)
pipe = openvino_genai.LLMPipeline(model_dir, "CPU", INFERENCE_NUM_THREADS=int(threads))
config = openvino_genai.GenerationConfig()
config.max_new_tokens = config.min_new_tokens = new_tokens
config.do_sample = False
table = pa.concat_tables(pq.read_table(path, columns=["id", "prompt"]) for path in sorted(glob.glob(inputs)))
result = pipe.generate(table.column("prompt").to_pylist(), config)
tokens = result.perf_metrics.get_num_generated_tokens()
rows = table.num_rows
pq.write_table(table.append_column("completion", pa.array(result.texts))
               .append_column("completion_tokens", pa.array([tokens // rows] * rows, pa.int32())), output)
'''

CT2_CONVERT = ["ct2-transformers-converter", "--model", "HF_DIR", "--output_dir", "OUT"]
OV_CONVERT = ["optimum-cli", "export", "openvino", "--model", "HF_DIR", "--task", "text-generation-with-past"]

PEERS = {
    "ct2-int8": Peer("CTranslate2 int8", CT2_CONVERT + ["--quantization", "int8"], CT2_SCRIPT, "int8"),
    "ct2-float32": Peer("CTranslate2 float32", CT2_CONVERT, CT2_SCRIPT, "float32"),
    "ov-bf16": Peer("OpenVINO GenAI, fp32 weights (bf16 inference on bf16 CPUs)",
                    OV_CONVERT + ["--weight-format", "fp32", "OUT"], OV_SCRIPT, "-"),
    "ov-int8": Peer("OpenVINO GenAI, int8 weights", OV_CONVERT + ["--weight-format", "int8", "OUT"], OV_SCRIPT, "-"),
}


def tool(python: str, name: str) -> str:
    """A console script of the environment `python` belongs to (the converters come with the peers extra)."""
    path = Path(python).parent / name
    return str(path) if path.exists() else name


def convert(peer: Peer, python: str, hf_dir: Path, out: Path) -> Path:
    """The peer's own model from the HF checkpoint (once; not timed)."""
    if not out.exists():
        cmd = [tool(python, peer.convert[0])] + [str(hf_dir) if a == "HF_DIR" else str(out) if a == "OUT" else a
                                                 for a in peer.convert[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return out
