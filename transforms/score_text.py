"""ScoreText: GPT-2 log-likelihoods of given text for a PCollection of dict rows, from any source to any sink.

    result = rows | ScoreText("models/gpt2")                         # rows: id, text
    result = rows | ScoreText("models/gpt2", completion_key="completion")  # rows: id, prompt, completion
    result.scores  # dicts: id, tokens, logprob_sum, mean_logprob, perplexity, model, precision + the row's other keys
                   #        (token_logprobs=True: token_ids and token_logprobs after perplexity)
    result.errors  # dicts: id, error + the row's other keys

Every token of a text is scored, the first given <|endoftext|> (the rolling log-likelihood convention: token id
50256 is put before the text's tokens, and `GenerationModel.score` gives log p(token | the tokens before it)). In
completion mode (`completion_key`) only the completion's tokens are scored, each given <|endoftext|>, the prompt's
tokens and the completion's tokens before it; prompt and completion are tokenized apart (as lm-eval-harness does
with a context and its continuation), so the completion's tokens are those it has on its own. An empty prompt ("")
is allowed: the completion is then scored as a text is.

A sequence (<|endoftext|> + tokens) longer than the model's context is scored in windows (`score_windows`), as in
Hugging Face's perplexity guide: windows of at most n_ctx tokens starting every `stride` tokens (default n_ctx // 2),
each scoring only the tokens the windows before it did not, so that every token is scored once, with at least
n_ctx - stride tokens of context once the first window is past. A row's numbers sum over its windows.

Bounded input is batched by transforms/batching.py's cost model (policy SCORING: one forward pass, no decode steps,
a window counting as a row; a row's windows stay in one batch), unbounded input by size or a maximum wait, as
GenerateText's. A batch that fails is split and retried down to single rows, as in generation.

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
from apache_beam.metrics import Metrics

from gpt2.config import EOT_TOKEN
from transforms.batching import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, SCORING, BatchByLength, BatchByWait,
                                 check_batching)
from transforms.generate import _Progress, split_and_retry
from transforms.model_cache import model_identity
from transforms.progress import SCORED_TOKENS, Counter
from transforms.records import ERRORS, PromptRow, dead_letter, located, with_keys
from transforms.resources import shared_model, shared_tokenizer
from transforms.validate import prompt_error

SCORE_FIELDS = ("id", "tokens", "logprob_sum", "mean_logprob", "perplexity", "model", "precision")
TOKEN_FIELDS = ("token_ids", "token_logprobs")  # with token_logprobs, after perplexity
SCORES_SCHEMA = pa.schema([
    ("id", pa.string()), ("tokens", pa.int32()), ("logprob_sum", pa.float64()), ("mean_logprob", pa.float64()),
    ("perplexity", pa.float64()), ("model", pa.string()), ("precision", pa.string()),
])


def score_fields(token_logprobs: bool = False) -> tuple[str, ...]:
    if not token_logprobs:
        return SCORE_FIELDS
    i = SCORE_FIELDS.index("perplexity") + 1
    return SCORE_FIELDS[:i] + TOKEN_FIELDS + SCORE_FIELDS[i:]


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
    if not 1 <= stride < n_ctx:
        raise ValueError(f"stride must be in [1, {n_ctx - 1}] (below the context of {n_ctx}), got {stride}")
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


@dataclasses.dataclass
class ScoreRequest:
    """A row to score, tokenized and cut into windows: each window's scores from index `keep[i]` on are its
    tokens' (window position keep[i] + 1 onwards)."""
    id: Any
    value: Any  # the text (completion mode: the prompt), for a dead letter
    windows: list[list[int]]
    keep: list[int]
    source: str | None = None
    row_index: int = -1
    extra: dict = dataclasses.field(default_factory=dict)
    is_dict: bool = False  # came as a dict (GenerateText's convention for its errors) rather than a file's row

    @property
    def token_ids(self) -> list[int]:
        return [t for w, k in zip(self.windows, self.keep) for t in w[k + 1:]]


@dataclasses.dataclass
class ScoreResult:
    request: ScoreRequest
    logprobs: list[float]
    precision: str


def score_dead_letter(row, error: str) -> dict:
    """A dict row's dead letter: id, error, then its other keys untouched; a file row's: the job's
    (id, prompt: its text or prompt, error, source, row_index)."""
    if row.is_dict:
        return with_keys({"id": row.id, "error": error}, row.extra)
    return dead_letter(row.id, row.value, located(row, error), row.source, row.row_index, row.extra)


def score_row(id, token_ids: list[int], logprobs: Sequence[float], model_label: str, precision: str,
              token_logprobs: bool = False) -> dict:
    """The output row of one scored text (score_fields): the sum is exact (math.fsum of the float32 values)."""
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


class _Row(NamedTuple):
    id: Any
    value: Any  # text mode: the text; completion mode: the prompt
    completion: Any
    source: str | None
    row_index: int
    extra: dict
    is_dict: bool


class PrepareScores(beam.DoFn):
    """PromptRow or dict row -> ScoreRequest; a row that cannot be scored is a dead letter (ERRORS)."""

    def __init__(self, model_dir: str, n_ctx: int, stride: int, text_key: str, prompt_key: str,
                 completion_key: str | None):
        self.tokenizer = shared_tokenizer(model_dir)
        self.n_ctx, self.stride = n_ctx, stride
        self.text_key, self.prompt_key, self.completion_key = text_key, prompt_key, completion_key
        self.rejected = Metrics.counter("gpt2", "dead_letters")

    def setup(self):
        self._tok = self.tokenizer.get()

    def teardown(self):
        self._tok = None

    def to_row(self, element) -> _Row:
        if isinstance(element, PromptRow):  # the job's: prompt = the text (or prompt), the completion in extra
            extra = {k: v for k, v in element.extra.items() if k != self.completion_key}
            completion = element.extra.get(self.completion_key) if self.completion_key else None
            return _Row(element.id, element.prompt, completion, element.source, element.row_index, extra, False)
        if not isinstance(element, Mapping):
            keys = "text" if self.completion_key is None else "prompt and completion"
            raise ValueError(f"a row must be a dict with id and {keys}, not {type(element).__name__}")
        main = self.text_key if self.completion_key is None else self.prompt_key
        completion = element.get(self.completion_key) if self.completion_key else None
        return _Row(element.get("id"), element.get(main), completion, None, -1,
                    {k: v for k, v in element.items() if k != "id"}, True)

    def error(self, row: _Row) -> str | None:
        if row.id is None:
            return "id is null"
        if self.completion_key is None:
            return prompt_error(row.value, "text", blank_ok=True)
        if row.value is None:
            return "prompt is null: a completion is scored given its prompt (an empty one is \"\")"
        if row.value != "":
            error = prompt_error(row.value, "prompt", blank_ok=True)
            if error:
                return error
        return prompt_error(row.completion, "completion", blank_ok=True)

    def process(self, element):
        try:
            row = self.to_row(element)
        except ValueError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, {"id": None, "error": str(e)})
            return
        error = self.error(row)
        if error is not None:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, score_dead_letter(row, error))
            return
        if self.completion_key is None:
            seq = [EOT_TOKEN] + self._tok.encode(row.value)
            start = 1
        else:
            prompt = self._tok.encode(row.value) if row.value else []
            seq = [EOT_TOKEN] + prompt + self._tok.encode(row.completion)
            start = 1 + len(prompt)
        windows = score_windows(len(seq), start, self.n_ctx, self.stride)
        yield ScoreRequest(row.id, row.value, [seq[b:e] for b, e, _ in windows], [f - b - 1 for b, e, f in windows],
                           row.source, row.row_index, row.extra, row.is_dict)


def window_chunks(windows: list, batch_size: int, max_batch_tokens: int) -> Iterator[list]:
    """Consecutive runs of windows (token id lists, or tuples whose second item is one) of at most batch_size
    windows and max_batch_tokens (windows x longest): one Session.run each."""
    chunk: list = []
    longest = 0
    for w in windows:
        n = len(w[1])
        if chunk and (len(chunk) >= batch_size or (len(chunk) + 1) * max(longest, n) > max_batch_tokens):
            yield chunk
            chunk, longest = [], 0
        chunk.append(w)
        longest = max(longest, n)
    if chunk:
        yield chunk


class ScoreBatches(beam.DoFn):
    """list[ScoreRequest] -> ScoreResult per row; rows that fail alone go to ERRORS."""

    def __init__(self, model_dir: str, precision: str = "auto", intra_threads: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        self.model = shared_model(model_dir, precision, intra_threads)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.texts = Metrics.counter("gpt2", "texts")
        self.scored = Counter(SCORED_TOKENS)
        self.rejected = Metrics.counter("gpt2", "dead_letters")
        self.batch_windows = Metrics.distribution("gpt2", "batch_size")
        self.latency = Metrics.distribution("gpt2", "batch_latency_ms")

    def setup(self):
        self._model = self.model.get()

    def teardown(self):
        self._model = None

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Each request's kept log-probabilities, in token order, its windows scored a chunk at a time."""
        out: list[list[float]] = [[] for _ in requests]
        windows = [(i, w, k) for i, r in enumerate(requests) for w, k in zip(r.windows, r.keep)]
        for chunk in window_chunks(windows, self.batch_size, self.max_batch_tokens):
            for (i, _, k), logprobs in zip(chunk, self._model.score([w for _, w, _ in chunk])):
                out[i].extend(logprobs[k:])
        return out

    def process(self, batch: list[ScoreRequest]):
        for requests, outcome, seconds in split_and_retry(self.score, batch):
            if isinstance(outcome, Exception):
                self.rejected.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, score_dead_letter(
                    requests[0], f"scoring failed: {type(outcome).__name__}: {outcome}"))
                continue
            self.latency.update(int(seconds * 1000))
            self.batch_windows.update(sum(len(r.windows) for r in requests))
            self.texts.inc(len(requests))
            tokens = sum(len(lp) for lp in outcome)
            self.scored.inc(tokens)
            _Progress.add(len(requests), tokens)
            for r, logprobs in zip(requests, outcome):
                yield ScoreResult(r, logprobs, self._model.precision)


class FormatScores(beam.DoFn):
    """ScoreResult -> output row: score_fields, then the row's other keys (a file row's source and row_index)."""

    def __init__(self, model_label: str, token_logprobs: bool):
        self.model_label, self.token_logprobs = model_label, token_logprobs

    def process(self, result: ScoreResult):
        r = result.request
        row = score_row(r.id, r.token_ids, result.logprobs, self.model_label, result.precision, self.token_logprobs)
        extra = dict(r.extra) if r.source is None else {**r.extra, "source": r.source, "row_index": r.row_index}
        yield with_keys(row, extra)


class ScoreTextResult(NamedTuple):
    scores: beam.PCollection
    errors: beam.PCollection


class ScoreText(beam.PTransform):
    """PCollection of dict rows -> ScoreTextResult(scores, errors).

    model_dir: a directory written by `python -m pipeline.export`, local or gs://.
    text_key: the key of the text to score (default "text"). completion_key: score the completion under this key
      given the prompt under prompt_key (default "prompt") instead of a whole text.
    token_logprobs: add token_ids and token_logprobs (each scored token's log-probability) to each row.
    stride: the sliding window's step for sequences longer than the context (default n_ctx // 2).
    batch_size, max_batch_tokens: a batch holds at most this many windows / windows x longest window (a row's
      windows stay together: a row with more is a batch of its own, scored this many windows per run).
    streaming, max_wait_secs, precision, intra_op_threads, model_label, n_ctx, clock: as GenerateText's.
    """

    def __init__(self, model_dir: str, *, text_key: str = "text", prompt_key: str = "prompt",
                 completion_key: str | None = None, token_logprobs: bool = False, stride: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 streaming: bool | None = None, max_wait_secs: float = 1.0, precision: str = "auto",
                 intra_op_threads: int | None = None, model_label: str | None = None, n_ctx: int | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__()
        check_batching(batch_size, max_batch_tokens, max_wait_secs)
        model_label, n_ctx = model_identity(model_dir, model_label, n_ctx)
        stride = n_ctx // 2 if stride is None else stride
        if not (isinstance(stride, int) and 1 <= stride < n_ctx):
            raise ValueError(f"stride must be an integer in [1, {n_ctx - 1}] (below the context of {n_ctx}), "
                             f"got {stride!r}")
        self.model_dir, self.model_label, self.n_ctx, self.stride = model_dir, model_label, n_ctx, stride
        self.text_key, self.prompt_key, self.completion_key = text_key, prompt_key, completion_key
        self.token_logprobs = bool(token_logprobs)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.streaming, self.max_wait_secs, self.clock = streaming, max_wait_secs, clock
        self.precision, self.intra_op_threads = precision, intra_op_threads

    def expand(self, rows) -> ScoreTextResult:
        prepared = rows | "Prepare" >> beam.ParDo(PrepareScores(
            self.model_dir, self.n_ctx, self.stride, self.text_key, self.prompt_key, self.completion_key)
        ).with_outputs(ERRORS, main="ok")
        streaming = (not rows.is_bounded) if self.streaming is None else self.streaming
        if streaming:
            batch = BatchByWait(self.batch_size, self.max_batch_tokens, self.max_wait_secs, self.clock, SCORING)
        else:
            batch = BatchByLength(self.batch_size, self.max_batch_tokens, policy=SCORING)
        results = (prepared.ok
                   | "Batch" >> batch
                   | "Score" >> beam.ParDo(ScoreBatches(self.model_dir, self.precision, self.intra_op_threads,
                                                        self.batch_size, self.max_batch_tokens))
                   .with_outputs(ERRORS, main="ok"))
        scores = results.ok | "Format" >> beam.ParDo(FormatScores(self.model_label, self.token_logprobs))
        errors = (prepared[ERRORS], results[ERRORS]) | "Errors" >> beam.Flatten()
        return ScoreTextResult(scores, errors)
