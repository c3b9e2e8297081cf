"""The CPU engines a user would pick instead of us, as bench.whole_job runs them: CTranslate2 and OpenVINO GenAI.

Each peer gets the same Hugging Face checkpoint (GPT-2 or the Llama family, tokenizer beside it), converted by its
own tool (not timed, as our export is not), and runs as its own process from start to exit: read the Parquet
prompts, generate greedily exactly `new_tokens` tokens per row (as the other sides: no early stop), write Parquet
with each row's completion and the number of new tokens it generated (prompt tokens are never counted). Installed
with the `peers` extra (`pip install -e ".[peers]"`), never at run time; `--peers_python` runs them from another
environment. Each runs as its docs recommend for a batch job:

  - CTranslate2 (`ct2-transformers-converter`, then `Generator.generate_batch`), int8 weights and activations, or
    float32 (its CPU has no bfloat16: that falls back to float32). Prompts sorted by length into batches of 128,
    `include_prompt_in_result=False` (a batch's prompts are forwarded at once up to its shortest one); see
    ct2_plan for what that means for max_length and each row's result.
  - OpenVINO GenAI (`optimum-cli export openvino`, then `LLMPipeline.generate` over all prompts: continuous
    batching), weights fp32 run in the CPU's inference precision (bfloat16 on CPUs with bf16 units), or int8
    weights. The prompts go in as plain text, without the chat template it would otherwise apply to a checkpoint
    that has one (the other sides get the same text).
"""
from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
from pathlib import Path

CT2_BATCH = 128


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str  # the side's label in the table
    convert: list[str]  # the converter's command line, HF_DIR and OUT substituted
    script: str  # the generation script, run as PYTHON SCRIPT MODEL_DIR HF_DIR INPUTS OUTPUT NEW_TOKENS THREADS
    option: str  # what the script gets as its last argument (compute type / nothing)


def ct2_plan(lengths: list[int], new_tokens: int, batch_size: int = CT2_BATCH):
    """CTranslate2's batches for prompts of these token lengths: (rows, max_length, head of each row's result).

    With include_prompt_in_result=False, generate_batch forwards a batch's prompts at once only up to the batch's
    shortest prompt. The rest of a longer prompt goes through the decoding loop, comes back at the head of that
    row's result and counts toward max_length. So prompts of like length go together (sorted), a batch runs to
    new_tokens + longest - shortest (min_length the same: no early stop), and row i keeps the new_tokens tokens
    after its own head of lengths[i] - shortest prompt tokens. A shorter row's tokens past its new_tokens are
    dropped: the batch runs those steps for the longest row's prompt remainder anyway.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        shortest, longest = lengths[rows[0]], lengths[rows[-1]]
        yield rows, new_tokens + longest - shortest, [lengths[i] - shortest for i in rows]


# The script is run by the peers' Python, which need not have this project: ct2_plan goes in as source.
CT2_SCRIPT = '''\
"""Batch generation with CTranslate2, as its docs recommend (written by bench.peers)."""
import glob
import sys

import ctranslate2
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

CT2_BATCH = %d


%s

model_dir, hf_dir, inputs, output, new_tokens, threads, compute_type = sys.argv[1:]
new_tokens = int(new_tokens)
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type, intra_threads=int(threads))
table = pa.concat_tables(pq.read_table(path, columns=["id", "prompt"]) for path in sorted(glob.glob(inputs)))
prompts = [tokenizer.convert_ids_to_tokens(tokenizer.encode(p)) for p in table.column("prompt").to_pylist()]
ids = [None] * len(prompts)
for rows, length, heads in ct2_plan([len(p) for p in prompts], new_tokens):
    # end_token=[]: no row ends early, as on the other sides (greedy: sampling_topk=1)
    results = generator.generate_batch([prompts[i] for i in rows], max_length=length, min_length=length,
                                       sampling_topk=1, include_prompt_in_result=False, end_token=[])
    for i, head, r in zip(rows, heads, results):
        ids[i] = r.sequences_ids[0][head:head + new_tokens]
pq.write_table(table.append_column("completion", pa.array(tokenizer.batch_decode(ids)))
               .append_column("completion_tokens", pa.array([len(i) for i in ids], pa.int32())), output)
''' % (CT2_BATCH, inspect.getsource(ct2_plan))

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
config.apply_chat_template = False  # the prompt text as is, as every side gets it (its default wraps it in a chat)
table = pa.concat_tables(pq.read_table(path, columns=["id", "prompt"]) for path in sorted(glob.glob(inputs)))
result = pipe.generate(table.column("prompt").to_pylist(), config)
# A row that ended by length made exactly max_new_tokens; min_new_tokens leaves no other way to end.
reasons = result.finish_reasons
if any(r != openvino_genai.GenerationFinishReason.LENGTH for r in reasons):
    sys.exit(f"rows ended before {new_tokens} new tokens: {sorted(set(map(str, reasons)))}")
pq.write_table(table.append_column("completion", pa.array(result.texts))
               .append_column("completion_tokens", pa.array([new_tokens] * len(reasons), pa.int32())), output)
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
