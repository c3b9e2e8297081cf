"""The jobs as composite transforms: read -> unique ids (and, with --skip_existing, ids done) -> GenerateText (or
ScoreText) -> write. Parquet or JSON Lines in, either out. Reading, the id rules, dead letters and writing are one
code path for both jobs (`read_unique_rows`, `write_results`)."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pyarrow as pa

from lmgraph.sampling import SamplingParams
from transforms.batching import DEFAULT_BATCH_SIZE
from transforms.generate import PART_SECONDS
from transforms.generate_text import GenerateText
from transforms.read import OVERRIDE_COLUMNS, ReadPrompts
from transforms.records import ERRORS, MESSAGES
from transforms.score_text import ScoreText, scores_schema
from transforms.unique_ids import UniqueIds
from transforms.write import WriteResults, completions_schema, read_ids


@dataclasses.dataclass(frozen=True)
class FileJobConfig:
    """What both jobs are configured by."""
    output_dir: str
    model_dir: str  # local, or gs://: each worker machine copies it once to its cache (transforms/model_cache.py)
    model_label: str | None = None  # name@sha256 prefix, written in every row; None: from the model's manifest
    n_ctx: int | None = None  # None: from the model's manifest
    id_column: str = "id"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int | None = None  # None: the model's default (batching.max_batch_tokens_for)
    precision: str = "auto"
    intra_op_threads: int | None = None
    output_format: str = "parquet"  # or "jsonl"
    # Output files of earlier runs whose ids are done (--skip_existing): rows with those ids are skipped. Never a
    # file this run writes.
    done_files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class JobConfig(FileJobConfig):
    defaults: SamplingParams = SamplingParams()
    seed: int = 0
    stops: tuple[str, ...] = ()
    truncate: str = "none"
    prompt_column: str = "prompt"
    messages_column: str = MESSAGES  # a chat row's messages, where a row has no prompt
    run_seconds: float = PART_SECONDS  # seconds per Session.run (a part of a run)
    logprobs: bool = False  # completions get `logprobs`
    num_samples: int = 1  # completions per row (a num_samples column overrides it)
    samples: bool = False  # completions get `sample` (--num_samples given, or a num_samples column in the input)


@dataclasses.dataclass(frozen=True)
class ScoreJobConfig(FileJobConfig):
    text_column: str = "text"  # the text to score; or, with completion_column, the prompt's column
    completion_column: str | None = None  # score this column's text given text_column's (the prompt)
    stride: int | None = None  # None: n_ctx // 2
    token_logprobs: bool = False
    options: tuple[tuple[str, str], ...] = ()  # column -> the option that named it, for error messages


def read_unique_rows(paths, prompt_column: str, id_column: str, done_files: tuple[str, ...],
                     extra_columns: tuple[str, ...] = (), overrides: tuple[str, ...] = OVERRIDE_COLUMNS,
                     options: dict | None = None, messages_column: str | None = None):
    """Input paths -> (rows with unique ids that are not done, [their dead letters so far]): both jobs' input."""
    read = paths | "Read" >> ReadPrompts(prompt_column, id_column, extra_columns, overrides, options,
                                         messages_column)
    done_ids = None
    if done_files:
        done_ids = (paths.pipeline | "DoneFiles" >> beam.Create(done_files)
                    | "SpreadDoneFiles" >> beam.Reshuffle() | "ReadDoneIds" >> beam.FlatMap(read_ids))
    unique = read["rows"] | "UniqueIds" >> UniqueIds(done_ids)
    return unique.rows, [read[ERRORS], unique[ERRORS]]


def write_results(paths, outputs, errors: list, output_dir: str, output_format: str, schema: pa.Schema,
                  kind: str):
    """Output rows and dead letters -> one output and one errors file per input shard: both jobs' output."""
    dead = tuple(errors) | "DeadLetters" >> beam.Flatten()
    return (outputs, dead, paths) | "Write" >> WriteResults(output_dir, output_format, schema=schema, kind=kind)


class FileJob(beam.PTransform):
    """PCollection of input paths (Parquet, or JSON Lines) -> PCollection of the paths whose outputs were written.
    The rows read carry their file and row number (transforms.records.PromptRow), by which the writer puts each
    output row and dead letter in its shard's files."""

    def __init__(self, config: FileJobConfig):
        super().__init__()
        self.c = config


class GenerateCompletions(FileJob):
    """The generation job: read | GenerateText | write."""

    def expand(self, paths):
        c = self.c
        rows, errors = read_unique_rows(paths, c.prompt_column, c.id_column, c.done_files,
                                        messages_column=c.messages_column)
        sampling = {f.name: getattr(c.defaults, f.name) for f in dataclasses.fields(c.defaults) if f.name != "seed"}
        generated = rows | "GenerateText" >> GenerateText(
            c.model_dir, stop=c.stops, truncate=c.truncate, seed=c.seed, batch_size=c.batch_size,
            max_batch_tokens=c.max_batch_tokens, run_seconds=c.run_seconds, streaming=False, precision=c.precision,
            intra_op_threads=c.intra_op_threads, model_label=c.model_label, n_ctx=c.n_ctx, logprobs=c.logprobs,
            num_samples=c.num_samples if c.samples else None, **sampling)
        return write_results(paths, generated.completions, errors + [generated.errors], c.output_dir,
                             c.output_format, completions_schema(c.logprobs, c.samples), "completions")


class ScoreTexts(FileJob):
    """The scoring job: read | ScoreText | write."""

    def expand(self, paths):
        c = self.c
        extra = (c.completion_column,) if c.completion_column else ()
        rows, errors = read_unique_rows(paths, c.text_column, c.id_column, c.done_files, extra, (),
                                        dict(c.options) or None)
        scored = rows | "ScoreText" >> ScoreText(
            c.model_dir, completion_key=c.completion_column, token_logprobs=c.token_logprobs, stride=c.stride,
            batch_size=c.batch_size, max_batch_tokens=c.max_batch_tokens, streaming=False, precision=c.precision,
            intra_op_threads=c.intra_op_threads, model_label=c.model_label, n_ctx=c.n_ctx)
        return write_results(paths, scored.scores, errors + [scored.errors], c.output_dir, c.output_format,
                             scores_schema(c.token_logprobs), "scores")
