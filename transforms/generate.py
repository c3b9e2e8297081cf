"""Generation as a task of the batch skeleton (transforms/work.py): rows -> requests, one per sample (validate.py's
checks, a chat row's messages rendered with the model's chat template, tokenized to fit the context); runs of
requests -> completions with the generation graph (continuous batching: transforms/batching.py cuts the runs and
sets their slots; a worker decodes a run in parts of about `target_seconds` each, one Session.run per part);
completions -> rows (detokenize.py).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from apache_beam.metrics import Metrics

from lmgraph.sampling import SamplingParams
from transforms.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, RUNS, group_key, run_slots
from transforms.detokenize import completion_row
from transforms.progress import NAMESPACE, TOKENS
from transforms.records import NUM_SAMPLES, Request, Result, dead_letter
from transforms.resources import shared_model
from transforms.validate import (expand_samples, fit_context, prompt_error, resolve_num_samples, resolve_params,
                                 to_prompt_row)
from transforms.work import Done, RunBatches, Task

TRUNCATE = ("none", "left")
# A worker decodes a run in parts of about this many seconds, each a Session.run that goes on where the last one
# stopped (lmgraph.loader.GenerationModel.generate_parts): rows done and tokens move every part whatever the
# model's size, and continuous batching goes on across parts.
PART_SECONDS = 10.0


def row_units(batch: list[Request]) -> list[list[Request]]:
    """The batch as consecutive runs of one row's samples (batching keeps them adjacent); a request that is its
    row's only sample is a run of its own."""
    units: list[list[Request]] = []
    for r in batch:
        if units and r.num_samples > 1 and group_key(units[-1][0]) == group_key(r):
            units[-1].append(r)
        else:
            units.append([r])
    return units


@dataclasses.dataclass
class Generation(Task):
    """Rows -> requests -> completions -> completion rows.

    Requests: a row's sampling fields over `defaults`, its seed from `seed` and its id, num_samples requests (a
    row's `num_samples` overrides it; None: 1, and only rows that set it have `sample` in their outputs), its prompt
    (or its chat messages rendered with the model's template: then the output row's `prompt` is that text)
    tokenized to fit n_ctx with max_new_tokens after it (truncate "left": its BOS and its last tokens that do).
    Runs: `run_slots` rows decoded at a time (batch_size, fewer where max_batch_tokens says the cache would not
    fit); `stops` end a row in the graph as soon as its text holds one (`format` cuts it out); logprobs: the graph
    also gives each token's log-probability (else it skips the log-sum-exp). A run is decoded in parts of about
    target_seconds each, rows going on from one part to the next. A row's samples are one unit: retried together.
    Output rows carry model_label."""
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    stops: Sequence[str] = ()
    logprobs: bool = False
    target_seconds: float = PART_SECONDS
    defaults: SamplingParams = SamplingParams()
    seed: int = 0
    num_samples: int | None = None
    n_ctx: int = 1024
    truncate: str = "none"
    model_label: str = ""

    policy = RUNS
    name = "generation"
    stage = "Generate"
    requests_counter = "prompts"
    tokens_counter = TOKENS
    size_metric = "rows_per_part"

    def __post_init__(self):
        self.stops = (self.stops,) if isinstance(self.stops, str) else tuple(self.stops)
        if self.num_samples is not None:
            resolve_num_samples(self.num_samples, 1)  # ValueError unless an integer >= 1
        if self.truncate not in TRUNCATE:
            raise ValueError(f"truncate must be one of {', '.join(TRUNCATE)}, got {self.truncate!r}")
        if not self.target_seconds > 0:
            raise ValueError(f"run_seconds must be > 0, got {self.target_seconds!r}")

    def prompt(self, tokenizer, prompt, messages) -> tuple[str, list[int]]:
        """A row's prompt text and its token ids: its prompt encoded (with the BOS the tokenizer adds, if any), or
        its chat messages rendered with the model's chat template and encoded as they are; ValueError saying what is
        wrong (lmgraph.chat.ChatError for messages)."""
        if messages is not None:
            if prompt is not None:
                raise ValueError("the row has both a prompt and messages: give one")
            return tokenizer.render_chat(messages), tokenizer.encode_chat(messages)
        error = prompt_error(prompt)
        if error is not None:
            raise ValueError(error + " (a row needs a prompt, or messages)" if prompt is None else error)
        return prompt, tokenizer.encode(prompt)

    def params(self, overrides: dict, seed_key) -> SamplingParams:
        """A row's sampling parameters: ValueError naming what is wrong with an override."""
        return resolve_params(overrides, self.defaults, self.seed, seed_key)

    def tokens(self, tokenizer, ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids that fit the context with params.max_new_tokens after them: ValueError if none.
        Truncated on the left, a prompt keeps the tokens the tokenizer puts before every text (its BOS)."""
        prefix = tokenizer.encode("")  # [BOS], or [] (a method, not an attribute: the handler's engine proxies)
        keep = len(prefix) if prefix and ids[:len(prefix)] == prefix else 0
        kept = fit_context(ids, params.max_new_tokens, self.n_ctx, self.truncate, keep)
        if len(kept) < len(ids):
            Metrics.counter(NAMESPACE, "truncated_prompts").inc()
        return kept

    def prepare(self, tokenizer, element) -> list[Request] | dict:
        """A PromptRow or dict row -> a Request per sample, each with its own seed (`expand_samples`)."""
        try:
            row = to_prompt_row(element)
        except ValueError as e:
            return dead_letter(None, None, str(e), None)
        n = row.overrides.get(NUM_SAMPLES)
        try:
            if row.id is None:
                raise ValueError("id is null")
            prompt, ids = self.prompt(tokenizer, row.prompt, row.messages)
            params = self.params({k: v for k, v in row.overrides.items() if k != NUM_SAMPLES}, row.id)
            num_samples = resolve_num_samples(n, self.num_samples or 1)
            ids = self.tokens(tokenizer, ids, params)
        except ValueError as e:
            return row.dead_letter(str(e))
        return list(expand_samples(Request(row.id, prompt, ids, params, row.source, row.row_index, row.extra,
                                           num_samples=num_samples,
                                           with_sample=self.num_samples is not None or n is not None)))

    def run(self, model, units: list[list[Request]]) -> Iterator[Done]:
        """The units' completions as one run of run_slots rows at a time, in parts of target_seconds (the model's
        generate_parts), each unit's Results once its last sample has ended."""
        rows = [r for u in units for r in u]
        unit_of = [i for i, u in enumerate(units) for _ in u]
        first = [0]  # each unit's first row
        for u in units[:-1]:
            first.append(first[-1] + len(u))
        longest = max(len(r.token_ids) for r in rows)
        Metrics.counter(NAMESPACE, "padding_tokens").inc(sum(longest - len(r.token_ids) for r in rows))
        results: dict[int, Result] = {}
        left = [len(u) for u in units]  # samples of each unit not ended yet
        for part in model.generate_parts([r.token_ids for r in rows], [r.params for r in rows], self.logprobs,
                                         run_slots(rows, self.batch_size, self.max_batch_tokens), self.stops,
                                         self.target_seconds):
            ended = set()
            for row, c in part.done.items():
                results[row] = Result(rows[row], c.token_ids, c.finish_reason, model.precision, c.logprobs)
                left[unit_of[row]] -= 1
                if not left[unit_of[row]]:
                    ended.add(unit_of[row])
            yield Done({i: [results.pop(first[i] + k) for k in range(len(units[i]))] for i in ended}, part.tokens)

    def units(self, batch: list[Request]) -> list[list[Request]]:
        return row_units(batch)

    def failure(self, unit: list[Request], error: Exception) -> str:
        r = unit[0]
        which = "" if r.num_samples == 1 else f" (samples {r.sample}..{unit[-1].sample} of {r.num_samples})"
        return f"generation failed{which}: {type(error).__name__}: {error}"

    def format(self, tokenizer, result: Result) -> dict:
        """A completion's row (detokenize.completion_fields), its text cut before the first stop string."""
        r = result.request
        return completion_row(tokenizer, r.id, r.prompt, len(r.token_ids), result.token_ids, result.finish_reason,
                              self.stops, self.model_label, result.precision,
                              result.logprobs if self.logprobs else None, r.sample if r.with_sample else None)


class GenerateBatches(RunBatches):
    """RunBatches of the generation task: list[Request] (a run) -> a Result per request. task: the Generation, else
    one of the keyword arguments (its fields)."""

    def __init__(self, model_dir: str, precision: str = "auto", intra_threads: int | None = None,
                 task: Generation | None = None, **generation):
        super().__init__(task or Generation(**generation), shared_model(model_dir, precision, intra_threads))
