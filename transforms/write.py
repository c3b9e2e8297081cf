"""Write one completions file and one errors file per input shard, named after it, all-or-nothing.

DIR/completions/<shard>.<ext> and DIR/errors/<shard>.<ext> (ext: parquet, or jsonl with output_format="jsonl": the
same fields, one JSON object per line), rows in input order (a row's samples in sample order). Each file is written
under a temporary name in DIR/.tmp/ and renamed into place when complete, errors first: a completions file that
exists is a shard that is done (what --skip_existing relies on), and a run killed midway leaves no partial final
file. A shard that could not be read gets its errors file only: it is not done. The scoring job writes its rows to
DIR/scores/ instead of DIR/completions/ (`kind`), by the same rules.

A row is written whole or not at all: a row with a dead letter has none of its completions written (when a
generation failure hit some of its samples only), and one dead letter per row is kept.
"""
from __future__ import annotations

import io
import posixpath
import uuid
from typing import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import jsonl
from transforms.progress import NAMESPACE, ROWS_DONE, Counter
from transforms.read import shard_name, unreadable_id
from transforms.records import is_jsonl

FORMATS = ("parquet", "jsonl")
COMPLETIONS_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("completion_token_ids", pa.list_(pa.int32())), ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()), ("finish_reason", pa.string()), ("model", pa.string()),
    ("precision", pa.string()),
])
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("error", pa.string()),
                           ("source", pa.string())])


def completions_schema(logprobs: bool = False, samples: bool = False) -> pa.Schema:
    """The completions schema; with logprobs, `logprobs` list<float32> after `completion_token_ids`; with samples,
    `sample` int32 after `id`."""
    schema = COMPLETIONS_SCHEMA
    if logprobs:
        i = schema.get_field_index("completion_token_ids") + 1
        schema = schema.insert(i, pa.field("logprobs", pa.list_(pa.float32())))
    if samples:
        schema = schema.insert(1, pa.field("sample", pa.int32()))
    return schema


def output_path(output_dir: str, kind: str, source: str, output_format: str = "parquet") -> str:
    """A shard's output file of one kind: completions, scores or errors."""
    return FileSystems.join(output_dir, kind, f"{shard_name(source)}.{output_format}")


def errors_path(output_dir: str, source: str, output_format: str = "parquet") -> str:
    return output_path(output_dir, "errors", source, output_format)


def write_table(rows: list[dict], schema: pa.Schema, path: str, tmp_dir: str) -> None:
    """Parquet (or JSON Lines, for a .jsonl path) to a temporary file, then renamed to `path`: readers never see a
    partial file."""
    if is_jsonl(path):
        data = jsonl.encode(rows, schema.names)
    else:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
        data = buf.getvalue()
    tmp = FileSystems.join(tmp_dir, f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):  # a re-run replaces the old file
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def read_columns(path: str, columns: list[str]) -> dict[str, list]:
    """Columns of an output file we wrote, Parquet or JSON Lines, as lists."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        if is_jsonl(path):
            values: dict[str, list] = {c: [] for c in columns}
            for r in jsonl.read_objects(f):
                for c in columns:
                    values[c].append(r.get(c))
            return values
        table = pq.read_table(f, columns=columns)
        return {c: table.column(c).to_pylist() for c in columns}


def read_ids(path: str) -> Iterator[str]:
    """The ids in an output file we wrote, a batch (or line) at a time; a row's samples (adjacent) give its id
    once."""
    last = object()
    for rid in _ids(path):
        if rid != last:
            yield rid
        last = rid


def _ids(path: str) -> Iterator[str]:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        if is_jsonl(path):
            yield from (r["id"] for r in jsonl.read_objects(f))
        else:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id"]):
                yield from batch.column(0).to_pylist()


def whole_rows(outputs: list[dict], errors: list[dict]) -> tuple[list[dict], list[dict]]:
    """A shard's output rows and dead letters, in input order, with every row whole: the outputs of a row that has
    a dead letter are dropped (a generation failure that hit some of its samples only) and its dead letter says
    so; a row with several dead letters (its samples failed in several batches) keeps the first."""
    order = lambda r: (r["row_index"], r["id"], r.get("sample", 0))  # noqa: E731 - input order
    failed: dict[tuple, dict] = {}
    for e in sorted(errors, key=order):
        failed.setdefault((e["row_index"], e["id"]), e)
    kept = sorted((r for r in outputs if (r["row_index"], r["id"]) not in failed), key=order)
    dropped: dict[tuple, int] = {}
    for r in outputs:
        key = (r["row_index"], r["id"])
        if key in failed:
            dropped[key] = dropped.get(key, 0) + 1
    for key, n in dropped.items():
        failed[key] = {**failed[key], "error": f"{failed[key]['error']} ({n} other sample(s) of the row were "
                                               f"generated but not written: a row is written whole or not at all)"}
    return kept, list(failed.values())


class WriteShard(beam.DoFn):
    """(source, {"completions": [...], "errors": [...], "sources": [...]}) -> written file paths.

    schema: the output rows' (default: the completions schema, with logprobs); kind: their directory."""

    def __init__(self, output_dir: str, output_format: str = "parquet", logprobs: bool = False,
                 schema: pa.Schema | None = None, kind: str = "completions"):
        self.output_dir, self.output_format, self.logprobs = output_dir, output_format, logprobs
        self.schema, self.kind = schema or completions_schema(logprobs), kind
        self.written = Metrics.counter(NAMESPACE, "rows_written")
        self.dead = Metrics.counter(NAMESPACE, "rows_dead_lettered")

    def process(self, element):
        source, groups = element
        tmp_dir = FileSystems.join(self.output_dir, ".tmp")
        completions, errors = whole_rows(list(groups["completions"]), list(groups["errors"]))
        write_table(errors, ERRORS_SCHEMA, errors_path(self.output_dir, source, self.output_format), tmp_dir)
        done = output_path(self.output_dir, self.kind, source, self.output_format)
        if any(e["id"] == unreadable_id(source) for e in errors):
            # Not done: no completions file, so that --skip_existing tries the shard again next run.
            if FileSystems.exists(done):
                FileSystems.delete([done])
        else:
            write_table(completions, self.schema, done, tmp_dir)
        self.dead.inc(len(errors))
        self.written.inc(len(completions))
        yield source


class _KeyBySource(beam.DoFn):
    """row -> (its source, row), counting it in gpt2/rows_done (the progress counter) unless it stands for a whole
    unreadable shard rather than a row, or is a row's sample other than its first (rows done are input rows)."""

    def __init__(self):
        self.done = Counter(ROWS_DONE)

    def process(self, row: dict):
        if row["id"] != unreadable_id(row["source"]) and not row.get("sample"):
            self.done.inc()
        yield row["source"], row


class WriteResults(beam.PTransform):
    """Completion rows and dead letters, each carrying `source`, plus every source path read -> files.

    output_format: "parquet" or "jsonl". logprobs: the completion rows carry `logprobs`, and the files get them;
    samples: they carry `sample`. schema and kind: another job's output rows and directory (the scoring job's
    scores), instead of completions.
    """

    def __init__(self, output_dir: str, output_format: str = "parquet", logprobs: bool = False,
                 samples: bool = False, schema: pa.Schema | None = None, kind: str = "completions"):
        super().__init__()
        if output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}")
        self.output_dir, self.output_format, self.logprobs = output_dir, output_format, logprobs
        self.schema, self.kind = schema or completions_schema(logprobs, samples), kind

    def expand(self, inputs):
        completions, errors, sources = inputs
        return ({"completions": completions | "KeyCompletions" >> beam.ParDo(_KeyBySource()),
                 "errors": errors | "KeyErrors" >> beam.ParDo(_KeyBySource()),
                 "sources": sources | "KeySources" >> beam.Map(lambda s: (s, s))}
                | "GroupBySource" >> beam.CoGroupByKey()
                | "WriteShard" >> beam.ParDo(WriteShard(self.output_dir, self.output_format, self.logprobs,
                                                        self.schema, self.kind)))
