"""GPT2ModelHandler: the engine as a Beam ModelHandler, for `RunInference`.

    results = prompts | RunInference(GPT2ModelHandler("models/gpt2", max_new_tokens=32))
    # each a PredictionResult(example=<the prompt>, inference=<completion row dict>, model_id=<model label>)

    keyed = pairs | RunInference(KeyedModelHandler(GPT2ModelHandler("models/gpt2")))  # (key, prompt) in and out

An example is a prompt string, a conversation (a list of {role, content} messages, rendered with the model's chat
template), or a dict like GenerateText's rows (`prompt` or `messages`, optional `id`, optional per-row sampling
values). A string's seed derives from the run seed and the prompt itself (a conversation's from its rendered text, a
dict's from its id when it has one), so a completion never depends on the batch it was in; the same prompt sampled
twice gives the same text (give the rows ids to sample them apart). `inference` holds the completion row's fields
(id, prompt, completion, completion_token_ids, prompt_tokens, completion_tokens, finish_reason, model, precision; id
None for a string or a conversation).

As Beam's ModelHandler: `load_model` loads the engine and tokenizer once per worker process (RunInference shares
them across its threads), `run_inference` completes one batch. Batching is RunInference's (BatchElements: the
keyword arguments min_batch_size, max_batch_size (default 128 here), max_batch_duration_secs, ... of
ModelHandler). Within a batch, what is better here than a plain model call is kept: the batch is one run of the
generation task (transforms/generate.py), sorted by prompt length, with as many slots as max_batch_tokens allows
(a row that ends frees its slot for the next; stop strings end rows in the graph), and a run that fails is split
and retried down to single rows. A batch with a bad example (not a string, empty, too long for the context, bad
sampling value, malformed messages, messages for a model without a chat template) or a row that fails alone
raises, naming the example and why: with `RunInference(...).with_exception_handling()`, Beam routes that batch to
`failed_inferences`, as it documents (use `max_batch_size=1` to have single examples routed, or GenerateText for a
per-row dead-letter output).
`inference_args` may set sampling values (and `seed`, the run seed) for one RunInference.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from lmgraph.sampling import FIELDS, sampling_params
from transforms.batching import DEFAULT_BATCH_SIZE, max_batch_tokens_for, run_slots
from transforms.generate import Generation
from transforms.model_cache import local_model_dir
from transforms.records import MESSAGES, Request, Result
from transforms.resources import load_model, load_tokenizer
from transforms.work import Done, split_and_retry

# ModelHandler's own keyword arguments (batching, model sharing), passed through to it.
BEAM_ARGS = frozenset(inspect.signature(ModelHandler.__init__).parameters) - {"self", "kwargs"} | {"env_vars"}


class GPT2Engine:
    """What load_model returns: the engine and the tokenizer of one model, loaded once per worker process. Used
    through methods only, so that it also works as the proxy Beam hands out for a model shared across processes
    (large_model=True or model_copies)."""

    def __init__(self, model_dir: str, precision: str, intra_threads: int | None):
        local = local_model_dir(model_dir)  # a gs:// model: copied (or found in the machine's cache) once
        self._model = load_model(local, precision, intra_threads)
        self._tokenizer = load_tokenizer(local)

    def info(self) -> tuple[str, str, int, int]:
        """(model label, precision, context size, default max_batch_tokens)."""
        c = self._model.config
        return self._model.name, self._model.precision, c.n_ctx, max_batch_tokens_for(c.n_layer, c.kv_width)

    # the tokenizer's methods that the generation task calls (transforms/generate.py, detokenize.py)
    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def render_chat(self, messages: list[dict]) -> str:
        return self._tokenizer.render_chat(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._tokenizer.encode_chat(messages)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        return self._tokenizer.token_bytes(token)

    def generate(self, prompts, params, logprobs=False, slots=None, stops=()):
        return self._model.generate(prompts, params, logprobs, slots, stops)


class GPT2ModelHandler(ModelHandler[Any, dict, GPT2Engine]):
    """A ModelHandler of GPT-2 text generation: prompt (or dict row) -> completion row dict.

    model_dir: written by `python -m pipeline.export`, local or gs://. Keyword arguments named after a sampling
    field (max_new_tokens, temperature, top_k, top_p, ignore_eos) are the defaults; seed is the run seed; stop,
    truncate, max_batch_tokens, precision and intra_op_threads as GenerateText's. Any other keyword argument is
    ModelHandler's (min_batch_size, max_batch_size, max_batch_duration_secs, large_model, model_copies, ...).
    """

    def __init__(self, model_dir: str, *, stop: list[str] | tuple[str, ...] = (), truncate: str = "none",
                 seed: int = 0, max_batch_tokens: int | None = None, precision: str = "auto",
                 intra_op_threads: int | None = None, **kwargs):
        sampling = {k: kwargs.pop(k) for k in FIELDS if k in kwargs}
        unknown = sorted(set(kwargs) - BEAM_ARGS)
        if unknown:
            raise TypeError(f"GPT2ModelHandler got unknown keyword argument(s) {', '.join(unknown)}")
        kwargs.setdefault("max_batch_size", DEFAULT_BATCH_SIZE)
        super().__init__(**kwargs)
        # each batch's task: this one with the batch's size, the model's context and label, inference_args' values
        if max_batch_tokens is not None and not (isinstance(max_batch_tokens, int) and max_batch_tokens >= 1):
            raise ValueError(f"max_batch_tokens must be an integer >= 1, got {max_batch_tokens!r}")
        self.max_batch_tokens = max_batch_tokens  # None: the model's default, known once it is loaded
        self.task = Generation(stops=stop, defaults=sampling_params(**sampling),
                               seed=seed, truncate=truncate)
        self.model_dir, self.precision, self.intra_op_threads = model_dir, precision, intra_op_threads

    def load_model(self) -> GPT2Engine:
        return GPT2Engine(self.model_dir, self.precision, self.intra_op_threads)

    def validate_inference_args(self, inference_args: dict[str, Any] | None):
        if inference_args:
            unknown = sorted(set(inference_args) - set(FIELDS))
            if unknown:
                raise ValueError(f"inference_args may hold sampling values ({', '.join(FIELDS)}), not "
                                 f"{', '.join(unknown)}")
            args = {k: v for k, v in inference_args.items() if k != "seed"}
            sampling_params(**{**dataclasses.asdict(self.task.defaults), **args})

    def run_inference(self, batch: Sequence[Any], model: GPT2Engine,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        args = dict(inference_args or {})
        seed = args.pop("seed", self.task.seed)
        label, precision, n_ctx, max_batch_tokens = model.info()
        task = dataclasses.replace(self.task, batch_size=len(batch), defaults=dataclasses.replace(
            self.task.defaults, **args), seed=seed, n_ctx=n_ctx, model_label=label,
            max_batch_tokens=max_batch_tokens if self.max_batch_tokens is None else self.max_batch_tokens)  # one run: a slot per row
        requests = [example_request(i, example, model, task) for i, example in enumerate(batch)]
        index = {id(r): i for i, r in enumerate(requests)}
        rows: list[dict | None] = [None] * len(batch)

        def run(units: list[list[Request]]) -> Iterator[Done]:  # the batch as one run: a slot per row
            requests = [r for u in units for r in u]
            done = model.generate([r.token_ids for r in requests], [r.params for r in requests], task.logprobs,
                                  run_slots(requests, task.batch_size, task.max_batch_tokens), task.stops)
            yield Done({i: [Result(r, c.token_ids, c.finish_reason, precision)]
                        for i, (r, c) in enumerate(zip(requests, done))}, sum(len(c.token_ids) for c in done))

        for units, outcome, _, _ in split_and_retry(run, [[r] for r in sorted(requests, key=task.policy.sort_key)]):
            if isinstance(outcome, Exception):
                i = index[id(units[0][0])]
                raise RuntimeError(f"example {i} ({_show(batch[i])}): generation failed: "
                                   f"{type(outcome).__name__}: {outcome}") from outcome
            for result in outcome:
                rows[index[id(result.request)]] = task.format(model, result)
        return [PredictionResult(example, row, label) for example, row in zip(batch, rows)]

    def __repr__(self) -> str:
        return f"GPT2ModelHandler({self.model_dir!r})"


def example_request(i: int, example, engine: GPT2Engine, task: Generation) -> Request:
    """The example as a Request; ValueError naming it and what is wrong."""
    if isinstance(example, Mapping):
        row_id, prompt, messages = example.get("id"), example.get("prompt"), example.get(MESSAGES)
        overrides = {k: example[k] for k in FIELDS if k in example}
    elif isinstance(example, list):  # a conversation
        row_id, prompt, messages, overrides = None, None, example, {}
    else:
        row_id, prompt, messages, overrides = None, example, None, {}
    try:
        text, ids = task.prompt(engine, prompt, messages)
        params = task.params(overrides, text if row_id is None else row_id)
        return Request(row_id, text, task.tokens(engine, ids, params), params)
    except ValueError as e:
        raise ValueError(f"example {i} ({_show(example)}): {e}") from None


def _show(example, limit: int = 60) -> str:
    text = repr(example)
    return text if len(text) <= limit else text[:limit - 3] + "..."
