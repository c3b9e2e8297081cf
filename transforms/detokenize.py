"""A completion's output row: its text decoded and cut at the first stop string."""
from __future__ import annotations

# The fields of a completion row, in the order of the job's completions schema; with logprobs, `logprobs` follows
# `completion_token_ids` (completion_fields).
COMPLETION_FIELDS = ("id", "prompt", "completion", "completion_token_ids", "prompt_tokens", "completion_tokens",
                     "finish_reason", "model", "precision")


def completion_fields(logprobs: bool = False, samples: bool = False) -> tuple[str, ...]:
    """The fields of a completion row, with or without `logprobs` (after `completion_token_ids`) and `sample`
    (after `id`)."""
    fields = COMPLETION_FIELDS
    if logprobs:
        i = fields.index("completion_token_ids") + 1
        fields = fields[:i] + ("logprobs",) + fields[i:]
    if samples:
        fields = fields[:1] + ("sample",) + fields[1:]
    return fields


def stripped_space(tokenizer, token_ids: list[int]) -> str:
    """" " when decode dropped the space the first token begins with (a SentencePiece decoder does: "▁Paris" alone
    decodes to "Paris"), else "". The graph matched stop strings on the tokens' bytes, space included."""
    if not token_ids:
        return ""
    first = tokenizer.token_bytes(token_ids[0])
    shown = tokenizer.decode(token_ids[:1])
    return " " if first.startswith(b" ") and shown == first.decode("utf-8", "replace")[1:] else ""


def apply_stop(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[str, list[int], bool]:
    """(text, token ids, stopped): the text cut before the first stop string, and the tokens whose decoding
    lies within that text. Without a stop string, everything unchanged. Stop strings are looked for where the graph
    looked: in the text with the space a SentencePiece decoder drops put back (a stop string " Paris" at the very
    start leaves an empty text)."""
    text = tokenizer.decode(token_ids)
    lead = stripped_space(tokenizer, token_ids) if any(stops) else ""
    cut = min((i for i in ((lead + text).find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return text, token_ids, False
    text = text[:max(cut - len(lead), 0)]
    n = len(token_ids)
    while n and not text.startswith(tokenizer.decode(token_ids[:n])):
        n -= 1
    return text, token_ids[:n], True


def completion_row(tokenizer, id, prompt: str, prompt_tokens: int, token_ids: list[int], finish_reason: str,
                   stops: list[str], model_label: str, precision: str, logprobs: list[float] | None = None,
                   sample: int | None = None) -> dict:
    """The output row of one completion (completion_fields); with `logprobs` (one per token id), a `logprobs` field
    cut like the token ids to those wholly inside the completion; with `sample`, a `sample` field after `id`."""
    text, ids, stopped = apply_stop(tokenizer, token_ids, stops)
    row = {"id": id} if sample is None else {"id": id, "sample": sample}
    row.update(prompt=prompt, completion=text, completion_token_ids=ids)
    if logprobs is not None:
        row["logprobs"] = list(logprobs[:len(ids)])
    row.update(prompt_tokens=prompt_tokens, completion_tokens=len(ids),
               finish_reason="stop" if stopped else finish_reason, model=model_label, precision=precision)
    return row
