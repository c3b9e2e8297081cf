"""Ids are the key users join completions on, so within a run each id is generated once, and with --skip_existing an
id that already has an output row is not generated again.

Rows are grouped by id; the first occurrence, by (source file, row index), goes on and every other one is a dead
letter naming the row kept. The order is that of the input files, never of arrival: the same row is kept whatever
the batching, workers or runner. The GroupByKey costs little next to generation.

Given the ids already done (read from earlier runs' output files), the grouping is a CoGroupByKey of the rows with
those ids: an id found there has all its rows skipped (counted in gpt2/rows_skipped_existing, not written again),
without any one worker holding the set of done ids.
"""
from __future__ import annotations

import apache_beam as beam

from transforms.progress import ROWS_SKIPPED, Counter
from transforms.records import ERRORS, PromptRow, dead_letter, position


def split_duplicates(rows: list[PromptRow]) -> tuple[PromptRow, list[dict]]:
    """Rows sharing one id -> (the row kept, dead letters for the others)."""
    first, *others = sorted(rows, key=lambda r: (r.source, r.row_index))
    return first, [dead_letter(r.id, r.given(), f"{position(r.source, r.row_index)}: duplicate id {r.id!r}: also at "
                               f"{position(first.source, first.row_index)}, which is the row kept", r.source,
                               r.row_index)
                   for r in others]


class _KeepFirst(beam.DoFn):
    """(id, rows, done) -> the first row unless the id is done; the others as dead letters; done ids' rows counted."""

    def __init__(self):
        self.skipped = Counter(ROWS_SKIPPED)

    def process(self, element):
        _, rows, done = element
        rows = list(rows)  # none: an id done earlier that this run's input does not have
        if rows and done:
            self.skipped.inc(len(rows))
        elif rows:
            first, duplicates = split_duplicates(rows)
            yield first
            for d in duplicates:
                yield beam.pvalue.TaggedOutput(ERRORS, d)


class UniqueIds(beam.PTransform):
    """PromptRow -> PromptRow with ids unique within the run (main output "rows"); duplicates under ERRORS.

    done_ids: optionally, a PCollection of ids that already have an output row; their rows are skipped.
    """

    def __init__(self, done_ids=None):
        super().__init__()
        self.done_ids = done_ids

    def expand(self, rows):
        keyed = rows | "KeyById" >> beam.Map(lambda r: (r.id, r))
        if self.done_ids is None:
            grouped = (keyed | "GroupById" >> beam.GroupByKey()
                       | "NoneDone" >> beam.MapTuple(lambda rid, group: (rid, group, False)))
        else:
            done = self.done_ids | "KeyDoneIds" >> beam.Map(lambda rid: (rid, None))
            grouped = ({"rows": keyed, "done": done} | "GroupByIdWithDone" >> beam.CoGroupByKey()
                       | "Done" >> beam.MapTuple(lambda rid, g: (rid, g["rows"], any(True for _ in g["done"]))))
        return grouped | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(ERRORS, main="rows")
