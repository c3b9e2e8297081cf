"""Length-aware batching: a batch holds prompts of similar token length, so little compute goes to padding.

Requests are keyed by (length bucket, shard), grouped, sorted by length within each group and cut into batches
bounded by `batch_size` rows and `max_batch_tokens` (rows x (longest prompt + largest max_new_tokens)).
Beam's `BatchElements` batches in arrival order, which mixes short and long prompts; GroupByKey on a bucket
key is what brings similar lengths together wherever they sit in the input. The shard part of the key (a hash
of the row id) keeps any one bucket from landing on a single worker.
"""
from __future__ import annotations

import zlib

import apache_beam as beam

from transforms.records import Request


def length_bucket(n: int) -> int:
    """Buckets about 1/8 of their length wide (8 tokens at least): padding within a bucket stays small."""
    width = max(8, 1 << max(0, n.bit_length() - 3))
    return n // width * width


def cut_batches(requests: list[Request], batch_size: int, max_batch_tokens: int) -> list[list[Request]]:
    """Sorted by length, cut greedily; a batch's cost is rows x (longest prompt + largest max_new_tokens)."""
    batches, batch, max_new = [], [], 0
    for r in sorted(requests, key=lambda r: (len(r.token_ids), r.id)):
        grown_new = max(max_new, r.params.max_new_tokens)
        if batch and (len(batch) >= batch_size or
                      (len(batch) + 1) * (len(r.token_ids) + grown_new) > max_batch_tokens):
            batches.append(batch)
            batch, grown_new = [], r.params.max_new_tokens
        batch.append(r)
        max_new = grown_new
    if batch:
        batches.append(batch)
    return batches


class BatchByLength(beam.PTransform):
    """Request -> list[Request]."""

    def __init__(self, batch_size: int, max_batch_tokens: int, shards: int = 16):
        super().__init__()
        self.batch_size, self.max_batch_tokens, self.shards = batch_size, max_batch_tokens, shards

    def expand(self, requests):
        shards = self.shards
        return (requests
                | "KeyByLength" >> beam.Map(
                    lambda r: ((length_bucket(len(r.token_ids)), zlib.crc32(r.id.encode()) % shards), r))
                | "GroupByLength" >> beam.GroupByKey()
                | "CutBatches" >> beam.FlatMap(
                    lambda kv, b, t: cut_batches(list(kv[1]), b, t), self.batch_size, self.max_batch_tokens)
                | "SpreadBatches" >> beam.Reshuffle())
