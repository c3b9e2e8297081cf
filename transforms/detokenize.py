"""Result -> output row: decode the completion and apply stop strings."""
from __future__ import annotations

import apache_beam as beam

from transforms.records import Result
from transforms.resources import shared_tokenizer


def apply_stop(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[str, list[int], bool]:
    """(text, token ids, stopped): the text cut before the first stop string, and the tokens whose decoding
    lies within that text. Without a stop string, everything unchanged."""
    text = tokenizer.decode(token_ids)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return text, token_ids, False
    text = text[:cut]
    n = len(token_ids)
    while n and not text.startswith(tokenizer.decode(token_ids[:n])):
        n -= 1
    return text, token_ids[:n], True


class Detokenize(beam.DoFn):
    def __init__(self, model_dir: str, model_label: str, stops: list[str] | None = None):
        self.tokenizer = shared_tokenizer(model_dir)
        self.model_label, self.stops = model_label, list(stops or [])

    def setup(self):
        self._tok = self.tokenizer.get()

    def teardown(self):
        self._tok = None  # the last reference going frees the shared tokenizer

    def process(self, result: Result):
        r = result.request
        text, ids, stopped = apply_stop(self._tok, result.token_ids, self.stops)
        yield {
            "id": r.id, "prompt": r.prompt, "completion": text, "completion_token_ids": ids,
            "prompt_tokens": len(r.token_ids), "completion_tokens": len(ids),
            "finish_reason": "stop" if stopped else result.finish_reason, "model": self.model_label,
            "precision": result.precision,
            "source": r.source, "row_index": r.row_index,
        }
