"""Write one completions file and one errors file per input shard, named after it, all-or-nothing.

DIR/completions/<shard>.parquet and DIR/errors/<shard>.parquet, rows in input order. Each file is written under
a temporary name in DIR/.tmp/ and renamed into place when complete, errors first: a completions file that exists
is a shard that is done (what --skip_existing relies on), and a run killed midway leaves no partial final file.
A shard that could not be read gets its errors file only: it is not done.
"""
from __future__ import annotations

import io
import posixpath
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.read import shard_name, unreadable_id

COMPLETIONS_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("completion_token_ids", pa.list_(pa.int32())), ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()), ("finish_reason", pa.string()), ("model", pa.string()),
    ("precision", pa.string()),
])
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("error", pa.string()),
                           ("source", pa.string())])


def completions_path(output_dir: str, source: str) -> str:
    return FileSystems.join(output_dir, "completions", shard_name(source) + ".parquet")


def errors_path(output_dir: str, source: str) -> str:
    return FileSystems.join(output_dir, "errors", shard_name(source) + ".parquet")


def write_table(rows: list[dict], schema: pa.Schema, path: str, tmp_dir: str) -> None:
    """Parquet to a temporary file, then renamed to `path`: readers never see a partial file."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    tmp = FileSystems.join(tmp_dir, f"{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with FileSystems.create(tmp) as f:
        f.write(buf.getvalue())
    if FileSystems.exists(path):  # a re-run replaces the old file
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


class WriteShard(beam.DoFn):
    """(source, {"completions": [...], "errors": [...], "sources": [...]}) -> written file paths."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.written = Metrics.counter("gpt2", "rows_written")
        self.dead = Metrics.counter("gpt2", "rows_dead_lettered")

    def process(self, element):
        source, groups = element
        tmp_dir = FileSystems.join(self.output_dir, ".tmp")
        order = lambda r: (r["row_index"], r["id"])  # noqa: E731 - input order
        errors = sorted(groups["errors"], key=order)
        completions = sorted(groups["completions"], key=order)
        write_table(errors, ERRORS_SCHEMA, errors_path(self.output_dir, source), tmp_dir)
        done = completions_path(self.output_dir, source)
        if any(e["id"] == unreadable_id(source) for e in errors):
            # Not done: no completions file, so that --skip_existing tries the shard again next run.
            if FileSystems.exists(done):
                FileSystems.delete([done])
        else:
            write_table(completions, COMPLETIONS_SCHEMA, done, tmp_dir)
        self.dead.inc(len(errors))
        self.written.inc(len(completions))
        yield source


class WriteResults(beam.PTransform):
    """Completion rows and dead letters, each carrying `source`, plus every source path read -> files."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def expand(self, inputs):
        completions, errors, sources = inputs
        by_source = lambda r: (r["source"], r)  # noqa: E731
        return ({"completions": completions | "KeyCompletions" >> beam.Map(by_source),
                 "errors": errors | "KeyErrors" >> beam.Map(by_source),
                 "sources": sources | "KeySources" >> beam.Map(lambda s: (s, s))}
                | "GroupBySource" >> beam.CoGroupByKey()
                | "WriteShard" >> beam.ParDo(WriteShard(self.output_dir)))
