"""Row checks, per-row parameters and seeds, samples and the context check: plain functions, used by the generation
task (transforms/generate.py, which GenerateText and `GPT2ModelHandler` run) and, the text checks, by scoring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import Iterator

import numpy as np

from lmgraph.sampling import SamplingParams, coerce
from transforms.records import MESSAGES, NUM_SAMPLES, ROW_OPTIONS, PromptRow, Request

ROW_KEYS = ("id", "prompt", MESSAGES)  # besides the per-row options (ROW_OPTIONS), the keys generation reads


def row_seed(run_seed: int, row_id) -> int:
    """A row's seed from the run seed and its id alone: the same wherever and with whatever it is batched."""
    digest = hashlib.sha256(f"{run_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample `sample` of a row whose seed is `seed`: sample 0's is the row's seed itself (so one sample
    per row is what a row always was), the others derive from it and the sample number alone."""
    if sample == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x00sample\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def resolve_num_samples(value, default: int) -> int:
    """A row's num_samples (None = the default); ValueError naming the column when it is not an integer >= 1."""
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or (
            isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer())):
        raise ValueError(f"column {NUM_SAMPLES}: expected an integer, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{NUM_SAMPLES} must be an integer >= 1, got {value!r}")
    return int(value)


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


def prompt_error(prompt, name: str = "prompt", blank_ok: bool = False) -> str | None:
    """What makes a prompt value (or another text value, named `name`) unusable, or None. blank_ok: text of only
    whitespace is usable (scoring: it has tokens), the empty string still is not."""
    if prompt is None:
        return f"{name} is null"
    if isinstance(prompt, bytes):  # a string column's value that is not UTF-8 (see read.column_values)
        return f"{name} is not valid UTF-8 text"
    if not isinstance(prompt, str):
        return f"{name} is not a string but {type(prompt).__name__}"
    if not prompt:
        return f"{name} is empty"
    if not blank_ok and not prompt.strip():
        return f"{name} is only whitespace"
    return None


def fit_context(ids: list[int], max_new_tokens: int, n_ctx: int, truncate: str, keep: int = 0) -> list[int]:
    """The prompt ids if they fit the context with max_new_tokens after them (with truncate == "left", the
    prompt's first `keep` tokens (its BOS) and its last tokens that fit after them), else ValueError saying why
    not."""
    room = n_ctx - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {n_ctx}-token context")
    if len(ids) > room:
        if truncate == "left":
            keep = min(keep, room - 1)  # at least one token of the prompt's own
            return ids[:keep] + ids[len(ids) - (room - keep):]
        raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model context of {n_ctx} "
                         f"(use --truncate left, or truncate='left' in GenerateText, to keep the prompt's end)")
    return ids


def to_prompt_row(element) -> PromptRow:
    """A dict row (id, prompt or messages, sampling overrides, anything else passed through) as a PromptRow; a
    PromptRow (what the job's reader emits) as it is. Raise ValueError for anything else."""
    if isinstance(element, PromptRow):
        return element
    if not isinstance(element, Mapping):
        raise ValueError(f"a row must be a dict with id and prompt, not {type(element).__name__}")
    overrides = {k: element[k] for k in ROW_OPTIONS if k in element}
    extra = {k: v for k, v in element.items() if k not in ROW_KEYS and k not in overrides}
    return PromptRow(element.get("id"), element.get("prompt"), overrides, extra=extra, messages=element.get(MESSAGES))


def expand_samples(request: Request) -> Iterator[Request]:
    """A row's Request -> one Request per sample, each with its own seed (`sample_seed`), all with the same token
    ids: the batching keeps them together, and the engine prefills their prompt once for all of them."""
    if request.num_samples == 1:
        yield request
        return
    for k in range(request.num_samples):
        yield dataclasses.replace(request, sample=k,
                                  params=dataclasses.replace(request.params, seed=sample_seed(request.params.seed, k)))
