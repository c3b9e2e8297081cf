"""Read prompt rows from Parquet or JSON Lines shards (local or gs://, through Beam's filesystems).

Files are listed first, then each Parquet row group is a separate element after a Reshuffle, so one large shard is
read by many workers in parallel and no worker holds more than one row group's batch of rows at a time. A JSON Lines
shard (a name ending in .jsonl; transforms/jsonl.py) is one element, read a line at a time by one worker.
"""
from __future__ import annotations

import logging
import posixpath
from typing import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import jsonl
from transforms.records import ERRORS, ROW_OPTIONS, PromptRow, dead_letter, is_jsonl, position

log = logging.getLogger(__name__)
# Per-row columns named after a sampling field (or num_samples) override the run's value where not null.
OVERRIDE_COLUMNS = ROW_OPTIONS
READ_BATCH_ROWS = 1024  # rows decoded at once within a row group


def shard_name(path: str) -> str:
    """The output file stem for an input shard: its file name without .parquet or .jsonl."""
    name = posixpath.basename(path)
    for suffix in (".parquet", ".jsonl"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def unreadable_id(path: str) -> str:
    """The id of the one dead letter that stands for a whole shard that could not be read."""
    return f"{shard_name(path)}:*"


def open_parquet(path: str) -> pq.ParquetFile:
    # Pages written with checksums are verified: a corrupt page is an error, not silently wrong prompts.
    return pq.ParquetFile(FileSystems.open(path, compression_type="uncompressed"), page_checksum_verification=True)


def open_binary(path: str):
    return FileSystems.open(path, compression_type="uncompressed")


def count_rows(path: str) -> int:
    """Rows in a shard: a Parquet file's metadata, a JSON Lines file's lines that are not blank (read through)."""
    if is_jsonl(path):
        with open_binary(path) as f:
            return jsonl.count_rows(f)
    return open_parquet(path).metadata.num_rows


def has_column(path: str, column: str) -> bool:
    """Whether a shard has the column (a Parquet file's schema) or key (some line of a JSON Lines file); False if
    it cannot be read (the pipeline dead-letters it)."""
    try:
        if is_jsonl(path):
            with open_binary(path) as f:
                return jsonl.has_key(f, column)
        return column in open_parquet(path).schema_arrow.names
    except Exception:  # noqa: BLE001 - any unreadable shard
        return False


def column_values(column: pa.Array) -> list:
    """A column as Python values; a string that is not valid UTF-8 comes back as its raw bytes, so that only
    its own row is rejected (by validation) rather than the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        return [_decode(b) for b in column.view(binary).to_pylist()]


def _decode(raw: bytes | None) -> str | bytes | None:
    try:
        return raw if raw is None else raw.decode()
    except UnicodeDecodeError:
        return raw


def missing_column(column: str, names: list[str], options: dict) -> str:
    """"no prompt column 'p' (columns: [...]; see --prompt_column)": a required column not found."""
    option = options.get(column, "--prompt_column")
    role = option.removeprefix("--").removesuffix("_column")
    return f"no {role} column {column!r} (columns: {names}; see {option})"


class ListRowGroups(beam.DoFn):
    """path -> (path, row group, first row index) for every row group of a Parquet file, (path, None, 0) for a JSON
    Lines file; an unreadable Parquet file, or one without a required column, is a dead letter. options: the
    command-line option naming each required column (column -> "--x_column"), for the message. With a
    messages_column, a file needs the prompt column or that one (chat rows), or both."""

    def __init__(self, prompt_column: str, extra_columns: tuple[str, ...] = (), options: dict | None = None,
                 messages_column: str | None = None):
        self.prompt_column, self.extra_columns = prompt_column, tuple(extra_columns)
        self.options = options or {prompt_column: "--prompt_column"}
        self.messages_column = messages_column

    def process(self, path: str):
        yield from ([(path, None, 0)] if is_jsonl(path) else self.row_groups(path))

    def row_groups(self, path: str):
        try:
            pf = open_parquet(path)
            names = pf.schema_arrow.names
            if self.prompt_column not in names and self.messages_column not in names:
                error = missing_column(self.prompt_column, names, self.options)
                if self.messages_column is not None:
                    error += f" and no messages column {self.messages_column!r} (see --messages_column)"
                raise ValueError(error)
            for column in self.extra_columns:
                if column not in names:
                    raise ValueError(missing_column(column, names, self.options))
            offset = 0
            for rg in range(pf.metadata.num_row_groups):
                yield path, rg, offset
                offset += pf.metadata.row_group(rg).num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable shard is reported, the others go on
            log.error("cannot read %s: %s", path, e)
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                unreadable_id(path), None, f"unreadable shard {path}: {e}", path))


class ReadRowGroup(beam.DoFn):
    """(path, row group, first row index) -> PromptRow for each row, dead letters under ERRORS; (path, None, 0): the
    rows of a JSON Lines file. extra_columns: required columns kept in each row's `extra` under their names;
    overrides: the optional per-row columns read into its `overrides`; messages_column: read into a chat row's
    `messages` where the file has it (a row may then have no prompt)."""

    def __init__(self, prompt_column: str, id_column: str, extra_columns: tuple[str, ...] = (),
                 overrides: tuple[str, ...] = OVERRIDE_COLUMNS, options: dict | None = None,
                 messages_column: str | None = None):
        self.prompt_column, self.id_column = prompt_column, id_column
        self.extra_columns, self.overrides, self.options = tuple(extra_columns), tuple(overrides), options
        self.messages_column = messages_column

    def process(self, element):
        path, rg, offset = element
        yield from (self.read_jsonl(path) if rg is None else self.read_row_group(path, rg, offset))

    def read_row_group(self, path: str, rg: int, offset: int) -> Iterator:
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        has_id = self.id_column in names
        overrides = [c for c in self.overrides if c in names]
        texts = [c for c in (self.prompt_column, self.messages_column) if c in names]  # one of them, or both
        columns = texts + ([self.id_column] if has_id else []) + list(self.extra_columns) + overrides
        row = offset
        try:
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[rg], columns=columns):
                data = {name: column_values(col) for name, col in zip(batch.schema.names, batch.columns)}
                nulls = [None] * batch.num_rows
                prompts, chats = data.get(self.prompt_column, nulls), data.get(self.messages_column, nulls)
                for i, prompt in enumerate(prompts):
                    rid = data[self.id_column][i] if has_id else None
                    rid = f"{shard_name(path)}:{row}" if rid is None else str(rid)
                    yield PromptRow(rid, prompt, {c: data[c][i] for c in overrides}, path, row,
                                    {c: data[c][i] for c in self.extra_columns}, chats[i])
                    row += 1
        except Exception as e:  # noqa: BLE001 - a corrupt row group: each of its unread rows is a dead letter
            end = offset + pf.metadata.row_group(rg).num_rows
            log.error("cannot read rows %d..%d of %s (row group %d): %s", row, end - 1, path, rg, e)
            for r in range(row, end):  # one per row, so that rows read == written + dead-lettered still holds
                yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                    f"{shard_name(path)}:{r}", None,
                    f"{position(path, r)}: unreadable (row group {rg}, rows {row}..{end - 1}): {e}", path, r))

    def read_jsonl(self, path: str) -> Iterator:
        """Every line that is not blank: a PromptRow, or a dead letter. A file that cannot be opened is one dead
        letter; a read that fails midway raises, for the runner to retry the element (lines cannot be counted
        past a failed read)."""
        try:
            f = open_binary(path)
        except Exception as e:  # noqa: BLE001 - any unopenable shard is reported, the others go on
            log.error("cannot read %s: %s", path, e)
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                unreadable_id(path), None, f"unreadable shard {path}: {e}", path))
            return
        with f:
            for row in jsonl.read_rows(f, path, shard_name(path), self.prompt_column, self.id_column,
                                       extra_columns=self.extra_columns, overrides=self.overrides,
                                       options=self.options, messages_column=self.messages_column):
                yield row if isinstance(row, PromptRow) else beam.pvalue.TaggedOutput(ERRORS, row)


class ReadPrompts(beam.PTransform):
    """Input file paths (Parquet, or JSON Lines by a .jsonl name) -> PromptRow, with dead letters under ERRORS.

    prompt_column: read as each row's `prompt` (the scoring job: its text, or its prompt); extra_columns: further
    required columns, in each row's `extra` under their names; overrides: optional per-row columns (default: the
    sampling fields and num_samples); options: the option naming each required column, for error messages;
    messages_column (the generation job): a chat row's messages, in a file's column (Parquet list<struct<role,
    content>>) or a line's key (a JSON array of objects), read into each row's `messages`.
    """

    def __init__(self, prompt_column: str = "prompt", id_column: str = "id", extra_columns: tuple[str, ...] = (),
                 overrides: tuple[str, ...] = OVERRIDE_COLUMNS, options: dict | None = None,
                 messages_column: str | None = None):
        super().__init__()
        self.prompt_column, self.id_column = prompt_column, id_column
        self.extra_columns, self.overrides = tuple(extra_columns), tuple(overrides)
        self.options = options or {prompt_column: "--prompt_column"}
        self.messages_column = messages_column

    def expand(self, paths):
        groups = paths | "ListRowGroups" >> beam.ParDo(ListRowGroups(
            self.prompt_column, self.extra_columns, self.options, self.messages_column)).with_outputs(
            ERRORS, main="row_groups")
        rows = (groups.row_groups
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroup" >> beam.ParDo(ReadRowGroup(
                    self.prompt_column, self.id_column, self.extra_columns, self.overrides, self.options,
                    self.messages_column))
                .with_outputs(ERRORS, main="rows"))
        errors = (groups[ERRORS], rows[ERRORS]) | "ReadErrors" >> beam.Flatten()
        return {"rows": rows.rows, ERRORS: errors}
