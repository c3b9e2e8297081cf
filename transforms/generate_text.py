"""GenerateText: GPT-2 completions for a PCollection of dict rows, from any source to any sink.

    result = rows | GenerateText("models/gpt2", max_new_tokens=32, stop=["\\n\\n"])
    result.completions  # dicts: id, prompt, completion, completion_token_ids, prompt_tokens, completion_tokens,
                        #        finish_reason, model, precision + the input row's other keys
                        #        (logprobs=True: `logprobs` after completion_token_ids, one per token)
    result.errors       # dicts: id, prompt, error + the input row's other keys

An input row is a dict with `id` (any value; a row's seed derives from the run seed and str(id)), `prompt` (text)
or, a chat row, `messages` (a list of {role, content}: rendered with the model's chat template and the generation
prompt, as transformers' apply_chat_template does; its completion's `prompt` is the rendered text), optionally a value per sampling field (max_new_tokens, temperature, top_k, top_p, seed, ignore_eos: None = the
default) and `num_samples`, and anything else, passed through to its output row untouched (where a key is named
like an output field, the output field wins). Every input row comes out exactly once as an error with its reason,
or as its completions: num_samples of them (default 1), each with `sample` (0..num_samples-1, after `id`) when
num_samples is given to the transform or set by the row. Sample k's seed derives from the row's seed and k alone
(sample 0's is the row's seed), so a sample is the same alone, in any batch, and with any num_samples.

The model directory supplies the model's name (`model`), its context size and its tokenizer: they are read from its
manifest when the transform is built. Ids need not be unique: deduplication is the job's (transforms/job.py,
UniqueIds), not this transform's, because on a stream it would hold every id ever seen; rows with the same id and
prompt get the same completion (`beam.Deduplicate` drops repeats when you want that).

Generation is a task of the batch skeleton (transforms/work.py): bounded input is cut into runs over the whole input
(transforms/batching.py); unbounded input (a streaming pipeline, or streaming=True) by size or by a maximum wait,
never waiting for the input to end.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import apache_beam as beam

from lmgraph.sampling import sampling_params
from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
from transforms.generate import PART_SECONDS, GenerateBatches, Generation
from transforms.model_cache import model_identity
from transforms.work import Batching, BatchWork


class GenerateTextResult(NamedTuple):
    completions: beam.PCollection
    errors: beam.PCollection


class GenerateText(BatchWork):
    """PCollection of dict rows -> GenerateTextResult(completions, errors).

    model_dir: a directory written by `python -m pipeline.export`, local or gs:// (each worker machine copies it
      once). Keyword arguments named after a sampling field (max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
      ignore_eos=False) are the defaults of rows that do not set them.
    seed: the run seed; a row's seed is derived from it and the row's id (unless the row has its own `seed`), so its
      completion never depends on batching, workers or runner.
    stop: stop strings; a row ends as soon as its text holds one, and its completion is cut before the first one
      found (finish_reason "stop").
    num_samples: completions per row (a row's `num_samples` overrides it); given (even 1), every completion
      carries `sample`. None: 1, and only the completions of rows that set num_samples carry `sample`.
    logprobs: add `logprobs` to each completion: the model's log-probability of each of its tokens (full softmax,
      before temperature, top-k and top-p), cut with the tokens when a stop string cuts the completion.
    truncate: "none" (a prompt too long for the context is an error) or "left" (keep its end).
    batch_size, max_batch_tokens: rows decoded at once (the slots of continuous batching; a row that ends frees
      its slot for the next), at most so many that slots x (longest prompt + max_new_tokens) <= max_batch_tokens
      (default: by the model's size, transforms.batching.max_batch_tokens_for).
    run_seconds: how long one Session.run (a part of a run) goes on before its rows done and tokens are counted
      and the next part goes on where it stopped.
    streaming: None = decide by the input (unbounded: batch by size or max_wait_secs); True or False to force.
    max_wait_secs: on unbounded input, how long a row may wait for its batch to fill.
    precision, intra_op_threads: what the workers run the graph in (auto = the device's fastest) and on how many
      cores (default: all a worker process may run on; on a CPU a batch runs as that many parts side by side).
    model_label, n_ctx: the model's label and context size when the caller has them already (the job reads
      the manifest once before it starts); by default read from model_dir's manifest.
    clock: for tests (seconds, as time.time): the clock of the maximum wait.
    """
    result_type = GenerateTextResult

    def __init__(self, model_dir: str, *, stop: list[str] | tuple[str, ...] = (), truncate: str = "none",
                 seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int | None = None, run_seconds: float = PART_SECONDS,
                 streaming: bool | None = None, max_wait_secs: float = 1.0, precision: str = "auto",
                 intra_op_threads: int | None = None,
                 model_label: str | None = None, n_ctx: int | None = None, logprobs: bool = False,
                 num_samples: int | None = None, clock: Callable[[], float] = time.time, **sampling):
        generation = Generation(batch_size, DEFAULT_MAX_BATCH_TOKENS, stop, bool(logprobs), run_seconds,
                                sampling_params(**sampling), seed, num_samples, truncate=truncate)
        batching = Batching(batch_size, DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens,
                            streaming, max_wait_secs, clock)  # the arguments checked before the manifest is read
        info = model_identity(model_dir, model_label, n_ctx, max_batch_tokens)
        self.model_label, self.n_ctx = info.label, info.n_ctx
        super().__init__(GenerateBatches(model_dir, precision, intra_op_threads, task=dataclasses.replace(
            generation, max_batch_tokens=info.max_batch_tokens, n_ctx=info.n_ctx, model_label=info.label)),
            dataclasses.replace(batching, max_batch_tokens=info.max_batch_tokens), model_dir)
