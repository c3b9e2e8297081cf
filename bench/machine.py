"""What this machine can do, measured, and the best tokens/s that allows for a generation job (a roofline).

A job's least time is the larger of its arithmetic at the measured fp32 matmul rate and its memory traffic at
the measured bandwidth (perfect overlap, no other cost): no engine can beat it on this machine.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from lmgraph.config import ModelConfig
from lmgraph.device import VECTOR_FLAGS, cpu_flags, cpu_name


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 (n, n) @ (n, n) on the threads TensorFlow was given."""
    a = tf.constant(np.random.default_rng(0).standard_normal((n, n), np.float32))
    return 2 * n**3 / _best_seconds(lambda: tf.matmul(a, a).numpy(), repeats) / 1e9


def bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth from DRAM: a sum over an array far larger than any cache."""
    x = tf.ones([mib * 1024 * 1024 // 4], tf.float32)
    return mib * 1024 * 1024 / _best_seconds(lambda: tf.reduce_sum(x).numpy(), repeats) / 1e9


@dataclasses.dataclass(frozen=True)
class Machine:
    gflops: float  # fp32 matmul
    gbs: float  # DRAM read bandwidth

    def limit_tokens_per_s(self, cfg: ModelConfig, B: int, T: int, N: int) -> float:
        """New tokens/s at best for B prompts of T tokens and N new tokens each (greedy, cached decoding)."""
        flops, traffic = job_work(cfg, B, T, N)
        return B * N / max(flops / (self.gflops * 1e9), traffic / (self.gbs * 1e9))


def job_work(cfg: ModelConfig, B: int, T: int, N: int) -> tuple[float, float]:
    """(FLOPs, bytes moved) a cached generation job cannot avoid.

    FLOPs: 2 x weights per token through the layers (prompt and new tokens), 2 x V x C per new token for the LM
    head (none for prompt positions), and attention's 4 x C per cached key per layer. Bytes: every fp32 weight
    read once for the prompt and once per decode step, plus the KV cache read at each step.
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.n_vocab
    body = 12 * C * C * L  # per layer: qkv 3C^2, proj C^2, mlp 8C^2
    ctx = T + np.arange(N)  # keys attended by each new token
    flops = (2 * body * B * T + L * 2 * C * B * T * (T + 1)  # prompt, causal attention
             + B * N * 2 * (body + V * C) + B * L * 4 * C * ctx.sum())  # new tokens
    weights = 4 * (body + V * C)
    traffic = weights * N + 4 * B * L * 2 * C * ctx.sum()
    return float(flops), float(traffic)


def measure() -> Machine:
    return Machine(gflops=matmul_gflops(), gbs=bandwidth_gbs())


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(CPU model name, the lmgraph.device.VECTOR_FLAGS it has, in that order), from /proc/cpuinfo (the first CPU
    listed). Without /proc/cpuinfo (not Linux): platform's processor name and no flags."""
    path = Path(cpuinfo)
    if not path.exists():
        return platform.processor() or platform.machine(), []
    info = path.read_text()
    present = cpu_flags(info)  # less what ONEDNN_MAX_CPU_ISA caps away, and the name says so
    capped = present != cpu_flags(info, max_isa="ALL")
    name = cpu_name(info) + (f" (ISA capped at {os.environ['ONEDNN_MAX_CPU_ISA']})" if capped else "")
    return name, [f for f in VECTOR_FLAGS if f in present]
