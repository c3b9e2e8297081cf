"""Read prompt rows from Parquet shards (local or gs://, through Beam's filesystems), one row group at a time.

Files are listed first, then each row group is a separate element after a Reshuffle, so one large shard is
read by many workers in parallel and no worker holds more than one row group's batch of rows at a time.
"""
from __future__ import annotations

import logging
import posixpath

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from gpt2.sampling import FIELDS
from transforms.records import ERRORS, PromptRow, dead_letter

OVERRIDE_COLUMNS = FIELDS  # per-row columns named after a sampling field override the run's value where not null
READ_BATCH_ROWS = 1024  # rows decoded at once within a row group


def shard_name(path: str) -> str:
    """The output file stem for an input shard: its file name without .parquet."""
    name = posixpath.basename(path)
    return name[:-len(".parquet")] if name.endswith(".parquet") else name


def unreadable_id(path: str) -> str:
    """The id of the one dead letter that stands for a whole shard that could not be read."""
    return f"{shard_name(path)}:*"


def open_parquet(path: str) -> pq.ParquetFile:
    # Pages written with checksums are verified: a corrupt page is an error, not silently wrong prompts.
    return pq.ParquetFile(FileSystems.open(path, compression_type="uncompressed"), page_checksum_verification=True)


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


class ListRowGroups(beam.DoFn):
    """path -> (path, row group, first row index) for every row group; an unreadable file is a dead letter."""

    def __init__(self, prompt_column: str):
        self.prompt_column = prompt_column

    def process(self, path: str):
        try:
            pf = open_parquet(path)
            if self.prompt_column not in pf.schema_arrow.names:
                raise ValueError(f"no prompt column {self.prompt_column!r} (columns: {pf.schema_arrow.names}; "
                                 f"see --prompt_column)")
            offset = 0
            for rg in range(pf.metadata.num_row_groups):
                yield path, rg, offset
                offset += pf.metadata.row_group(rg).num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable shard is reported, the others go on
            logging.error("cannot read %s: %s", path, e)
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                unreadable_id(path), None, f"unreadable shard {path}: {e}", path))


class ReadRowGroup(beam.DoFn):
    def __init__(self, prompt_column: str, id_column: str):
        self.prompt_column, self.id_column = prompt_column, id_column

    def process(self, element):
        path, rg, offset = element
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        has_id = self.id_column in names
        overrides = [c for c in OVERRIDE_COLUMNS if c in names]
        columns = [self.prompt_column] + ([self.id_column] if has_id else []) + overrides
        row = offset
        try:
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[rg], columns=columns):
                data = {name: column_values(col) for name, col in zip(batch.schema.names, batch.columns)}
                for i, prompt in enumerate(data[self.prompt_column]):
                    rid = data[self.id_column][i] if has_id else None
                    rid = f"{shard_name(path)}:{row}" if rid is None else str(rid)
                    yield PromptRow(rid, prompt, {c: data[c][i] for c in overrides}, path, row)
                    row += 1
        except Exception as e:  # noqa: BLE001 - a corrupt row group: each of its unread rows is a dead letter
            end = offset + pf.metadata.row_group(rg).num_rows
            logging.error("cannot read rows %d..%d of %s (row group %d): %s", row, end - 1, path, rg, e)
            for r in range(row, end):  # one per row, so that rows read == written + dead-lettered still holds
                yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                    f"{shard_name(path)}:{r}", None,
                    f"row {r} of {path}: unreadable (row group {rg}, rows {row}..{end - 1}): {e}", path, r))


class ReadPrompts(beam.PTransform):
    """Input file paths -> PromptRow, with dead letters under ERRORS."""

    def __init__(self, prompt_column: str = "prompt", id_column: str = "id"):
        super().__init__()
        self.prompt_column, self.id_column = prompt_column, id_column

    def expand(self, paths):
        groups = paths | "ListRowGroups" >> beam.ParDo(ListRowGroups(self.prompt_column)).with_outputs(
            ERRORS, main="row_groups")
        rows = (groups.row_groups
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroup" >> beam.ParDo(ReadRowGroup(self.prompt_column, self.id_column)).with_outputs(
                    ERRORS, main="rows"))
        errors = (groups[ERRORS], rows[ERRORS]) | "ReadErrors" >> beam.Flatten()
        return {"rows": rows.rows, ERRORS: errors}
