"""Generate completions for batches of requests with the frozen GPT-2 graph.

A DoFn rather than RunInference's ModelHandler: RunInference batches with BatchElements (arrival order, and
Beam 2.77's ModelHandler rejects max_batch_weight), while we batch by length upstream, and a failing batch
must be split and retried down to single rows so that one bad row costs only itself (dead letter) and never
the batch. The model interface is the same idea as RunInference's: load once (`GenerationModel(model_dir)`,
through `Shared`, one per worker process whatever its threads), then `generate(batch)`.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import ERRORS, Request, Result, dead_letter
from transforms.resources import shared_model

PROGRESS_SECONDS = 10.0


class _Progress:
    """Rows and tokens done by this worker process, logged every PROGRESS_SECONDS."""
    lock = threading.Lock()
    start = last = time.monotonic()
    rows = tokens = 0

    @classmethod
    def add(cls, rows: int, tokens: int) -> None:
        with cls.lock:
            cls.rows += rows
            cls.tokens += tokens
            now = time.monotonic()
            if now - cls.last >= PROGRESS_SECONDS:
                cls.last = now
                logging.info("worker %d: %d rows, %d tokens, %.1f tokens/s", os.getpid(), cls.rows, cls.tokens,
                             cls.tokens / max(now - cls.start, 1e-9))


class GenerateBatches(beam.DoFn):
    """list[Request] -> Result per row; rows that fail alone go to ERRORS."""

    def __init__(self, model_dir: str, precision: str = "auto", intra_threads: int | None = None):
        self.model = shared_model(model_dir, precision, intra_threads)
        self.prompts = Metrics.counter("gpt2", "prompts")
        self.generated = Metrics.counter("gpt2", "generated_tokens")
        self.padding = Metrics.counter("gpt2", "padding_tokens")
        self.rejected = Metrics.counter("gpt2", "dead_letters")
        self.batch_size = Metrics.distribution("gpt2", "batch_size")
        self.latency = Metrics.distribution("gpt2", "batch_latency_ms")

    def setup(self):
        self._model = self.model.get()

    def teardown(self):
        self._model = None  # the last reference going closes the model's Session (GenerationModel's finalizer)

    def process(self, batch: list[Request]):
        yield from self._generate(batch)

    def _generate(self, batch: list[Request]):
        start = time.perf_counter()
        try:
            completions = self._model.generate([r.token_ids for r in batch], [r.params for r in batch])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: halve the batch and try again
            if len(batch) > 1:
                logging.warning("batch of %d failed (%s); retrying in halves", len(batch), e)
                half = len(batch) // 2
                yield from self._generate(batch[:half])
                yield from self._generate(batch[half:])
                return
            r = batch[0]
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                r.id, r.prompt, f"row {r.row_index} of {r.source}: generation failed: {type(e).__name__}: {e}",
                r.source, r.row_index))
            return
        self.latency.update(int((time.perf_counter() - start) * 1000))
        self.batch_size.update(len(batch))
        self.prompts.inc(len(batch))
        longest = max(len(r.token_ids) for r in batch)
        self.padding.inc(sum(longest - len(r.token_ids) for r in batch))
        tokens = sum(len(c.token_ids) for c in completions)
        self.generated.inc(tokens)
        _Progress.add(len(batch), tokens)
        for r, c in zip(batch, completions):
            yield Result(r, c.token_ids, c.finish_reason, self._model.precision)
