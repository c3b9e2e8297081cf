"""What we are measured against, on the same weights: Hugging Face `generate`, and the naive Session.run recipe."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from lmgraph import model as gmodel
from lmgraph.checkpoint import Weights
from lmgraph.config import EOT_TOKEN, ModelConfig


class HuggingFace:
    """transformers' GPT2LMHeadModel.generate (PyTorch CPU, KV cache on), greedy, fixed length, in float32 or
    bfloat16 (the whole model cast, as `from_pretrained(..., dtype=torch.bfloat16)` gives)."""

    def __init__(self, hf_dir: str | Path, threads: int, precision: str = "float32"):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).to(getattr(torch, precision)).eval()

    def seconds(self, prompts: np.ndarray, n: int) -> float:
        """Wall time to generate n tokens for each row of prompts (B, T), all of length T."""
        ids = self.torch.from_numpy(prompts.astype(np.int64))
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=EOT_TOKEN)
        elapsed = time.perf_counter() - start
        assert out.shape == (len(prompts), prompts.shape[1] + n), out.shape
        return elapsed


class NaiveSession:
    """The usual tf.Session recipe: no KV cache, one full forward `Session.run` per new token, argmax on the host.

    It is given our own forward pass (which skips the LM head at prompt positions): a stronger baseline than the
    textbook one, which computes logits at every position.
    """

    def __init__(self, cfg: ModelConfig, weights: Weights, threads: int):
        from lmgraph.device import session_config

        self.graph = tf.Graph()
        with self.graph.as_default():
            params = gmodel.graph_params(weights, cfg)
            self.ids = tf.compat.v1.placeholder(tf.int32, [None, None])
            B, T = tf.shape(self.ids)[0], tf.shape(self.ids)[1]
            self.logits, _ = gmodel.prefill(params, cfg, self.ids, tf.fill([B], T))
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config(threads))

    def step_seconds(self, ids: np.ndarray) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        logits = self.session.run(self.logits, {self.ids: ids})
        return time.perf_counter() - start, logits.argmax(-1)

    def seconds(self, prompts: np.ndarray, n: int, sampled_steps: int | None = None) -> float:
        """Wall time for n new tokens. With sampled_steps, only that many steps (spread over the n, each on a
        sequence of its true length) are run, and the total is their linear interpolation: a step's cost grows
        with the sequence, and running all n on 124M would take minutes."""
        self.step_seconds(prompts)  # warm-up: Grappler and kernel selection at the first run
        steps = range(n) if sampled_steps is None else np.unique(np.linspace(0, n - 1, sampled_steps).astype(int))
        ids, times = prompts, {}
        for i in range(n):
            if i in steps:
                times[i], token = self.step_seconds(ids)
            else:
                token = np.full(len(ids), EOT_TOKEN)  # unmeasured step: only the sequence length matters
            ids = np.concatenate([ids, token[:, None].astype(np.int32)], axis=1)
        known = sorted(times)
        return float(np.interp(np.arange(n), known, [times[i] for i in known]).sum())

    def close(self) -> None:
        self.session.close()
