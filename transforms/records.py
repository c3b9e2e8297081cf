"""The records that flow between the transforms, and the dead-letter record every stage can emit."""
from __future__ import annotations

import dataclasses
from typing import Any

from gpt2.sampling import SamplingParams

ERRORS = "errors"  # tag of every DoFn's dead-letter output


@dataclasses.dataclass
class PromptRow:
    """One input row as read: the prompt value is not checked yet."""
    id: str
    prompt: Any
    overrides: dict  # override column -> value (None = use the run's default)
    source: str  # input file
    row_index: int  # row number within the source file


@dataclasses.dataclass
class Request:
    """A valid prompt, tokenized, with its resolved sampling parameters."""
    id: str
    prompt: str
    token_ids: list[int]
    params: SamplingParams
    source: str
    row_index: int


@dataclasses.dataclass
class Result:
    request: Request
    token_ids: list[int]
    finish_reason: str
    precision: str  # what the model ran in on the worker that generated it


def dead_letter(id: str, prompt: Any, error: str, source: str, row_index: int = -1) -> dict:
    """A row that cannot be generated, and why. `prompt` keeps the original value as text (None stays None)."""
    if prompt is not None and not isinstance(prompt, str):
        prompt = repr(prompt)
    return {"id": id, "prompt": prompt, "error": error, "source": source, "row_index": row_index}
