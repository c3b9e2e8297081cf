"""Validate rows and tokenize prompts; anything unusable goes to the dead-letter output with a reason."""
from __future__ import annotations

import hashlib
import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from gpt2.sampling import SamplingParams
from transforms.records import ERRORS, PromptRow, Request, dead_letter
from transforms.resources import shared_tokenizer

INT_FIELDS = {"max_new_tokens": 1, "top_k": 0}  # field -> smallest allowed value


def row_seed(run_seed: int, row_id: str) -> int:
    """A row's seed from the run seed and its id alone: the same wherever and with whatever it is batched."""
    digest = hashlib.sha256(f"{run_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def resolve_params(overrides: dict, defaults: SamplingParams, run_seed: int, row_id: str) -> SamplingParams:
    """Apply a row's override columns to the run's defaults; raise ValueError naming the bad column."""
    values = {"max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature,
              "top_k": defaults.top_k, "top_p": defaults.top_p, "seed": row_seed(run_seed, row_id)}
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"column {name}: expected a number, got {value!r}")
        if name in INT_FIELDS or name == "seed":
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise ValueError(f"column {name}: expected an integer, got {value!r}")
            value = int(value)
        values[name] = value
    params = SamplingParams(**values)
    params.validate()  # its message names the field: "top_p must be in (0, 1], got 1.5"
    return params


class ValidateRows(beam.DoFn):
    """PromptRow -> (PromptRow, SamplingParams) for a usable prompt and parameters; else a dead letter."""

    def __init__(self, defaults: SamplingParams, run_seed: int):
        self.defaults, self.run_seed = defaults, run_seed
        self.rejected = Metrics.counter("gpt2", "dead_letters")

    def process(self, row: PromptRow):
        error = None
        if row.prompt is None:
            error = "prompt is null"
        elif isinstance(row.prompt, bytes):  # a string column's value that is not UTF-8 (see read.column_values)
            error = "prompt is not valid UTF-8 text"
        elif not isinstance(row.prompt, str):
            error = f"prompt is not a string but {type(row.prompt).__name__}"
        elif not row.prompt.strip():
            error = "prompt is empty" if not row.prompt else "prompt is only whitespace"
        if error is None:
            try:
                yield row, resolve_params(row.overrides, self.defaults, self.run_seed, row.id)
                return
            except ValueError as e:
                error = str(e)
        self.rejected.inc()
        yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
            row.id, row.prompt, f"row {row.row_index} of {row.source}: {error}", row.source, row.row_index))


class Tokenize(beam.DoFn):
    """(PromptRow, SamplingParams) -> Request; prompts that do not fit the context are dead letters
    unless truncate == 'left', which keeps the prompt's last tokens."""

    def __init__(self, model_dir: str, n_ctx: int, truncate: str = "none"):
        self.tokenizer = shared_tokenizer(model_dir)
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
        room = self.n_ctx - params.max_new_tokens
        error = None
        if room < 1:
            error = f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the {self.n_ctx}-token context"
        elif len(ids) > room:
            if self.truncate == "left":
                ids = ids[-room:]
                self.truncated.inc()
            else:
                error = (f"{len(ids)} prompt tokens + {params.max_new_tokens} new tokens exceed the model context "
                         f"of {self.n_ctx} (use --truncate left to keep the prompt's end)")
        if error is None:
            yield Request(row.id, row.prompt, ids, params, row.source, row.row_index)
        else:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, dead_letter(
                row.id, row.prompt, f"row {row.row_index} of {row.source}: {error}", row.source, row.row_index))
