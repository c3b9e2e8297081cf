"""The job as one composite transform: read -> unique ids (and, with --skip_existing, ids done) -> GenerateText ->
write. Parquet or JSON Lines in, either out."""
from __future__ import annotations

import dataclasses

import apache_beam as beam

from gpt2.sampling import SamplingParams
from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
from transforms.generate_text import GenerateText
from transforms.read import ReadPrompts
from transforms.records import ERRORS
from transforms.unique_ids import UniqueIds
from transforms.write import WriteResults, read_ids


@dataclasses.dataclass(frozen=True)
class JobConfig:
    output_dir: str
    model_dir: str  # local, or gs://: each worker machine copies it once to its cache (transforms/model_cache.py)
    model_label: str | None = None  # name@sha256 prefix, written in every row; None: from the model's manifest
    n_ctx: int | None = None  # None: from the model's manifest
    defaults: SamplingParams = SamplingParams()
    seed: int = 0
    stops: tuple[str, ...] = ()
    truncate: str = "none"
    prompt_column: str = "prompt"
    id_column: str = "id"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    precision: str = "auto"
    intra_op_threads: int | None = None
    output_format: str = "parquet"  # or "jsonl"
    logprobs: bool = False  # completions get `logprobs`
    # Output files of earlier runs whose ids are done (--skip_existing): rows with those ids are skipped. Never a
    # file this run writes.
    done_files: tuple[str, ...] = ()


class GenerateCompletions(beam.PTransform):
    """PCollection of input paths (Parquet, or JSON Lines) -> PCollection of the paths whose outputs were written.

    The rows read carry their file and row number (transforms.records.PromptRow): GenerateText names them in its
    error messages and passes them to its output rows, by which the writer puts each row in its shard's files.
    """

    def __init__(self, config: JobConfig):
        super().__init__()
        self.c = config

    def expand(self, paths):
        c = self.c
        read = paths | "Read" >> ReadPrompts(c.prompt_column, c.id_column)
        done_ids = None
        if c.done_files:
            done_ids = (paths.pipeline | "DoneFiles" >> beam.Create(c.done_files)
                        | "SpreadDoneFiles" >> beam.Reshuffle() | "ReadDoneIds" >> beam.FlatMap(read_ids))
        unique = read["rows"] | "UniqueIds" >> UniqueIds(done_ids)
        sampling = {f.name: getattr(c.defaults, f.name) for f in dataclasses.fields(c.defaults) if f.name != "seed"}
        generated = unique.rows | "GenerateText" >> GenerateText(
            c.model_dir, stop=c.stops, truncate=c.truncate, seed=c.seed, batch_size=c.batch_size,
            max_batch_tokens=c.max_batch_tokens, streaming=False, precision=c.precision,
            intra_op_threads=c.intra_op_threads, model_label=c.model_label, n_ctx=c.n_ctx, logprobs=c.logprobs,
            **sampling)
        errors = (read[ERRORS], unique[ERRORS], generated.errors) | "DeadLetters" >> beam.Flatten()
        return (generated.completions, errors, paths) | "Write" >> WriteResults(
            c.output_dir, c.output_format, c.logprobs)
