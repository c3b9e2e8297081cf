"""Length-aware batching: a batch holds prompts of similar token length, so little compute goes to padding.

Requests are keyed by a length bucket about 1/16 to 1/32 of their length wide, grouped, and each group is cut
into batches bounded by `batch_size` rows and `max_batch_tokens` (rows x (longest prompt + largest
max_new_tokens)) while it streams by: no sort, so a bucket of millions of rows needs no memory beyond one batch.
Beam's `BatchElements` batches in arrival order, which mixes short and long prompts; a GroupByKey on the bucket
is what brings similar lengths together wherever they sit in the input. The Reshuffle after it spreads the
batches over all workers.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import apache_beam as beam

from transforms.records import Request


def length_bucket(n: int) -> int:
    width = max(4, 1 << max(0, n.bit_length() - 5))  # 4 tokens up to 127, then n/32 .. n/16
    return n // width * width


def cut_batches(requests: Iterable[Request], batch_size: int, max_batch_tokens: int) -> Iterator[list[Request]]:
    """Consecutive batches; a batch's cost is rows x (longest prompt + largest max_new_tokens)."""
    batch, longest, max_new = [], 0, 0
    for r in requests:
        grown = max(longest, len(r.token_ids)), max(max_new, r.params.max_new_tokens)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * (grown[0] + grown[1]) > max_batch_tokens):
            yield batch
            batch, grown = [], (len(r.token_ids), r.params.max_new_tokens)
        batch.append(r)
        longest, max_new = grown
    if batch:
        yield batch


class BatchByLength(beam.PTransform):
    """Request -> list[Request]."""

    def __init__(self, batch_size: int, max_batch_tokens: int):
        super().__init__()
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens

    def expand(self, requests):
        return (requests
                | "KeyByLength" >> beam.Map(lambda r: (length_bucket(len(r.token_ids)), r))
                | "GroupByLength" >> beam.GroupByKey()
                | "CutBatches" >> beam.FlatMap(
                    lambda kv, size, tokens: cut_batches(kv[1], size, tokens), self.batch_size, self.max_batch_tokens)
                | "SpreadBatches" >> beam.Reshuffle())
