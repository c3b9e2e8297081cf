"""Ids are the key users join completions on, so within a run each id is generated once.

Rows are grouped by id; the first occurrence, by (source file, row index), goes on and every other one is a dead
letter naming the row kept. The order is that of the input files, never of arrival: the same row is kept whatever
the batching, workers or runner. The GroupByKey costs little next to generation.
"""
from __future__ import annotations

import apache_beam as beam

from transforms.records import ERRORS, PromptRow, dead_letter


def split_duplicates(rows: list[PromptRow]) -> tuple[PromptRow, list[dict]]:
    """Rows sharing one id -> (the row kept, dead letters for the others)."""
    first, *others = sorted(rows, key=lambda r: (r.source, r.row_index))
    return first, [dead_letter(r.id, r.prompt, f"row {r.row_index} of {r.source}: duplicate id {r.id!r}: also at "
                               f"row {first.row_index} of {first.source}, which is the row kept", r.source,
                               r.row_index)
                   for r in others]


class _KeepFirst(beam.DoFn):
    def process(self, element):
        _, rows = element
        first, duplicates = split_duplicates(list(rows))
        yield first
        for d in duplicates:
            yield beam.pvalue.TaggedOutput(ERRORS, d)


class UniqueIds(beam.PTransform):
    """PromptRow -> PromptRow with ids unique within the run (main output "rows"); duplicates under ERRORS."""

    def expand(self, rows):
        return (rows
                | "KeyById" >> beam.Map(lambda r: (r.id, r))
                | "GroupById" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(ERRORS, main="rows"))
