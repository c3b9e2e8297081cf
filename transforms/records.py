"""The records that flow between the transforms, and the dead-letter record every stage can emit.

Every record of a row, whatever the work, is a `Record`: its id, its text (the prompt, or the text scored; a chat
row has `messages` instead of a prompt until transforms/generate.py renders them), where it was read (`source`,
`row_index`: a Parquet file's row number from 0, a JSONL file's line number from 1) and its passthrough keys
(`extra`). Its error messages name the file and row or line, and its output rows carry both so that
the writer puts them in that file's outputs. A row given to `GenerateText` or `ScoreText` as a dict has no source;
its keys other than those the work reads are `extra`, passed through to its output row untouched.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from lmgraph.sampling import FIELDS, SamplingParams

ERRORS = "errors"  # tag of every DoFn's dead-letter output
NUM_SAMPLES = "num_samples"  # completions per prompt: a per-row column or key like the sampling fields, not one
ROW_OPTIONS = FIELDS + (NUM_SAMPLES,)  # the per-row columns and keys of a generation row besides id and prompt
MESSAGES = "messages"  # a chat row's key (GenerateText, the handler): a list of {role, content}, instead of a prompt


class Record:
    """What every record of an input row carries; each dataclass below declares these fields in its own order."""
    id: Any
    prompt: Any  # the row's text as given (the prompt, or the text scored): its dead letter keeps it
    source: str | None  # input file (None: not read from a file)
    row_index: int  # row number within a Parquet file (from 0), line number within a JSONL file (from 1)
    extra: dict  # passthrough keys

    def located(self, message: str) -> str:
        """A message about the row, naming its file and row (or line) when it was read from a file."""
        return message if self.source is None else f"{position(self.source, self.row_index)}: {message}"

    def origin(self) -> dict:
        """The keys an output row carries besides its own fields: the passthrough keys, and a file row's origin."""
        if self.source is None:
            return dict(self.extra)
        return {**self.extra, "source": self.source, "row_index": self.row_index}

    def dead_letter(self, error: str) -> dict:
        """The row's dead letter: `error` located, the row's passthrough keys and origin kept."""
        return dead_letter(self.id, self.prompt, self.located(error), self.source, self.row_index, self.extra)


@dataclasses.dataclass
class PromptRow(Record):
    """One input row as read: the prompt (or chat messages) value is not checked yet."""
    id: Any
    prompt: Any
    overrides: dict  # sampling field -> value (None = use the run's default)
    source: str | None = None
    row_index: int = -1
    extra: dict = dataclasses.field(default_factory=dict)
    messages: Any = None  # a chat row's messages (then prompt is None), rendered with the model's chat template

    def given(self) -> Any:
        """What the row gave to generate from: its prompt, or else its messages as JSON text."""
        return self.prompt if self.prompt is not None or self.messages is None else messages_text(self.messages)

    def dead_letter(self, error: str) -> dict:
        return dead_letter(self.id, self.given(), self.located(error), self.source, self.row_index, self.extra)


@dataclasses.dataclass
class Request(Record):
    """A valid prompt, tokenized, with its resolved sampling parameters: one sample of its row (`sample` of
    `num_samples`; params.seed is that sample's seed). A chat row's prompt is its messages rendered with the chat
    template: the text its token ids are, and its output row's `prompt`."""
    id: Any
    prompt: str
    token_ids: list[int]
    params: SamplingParams
    source: str | None = None
    row_index: int = -1
    extra: dict = dataclasses.field(default_factory=dict)
    sample: int = 0
    num_samples: int = 1
    with_sample: bool = False  # its output row carries `sample`


@dataclasses.dataclass
class Result:
    request: Request
    token_ids: list[int]
    finish_reason: str
    precision: str  # what the model ran in on the worker that generated it
    logprobs: list[float] | None = None  # the model's log-probability of each of token_ids (full softmax)


def is_jsonl(path: str) -> bool:
    """A JSON Lines file (one JSON object per line) rather than Parquet, by its name."""
    return path.endswith(".jsonl")


def position(source: str, row_index: int) -> str:
    """Where a row is in its file: "row 3 of x.parquet" (from 0), "line 4 of x.jsonl" (from 1, as editors count)."""
    return f"{'line' if is_jsonl(source) else 'row'} {row_index} of {source}"


def dead_letter(id: Any, prompt: Any, error: str, source: str | None, row_index: int = -1,
                extra: dict | None = None) -> dict:
    """A row that cannot be generated (or scored), and why. `prompt` keeps the original value as text (None stays
    None): the prompt, or the text a scoring row scores."""
    if prompt is not None and not isinstance(prompt, str):
        prompt = repr(prompt)
    row = {"id": id, "prompt": prompt, "error": error}
    if source is not None:
        row.update(source=source, row_index=row_index)
    return with_keys(row, extra or {})


def messages_text(messages: Any) -> str:
    """A chat row's messages as JSON text for its dead letter (lone surrogates escaped: no file could hold them)."""
    text = json.dumps(messages, ensure_ascii=False, default=repr)
    return text.encode("utf-8", "backslashreplace").decode()


def with_keys(row: dict, extra: dict) -> dict:
    """`row` followed by the keys of `extra` it does not have: an output field wins over a passthrough key."""
    row.update((k, v) for k, v in extra.items() if k not in row)
    return row

