"""The whole job as one composite transform:
read -> unique ids -> validate -> tokenize -> batch -> generate -> detokenize -> write."""
from __future__ import annotations

import dataclasses

import apache_beam as beam

from gpt2.sampling import SamplingParams
from transforms.batching import BatchByLength
from transforms.detokenize import Detokenize
from transforms.generate import GenerateBatches
from transforms.read import ReadPrompts
from transforms.records import ERRORS
from transforms.unique_ids import UniqueIds
from transforms.validate import Tokenize, ValidateRows
from transforms.write import WriteResults


@dataclasses.dataclass(frozen=True)
class JobConfig:
    output_dir: str
    model_dir: str  # local, or gs://: each worker machine copies it once to its cache (transforms/model_cache.py)
    model_label: str  # name@sha256 prefix, written in every row
    n_ctx: int
    defaults: SamplingParams = SamplingParams()
    seed: int = 0
    stops: tuple[str, ...] = ()
    truncate: str = "none"
    prompt_column: str = "prompt"
    id_column: str = "id"
    batch_size: int = 32
    max_batch_tokens: int = 16384
    precision: str = "auto"
    intra_op_threads: int | None = None


class GenerateCompletions(beam.PTransform):
    """PCollection of input Parquet paths -> PCollection of the paths whose outputs were written."""

    def __init__(self, config: JobConfig):
        super().__init__()
        self.c = config

    def expand(self, paths):
        c = self.c
        read = paths | "Read" >> ReadPrompts(c.prompt_column, c.id_column)
        unique = read["rows"] | "UniqueIds" >> UniqueIds()
        valid = unique.rows | "Validate" >> beam.ParDo(ValidateRows(c.defaults, c.seed)).with_outputs(
            ERRORS, main="ok")
        tokens = valid.ok | "Tokenize" >> beam.ParDo(Tokenize(c.model_dir, c.n_ctx, c.truncate)).with_outputs(
            ERRORS, main="ok")
        batches = tokens.ok | "Batch" >> BatchByLength(c.batch_size, c.max_batch_tokens)
        results = batches | "Generate" >> beam.ParDo(GenerateBatches(c.model_dir, c.precision, c.intra_op_threads)).with_outputs(
            ERRORS, main="ok")
        rows = results.ok | "Detokenize" >> beam.ParDo(Detokenize(c.model_dir, c.model_label, list(c.stops)))
        errors = ((read[ERRORS], unique[ERRORS], valid[ERRORS], tokens[ERRORS], results[ERRORS])
                  | "DeadLetters" >> beam.Flatten())
        return (rows, errors, paths) | "Write" >> WriteResults(c.output_dir)
