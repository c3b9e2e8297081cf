"""The whole `pipeline.run` job vs the engine alone on the same prompts, and what length-aware batching saves."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmgraph.loader import GenerationModel
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer
from pipeline.sample_data import PROMPTS
from transforms.batching import BATCHES, plan_batches, run_slots

WORDS = " ".join(PROMPTS).split()


@dataclasses.dataclass
class _Row:  # what plan_batches reads of a Request
    token_ids: list[int]
    params: SamplingParams


def write_prompt_shards(directory: Path, rows: int, shards: int, max_words: int, seed: int = 0) -> list[str]:
    """Prompts of 1..max_words words, uniformly mixed lengths, in arrival (file) order."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, max_words + 1))) for _ in range(rows)]
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        part = texts[s * per:(s + 1) * per]
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(len(part))], "prompt": part}),
                       directory / f"prompts-{s:03d}.parquet")
    return texts


def padding_fraction(batches: list[list[_Row]]) -> float:
    """Share of computed prompt slots (rows x longest prompt, summed over batches) that are padding."""
    slots = sum(len(b) * max(len(r.token_ids) for r in b) for b in batches)
    real = sum(len(r.token_ids) for b in batches for r in b)
    return 1 - real / slots


def length_aware(rows: list[_Row], batch_size: int, max_batch_tokens: int) -> list[list[_Row]]:
    """Length-aware static batches (transforms.batching's cost model: sort each block by length, cut where it
    pays): the padding batching without refill would compute. The job's runs admit rows in the same order."""
    return list(plan_batches(rows, batch_size, max_batch_tokens, policy=BATCHES))


def arrival_order(rows: list[_Row], batch_size: int, max_batch_tokens: int) -> list[list[_Row]]:
    """Batches in arrival order, as Beam's BatchElements makes them: bounded by rows and max_batch_tokens only."""
    batches: list[list[_Row]] = []
    batch, longest, max_new = [], 0, 0
    for r in rows:
        grown = max(longest, len(r.token_ids)), max(max_new, r.params.max_new_tokens)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * sum(grown) > max_batch_tokens):
            batches.append(batch)
            batch, grown = [], (len(r.token_ids), r.params.max_new_tokens)
        batch.append(r)
        longest, max_new = grown
    return batches + [batch] if batch else batches


def run(model_dir: Path, workdir: Path, rows: int, max_words: int, new_tokens: int, batch_size: int,
        max_batch_tokens: int, threads: int) -> dict:
    from pipeline.run import main as run_pipeline

    texts = write_prompt_shards(workdir / "prompts", rows, shards=4, max_words=max_words)
    params = SamplingParams(max_new_tokens=new_tokens)
    tok = Tokenizer(model_dir)
    requests = [_Row(ids, params) for ids in tok.encode_batch(texts)]
    aware = length_aware(requests, batch_size, max_batch_tokens)
    arrival = arrival_order(requests, batch_size, max_batch_tokens)

    # Both sides include loading the model (and the pipeline its tokenizing, reading and writing).
    start = time.perf_counter()
    code = run_pipeline(["--input", str(workdir / "prompts" / "*.parquet"), "--output", str(workdir / "out"),
                         "--model_dir", str(model_dir), "--max_new_tokens", str(new_tokens),
                         "--batch_size", str(batch_size), "--max_batch_tokens", str(max_batch_tokens),
                         "--intra_op_threads", str(threads)])
    pipeline_seconds = time.perf_counter() - start
    report = json.loads((workdir / "out" / "run_report.json").read_text())
    assert code == 0 and report["rows_written"] == rows, (code, report)

    start = time.perf_counter()
    model = GenerationModel(model_dir, intra_threads=threads)
    runs = plan_batches(requests, batch_size, max_batch_tokens)  # the job's runs, as the job decodes them
    engine_tokens = sum(len(c.token_ids) for b in runs
                        for c in model.generate([r.token_ids for r in b], [r.params for r in b], logprobs=False,
                                                slots=run_slots(b, batch_size, max_batch_tokens)))
    engine_seconds = time.perf_counter() - start
    model.close()
    return {
        "prompts": rows, "prompt_tokens": sum(len(r.token_ids) for r in requests),
        "pipeline_tokens": report["generated_tokens"], "pipeline_seconds": pipeline_seconds,
        "engine_tokens": engine_tokens, "engine_seconds": engine_seconds,
        "padding_length_aware": padding_fraction(aware), "padding_arrival_order": padding_fraction(arrival),
        "batches_length_aware": len(aware), "batches_arrival_order": len(arrival),
    }
