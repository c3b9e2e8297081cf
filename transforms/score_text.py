"""ScoreText: GPT-2 log-likelihoods of given text for a PCollection of dict rows, from any source to any sink.

    result = rows | ScoreText("models/gpt2")                         # rows: id, text
    result = rows | ScoreText("models/gpt2", completion_key="completion")  # rows: id, prompt, completion
    result.scores  # dicts: id, tokens, logprob_sum, mean_logprob, perplexity, model, precision + the row's other keys
                   #        (token_logprobs=True: token_ids and token_logprobs after perplexity)
    result.errors  # dicts: id, error + the row's other keys

Every token of a text is scored, the first given <|endoftext|> (the rolling log-likelihood convention: token id
50256 is put before the text's tokens, and `GenerationModel.score` gives log p(token | the tokens before it)). That
is GPT-2's; any model's tokenizer names what goes first (`score_prefix`): a Llama's BOS, or, for a tokenizer that
adds none (Qwen2), nothing: its text's first token is then context only, not scored (nor counted in `tokens`). In
completion mode (`completion_key`) only the completion's tokens are scored, each given <|endoftext|>, the prompt's
tokens and the completion's tokens before it; prompt and completion are tokenized apart (as lm-eval-harness does
with a context and its continuation), so the completion's tokens are those it has on its own. An empty prompt ("")
is allowed: the completion is then scored as a text is.

A sequence (<|endoftext|> + tokens) longer than the model's context is scored in windows (`score_windows`), as in
Hugging Face's perplexity guide: windows of at most n_ctx tokens starting every `stride` tokens (default n_ctx // 2),
each scoring only the tokens the windows before it did not, so that every token is scored once, with at least
n_ctx - stride tokens of context once the first window is past. A row's numbers sum over its windows.

Scoring is a task of the batch skeleton (transforms/work.py), as generation is: bounded input is batched by
transforms/batching.py's cost model (policy SCORE_BATCHES: one forward pass, no decode steps, a window counting as a
row; a row's windows stay in one batch), unbounded input by size or a maximum wait, and a batch that fails is split
and retried down to single rows. What is scoring's own is here: the windows.

The job (`python -m pipeline.score`) is read | ScoreText | write: its rows are transforms.records.PromptRow, whose
`prompt` is the text (or the prompt) and whose `extra` holds the completion under its column's name; its dead
letters are the generation job's (id, prompt: the text or prompt, error, source, row_index).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import pyarrow as pa

from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, SCORE_BATCHES, cut_windows
from transforms.model_cache import model_identity
from transforms.progress import SCORED_TOKENS
from transforms.records import PromptRow, Record, with_keys
from transforms.resources import shared_model
from transforms.validate import prompt_error
from transforms.work import Batching, BatchWork, Done, RunBatches, Task

SCORES_SCHEMA = pa.schema([
    ("id", pa.string()), ("tokens", pa.int32()), ("logprob_sum", pa.float64()), ("mean_logprob", pa.float64()),
    ("perplexity", pa.float64()), ("model", pa.string()), ("precision", pa.string()),
])


def scores_schema(token_logprobs: bool = False) -> pa.Schema:
    """The scores files' schema; with token_logprobs, token_ids list<int32> and token_logprobs list<float32>."""
    if not token_logprobs:
        return SCORES_SCHEMA
    i = SCORES_SCHEMA.get_field_index("perplexity") + 1
    return (SCORES_SCHEMA.insert(i, pa.field("token_ids", pa.list_(pa.int32())))
            .insert(i + 1, pa.field("token_logprobs", pa.list_(pa.float32()))))


def score_windows(n: int, start: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score positions start..n-1 of a sequence of n tokens: (begin, end, first) each, the window
    being tokens begin..end-1 (at most n_ctx) and scoring positions first..end-1 (given the tokens from begin).

    Hugging Face's perplexity guide's windows: they begin every `stride` tokens and end n_ctx later (or at the
    sequence's end, the last one), and each scores the positions after the previous window's end; position 0 (the
    <|endoftext|> put first) has no context and is never scored. Positions before `start` (completion mode: the
    prompt) are not scored, and a window that would score none of the others is left out.
    """
    check_stride(stride, n_ctx)
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + n_ctx, n)
        first = max(prev_end, begin + 1, start)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return windows


def check_stride(stride, n_ctx: int) -> None:
    """ValueError unless stride is an integer in [1, n_ctx - 1]: windows must overlap by at least one token."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if stride >= n_ctx:
        raise ValueError(f"stride must be below the model's context of {n_ctx} (windows must overlap by at least "
                         f"one token), got {stride}")


@dataclasses.dataclass
class ScoreRequest(Record):
    """A row to score (`prompt`: its text, in completion mode its prompt), tokenized and cut into windows: each
    window's scores from index `keep[i]` on are its tokens' (window position keep[i] + 1 onwards)."""
    id: Any
    prompt: Any
    windows: list[list[int]]
    keep: list[int]
    source: str | None = None
    row_index: int = -1
    extra: dict = dataclasses.field(default_factory=dict)
    is_dict: bool = False  # came as a dict rather than a file's row: its dead letter has no prompt field

    @property
    def token_ids(self) -> list[int]:
        return [t for w, k in zip(self.windows, self.keep) for t in w[k + 1:]]

    def dead_letter(self, error: str) -> dict:
        """A dict row's: id, error, then its other keys untouched; a file row's: the job's (id, prompt: its text or
        prompt, error, source, row_index)."""
        if self.is_dict:
            return with_keys({"id": self.id, "error": error}, self.extra)
        return super().dead_letter(error)


@dataclasses.dataclass
class ScoreResult:
    request: ScoreRequest
    logprobs: list[float]
    precision: str


def score_row(id, token_ids: list[int], logprobs: Sequence[float], model_label: str, precision: str,
              token_logprobs: bool = False) -> dict:
    """The output row of one scored text (scores_schema's fields): the sum is exact (math.fsum of the float32 values)."""
    total = math.fsum(logprobs)
    mean = total / len(logprobs)
    try:
        perplexity = math.exp(-mean)
    except OverflowError:
        perplexity = math.inf
    row = {"id": id, "tokens": len(logprobs), "logprob_sum": total, "mean_logprob": mean, "perplexity": perplexity}
    if token_logprobs:
        row.update(token_ids=list(token_ids), token_logprobs=list(logprobs))
    row.update(model=model_label, precision=precision)
    return row


@dataclasses.dataclass
class Scoring(Task):
    """Rows -> texts cut into windows -> each scored token's log-probability -> score rows.

    Rows: the text under text_key, or (completion_key) the completion under it given the prompt under prompt_key;
    windows of at most n_ctx tokens every `stride` (`score_windows`). A batch's windows are scored up to batch_size
    windows and max_batch_tokens (windows x longest) per Session.run. Output rows carry model_label, and with
    token_logprobs each scored token and its log-probability."""
    n_ctx: int
    stride: int
    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str | None = None
    token_logprobs: bool = False
    model_label: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS

    policy = SCORE_BATCHES
    name = "scoring"
    stage = "Score"
    requests_counter = "texts"
    tokens_counter = SCORED_TOKENS  # size_metric: Task's, batch_size (texts per batch)

    def __post_init__(self):
        check_stride(self.stride, self.n_ctx)

    def to_request(self, element) -> tuple[ScoreRequest, Any]:
        """The row as a ScoreRequest not yet cut into windows, and its completion (None in text mode)."""
        if isinstance(element, PromptRow):  # the job's: prompt = the text (or prompt), the completion in extra
            extra = {k: v for k, v in element.extra.items() if k != self.completion_key}
            completion = element.extra.get(self.completion_key) if self.completion_key else None
            row = ScoreRequest(element.id, element.prompt, [], [], element.source, element.row_index, extra)
            return row, completion
        if not isinstance(element, Mapping):
            keys = "text" if self.completion_key is None else "prompt and completion"
            raise ValueError(f"a row must be a dict with id and {keys}, not {type(element).__name__}")
        main = self.text_key if self.completion_key is None else self.prompt_key
        completion = element.get(self.completion_key) if self.completion_key else None
        extra = {k: v for k, v in element.items() if k != "id"}  # the text and completion too: a dict keeps its keys
        return ScoreRequest(element.get("id"), element.get(main), [], [], extra=extra, is_dict=True), completion

    def error(self, row: ScoreRequest, completion) -> str | None:
        if row.id is None:
            return "id is null"
        if self.completion_key is None:
            return prompt_error(row.prompt, "text", blank_ok=True)
        if row.prompt is None:
            return "prompt is null: a completion is scored given its prompt (an empty one is \"\")"
        if row.prompt != "":
            error = prompt_error(row.prompt, "prompt", blank_ok=True)
            if error:
                return error
        return prompt_error(completion, "completion", blank_ok=True)

    def prepare(self, tokenizer, element) -> list[ScoreRequest] | dict:
        """A PromptRow or dict row -> its ScoreRequest: <|endoftext|> + its tokens, cut into windows."""
        try:
            row, completion = self.to_request(element)
        except ValueError as e:
            return {"id": None, "error": str(e)}
        error = self.error(row, completion)
        if error is not None:
            return row.dead_letter(error)
        # The text's tokens after the tokenizer's score_prefix (GPT-2: <|endoftext|>; Llama: its BOS; Qwen2: none,
        # so the text's first token is the context of the rest and not scored)
        prefix = tokenizer.score_prefix
        head = tokenizer.encode_plain(row.prompt) if row.prompt else []  # the text, or the prompt (maybe "")
        seq = prefix + head + ([] if completion is None else tokenizer.encode_plain(completion))
        windows = score_windows(len(seq), 1 if completion is None else len(prefix) + len(head), self.n_ctx,
                                self.stride)
        if not windows:
            return row.dead_letter("nothing to score: one token, and the model has no BOS to score it after")
        return [dataclasses.replace(row, windows=[seq[b:e] for b, e, _ in windows],
                                    keep=[f - b - 1 for b, e, f in windows])]

    def run(self, model, units: list[list[ScoreRequest]]) -> Iterator[Done]:
        """Each request's kept log-probabilities, in token order, once all are scored."""
        requests = [r for u in units for r in u]
        out = [ScoreResult(r, [], model.precision) for r in requests]
        windows = [(i, w, k) for i, r in enumerate(requests) for w, k in zip(r.windows, r.keep)]
        for chunk in cut_windows(windows, self.batch_size, self.max_batch_tokens):
            for (i, _, k), logprobs in zip(chunk, model.score([w for _, w, _ in chunk])):
                out[i].logprobs.extend(logprobs[k:])
        yield Done({i: [result] for i, result in enumerate(out)}, sum(len(r.logprobs) for r in out))

    def format(self, tokenizer, result: ScoreResult) -> dict:
        """scores_schema's fields."""
        r = result.request
        return score_row(r.id, r.token_ids, result.logprobs, self.model_label, result.precision, self.token_logprobs)


class ScoreTextResult(NamedTuple):
    scores: beam.PCollection
    errors: beam.PCollection


class ScoreText(BatchWork):
    """PCollection of dict rows -> ScoreTextResult(scores, errors).

    model_dir: a directory written by `python -m pipeline.export`, local or gs://.
    text_key: the key of the text to score (default "text"). completion_key: score the completion under this key
      given the prompt under prompt_key (default "prompt") instead of a whole text.
    token_logprobs: add token_ids and token_logprobs (each scored token's log-probability) to each row.
    stride: the sliding window's step for sequences longer than the context (default n_ctx // 2).
    batch_size, max_batch_tokens: a batch holds at most this many windows / windows x longest window (a row's
      windows stay together: a row with more is a batch of its own, scored this many windows per run);
      max_batch_tokens by default as GenerateText's.
    streaming, max_wait_secs, precision, intra_op_threads, model_label, n_ctx, clock: as GenerateText's.
    """
    result_type = ScoreTextResult

    def __init__(self, model_dir: str, *, text_key: str = "text", prompt_key: str = "prompt",
                 completion_key: str | None = None, token_logprobs: bool = False, stride: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int | None = None,
                 streaming: bool | None = None, max_wait_secs: float = 1.0, precision: str = "auto",
                 intra_op_threads: int | None = None, model_label: str | None = None, n_ctx: int | None = None,
                 clock: Callable[[], float] = time.time):
        batching = Batching(batch_size, DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens,
                            streaming, max_wait_secs, clock)  # the arguments checked before the manifest is read
        model_label, n_ctx, max_batch_tokens = model_identity(model_dir, model_label, n_ctx, max_batch_tokens,
                                                              scoring=True)
        scoring = Scoring(n_ctx, n_ctx // 2 if stride is None else stride, text_key, prompt_key, completion_key,
                          bool(token_logprobs), model_label, batch_size, max_batch_tokens)
        super().__init__(RunBatches(scoring, shared_model(model_dir, precision, intra_op_threads)),
                         dataclasses.replace(batching, max_batch_tokens=max_batch_tokens), model_dir)
