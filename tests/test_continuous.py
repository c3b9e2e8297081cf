"""Continuous batching: more rows than slots, a row that ends frees its slot for the next, all in one run.
A row's output must be what it gets alone, whatever its neighbours, slot count and arrival order; stop strings
end rows in the graph with the output the cut after generation gives."""
from __future__ import annotations

import numpy as np
import pytest

from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import Tokenizer, default_vocab_dir
from tests.test_invariance import needs_bf16_units
from transforms.detokenize import apply_stop


def ragged_rows(n: int, seed: int = 11) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1 to 12 tokens, each with its own max_new_tokens (1 to 10), half greedy, half sampled."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 50000, k).tolist() for k in rng.integers(1, 13, n)]
    params = [SamplingParams(max_new_tokens=int(rng.integers(1, 11)), temperature=float(rng.choice([0.0, 0.9])),
                             top_k=int(rng.choice([0, 40])), seed=int(rng.integers(0, 1000))) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("precision", ["model", "bf16_model"], ids=["float32", "bfloat16"])
def test_refilled_slots_give_what_each_row_gets_alone(request, precision):
    needs_bf16_units("bfloat16" if precision == "bf16_model" else "float32")
    model = request.getfixturevalue(precision)
    prompts, params = ragged_rows(24)
    alone = [model.generate([p], [q])[0] for p, q in zip(prompts, params)]
    for slots, order in ((1, range(24)), (3, range(24)), (5, reversed(range(24))), (24, range(24))):
        order = list(order)
        got = model.generate([prompts[i] for i in order], [params[i] for i in order], slots=slots)
        for i, c in zip(order, got):
            assert (c.token_ids, c.finish_reason) == (alone[i].token_ids, alone[i].finish_reason), (slots, i)
            np.testing.assert_allclose(c.logprobs, alone[i].logprobs, atol=1e-5)
            assert len(c.token_ids) == params[i].max_new_tokens  # no end-of-text here: each row its own length


def test_samples_of_one_prompt_across_refills(model):
    """A prompt's samples (one prompt, several seeds) admitted together or apart: each sample as alone."""
    prompt = [464, 3290, 318]
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=s) for n, s in ((3, 1), (9, 2), (5, 3), (7, 4))]
    alone = [model.generate([prompt], [p])[0].token_ids for p in params]
    for slots in (1, 2, 4):
        assert [c.token_ids for c in model.generate([prompt] * 4, params, slots=slots)] == alone
    assert len(set(map(tuple, alone))) > 1  # the samples differ


def stop_rows(model, tokenizer):
    """Greedy prompts and, from the first row's own completion, a stop string that ends it early."""
    prompts = [[464, 3290, 318], [40, 588, 257], [15496, 995, 11], [818, 257, 1295]]
    params = SamplingParams(max_new_tokens=24)
    full = model.generate(prompts, params)
    text = tokenizer.decode(full[0].token_ids)
    return prompts, params, full, text[len(text) // 3: len(text) // 3 + 3]


def test_stop_strings_end_rows_in_the_graph(model):
    tok = Tokenizer(default_vocab_dir())
    prompts, params, full, stop = stop_rows(model, tok)
    assert stop and len(stop) == 3
    for slots in (1, 2, 4):
        stopped = model.generate(prompts, params, slots=slots, stops=[stop, "never-appears"])
        for f, s in zip(full, stopped):
            cut = apply_stop(tok, f.token_ids, [stop])
            assert apply_stop(tok, s.token_ids, [stop]) == cut  # the row as the cut after generation gives it
            if cut[2]:  # the row held the stop: it ended at the token that completed it
                assert stop in tok.decode(s.token_ids) and stop not in tok.decode(s.token_ids[:-1])
                assert s.finish_reason == "stop" and len(s.token_ids) < len(f.token_ids)
            else:
                assert s.token_ids == f.token_ids and s.finish_reason == f.finish_reason
    assert stop in tok.decode(full[0].token_ids)


def test_stop_strings_with_punctuation_and_unicode(model):
    """Stop strings are matched on bytes: regex metacharacters are literal, and a token may end inside a UTF-8
    character."""
    tok = Tokenizer(default_vocab_dir())
    prompts, params, full, _ = stop_rows(model, tok)
    for stop in (".*", "(", "\\", "é", "\n"):
        got = model.generate(prompts, params, stops=[stop])
        for f, s in zip(full, got):
            assert apply_stop(tok, s.token_ids, [stop]) == apply_stop(tok, f.token_ids, [stop]), stop


def test_slots_must_be_positive(model):
    with pytest.raises(ValueError, match="slots must be >= 1"):
        model.generate([[1]], SamplingParams(max_new_tokens=2), slots=0)
