"""Validate rows and tokenize prompts; anything unusable goes to the dead-letter output with a reason.

The checks are plain functions, shared by the DoFns here and by `GPT2ModelHandler`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from gpt2.sampling import FIELDS, SamplingParams, coerce
from transforms.records import ERRORS, PromptRow, Request, dead_letter, row_dead_letter
from transforms.resources import SharedResource, shared_tokenizer

ROW_KEYS = ("id", "prompt")  # besides the sampling fields, the keys a dict row's generation reads


def row_seed(run_seed: int, row_id) -> int:
    """A row's seed from the run seed and its id alone: the same wherever and with whatever it is batched."""
    digest = hashlib.sha256(f"{run_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def resolve_params(overrides: dict, defaults: SamplingParams, run_seed: int, row_id) -> SamplingParams:
    """Apply a row's overrides (sampling field -> value, None = the default) to the run's defaults, with the row's
    seed derived from the run seed and its id unless it has one of its own; raise ValueError naming the bad one."""
    values = {**dataclasses.asdict(defaults), "seed": row_seed(run_seed, row_id)}
    for name, value in overrides.items():
        if value is not None:
            values[name] = coerce(name, value)
    params = SamplingParams(**values)
    params.validate()  # its message names the field: "top_p must be in (0, 1], got 1.5"
    return params


def prompt_error(prompt) -> str | None:
    """What makes a prompt value unusable, or None."""
    if prompt is None:
        return "prompt is null"
    if isinstance(prompt, bytes):  # a string column's value that is not UTF-8 (see read.column_values)
        return "prompt is not valid UTF-8 text"
    if not isinstance(prompt, str):
        return f"prompt is not a string but {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt is empty" if not prompt else "prompt is only whitespace"
    return None


def fit_context(ids: list[int], max_new_tokens: int, n_ctx: int, truncate: str) -> tuple[list[int], str | None]:
    """(prompt ids, None) if they fit the context with max_new_tokens after them (with truncate == "left", the
    prompt's last tokens that do), else (ids, why not)."""
    room = n_ctx - max_new_tokens
    if room < 1:
        return ids, f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {n_ctx}-token context"
    if len(ids) > room:
        if truncate == "left":
            return ids[-room:], None
        return ids, (f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model context of {n_ctx} "
                     f"(use --truncate left, or truncate='left' in GenerateText, to keep the prompt's end)")
    return ids, None


def to_prompt_row(element) -> PromptRow:
    """A dict row (id, prompt, sampling overrides, anything else passed through) as a PromptRow; a PromptRow (what
    the job's reader emits) as it is. Raise ValueError for anything else."""
    if isinstance(element, PromptRow):
        return element
    if not isinstance(element, Mapping):
        raise ValueError(f"a row must be a dict with id and prompt, not {type(element).__name__}")
    overrides = {k: element[k] for k in FIELDS if k in element}
    extra = {k: v for k, v in element.items() if k not in ROW_KEYS and k not in overrides}
    return PromptRow(element.get("id"), element.get("prompt"), overrides, extra=extra)


class ValidateRows(beam.DoFn):
    """PromptRow or dict row -> (PromptRow, SamplingParams) for a usable prompt and parameters; else a dead letter."""

    def __init__(self, defaults: SamplingParams, run_seed: int):
        self.defaults, self.run_seed = defaults, run_seed
        self.rejected = Metrics.counter("gpt2", "dead_letters")

    def process(self, element):
        try:
            row = to_prompt_row(element)
        except ValueError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(None, None, str(e), None))
            return
        error = "id is null" if row.id is None else prompt_error(row.prompt)
        if error is None:
            try:
                yield row, resolve_params(row.overrides, self.defaults, self.run_seed, row.id)
                return
            except ValueError as e:
                error = str(e)
        self.rejected.inc()
        yield beam.pvalue.TaggedOutput(ERRORS, row_dead_letter(row, error))


class Tokenize(beam.DoFn):
    """(PromptRow, SamplingParams) -> Request; prompts that do not fit the context are dead letters
    unless truncate == 'left', which keeps the prompt's last tokens."""

    def __init__(self, model_dir: str, n_ctx: int, truncate: str = "none", tokenizer: SharedResource | None = None):
        self.tokenizer = tokenizer or shared_tokenizer(model_dir)  # one handle shared with Detokenize: one load
        self.n_ctx, self.truncate = n_ctx, truncate
        self.rejected = Metrics.counter("gpt2", "dead_letters")
        self.truncated = Metrics.counter("gpt2", "truncated_prompts")

    def setup(self):
        self._tok = self.tokenizer.get()

    def teardown(self):
        self._tok = None  # the last reference going frees the shared tokenizer

    def process(self, element):
        row, params = element
        ids = self._tok.encode(row.prompt)
        kept, error = fit_context(ids, params.max_new_tokens, self.n_ctx, self.truncate)
        if error is None:
            if len(kept) < len(ids):
                self.truncated.inc()
            yield Request(row.id, row.prompt, kept, params, row.source, row.row_index, row.extra)
        else:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, row_dead_letter(row, error))
