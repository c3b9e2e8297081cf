"""Per-row sampling parameters: their fields, defaults, types and checks, defined once.

Everything else comes from this one list of fields (`FIELDS`): the job's command-line options
(pipeline/options.py), the per-row override columns and keys (transforms/read.py, transforms/validate.py), the
defaults `GenerateText` and `GPT2ModelHandler` take as keyword arguments, and the per-row graph inputs
(lmgraph/manifest.py INPUTS after input_ids, input_lengths, prompt_index and want_logprobs, fed in this order by
lmgraph/loader.py; a test checks that the two lists agree).
"""
from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = _field(64, "new tokens per row at most")
    temperature: float = _field(0.0, "0 = greedy")
    top_k: int = _field(0, "0 = off")
    top_p: float = _field(1.0, "1 = off")
    seed: int = _field(0, "a row's sampling seed")
    ignore_eos: bool = _field(False, "go on past end-of-text to max_new_tokens (fixed-length benchmarks)")

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (np.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.seed, (int, np.integer)) and -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingParams))
TYPES: dict[str, type] = {name: t for name, t in typing.get_type_hints(SamplingParams).items() if name in FIELDS}
HELP: dict[str, str] = {f.name: f.metadata["help"] for f in dataclasses.fields(SamplingParams)}


def sampling_params(**values) -> SamplingParams:
    """SamplingParams from keyword arguments, checked: TypeError for a name that is not a field, ValueError for a
    bad value."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    params = SamplingParams(**values)
    params.validate()
    return params


def coerce(name: str, value):
    """A per-row value (from a Parquet column, a dict key, JSON) as its field's type; raise ValueError naming the
    field when it is not one: a bool is not a number, and an integer field takes a float only if it is whole."""
    kind = TYPES[name]
    if kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"column {name}: expected true or false, got {value!r}")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"column {name}: expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"column {name}: expected an integer, got {value!r}")
        return int(value)
    return float(value)
