"""Where a decode step's time goes: the engine's step against the same matmuls run alone in TensorFlow.

    python -m bench.step --model_dir MODEL_DIR [--batches 1 8 64] [--precision auto|float32|bfloat16]

The engine's step time is the difference of two runs that differ only in new tokens (so prefill cancels), over
the steps between them. The kernel floor is one step's matrices (four per layer in the model's shapes, then the LM head) multiplied in
a bare TensorFlow graph by a (B, C) input, in the model's precision, with the weights in read-only variables as
in the engine (constants would let oneDNN cache a reordered copy, which the engine cannot have): what
TensorFlow's own kernels need for the step's weights, with no attention, norms, sampling or loop. The engine cannot beat that floor without faster kernels; the gap above it is
everything else in a step. Both sides run alternately in this process, so the machine's noise hits both.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from lmgraph.loader import GenerationModel
from lmgraph.sampling import SamplingParams


def kernel_floor(model: GenerationModel, B: int) -> tuple[Callable[[], object], int]:
    """A callable running one step's weight matmuls at batch B, and the bytes of weights it reads."""
    cfg = model.config
    C, V, F = cfg.n_embd, cfg.n_vocab, cfg.mlp_width
    rng = np.random.default_rng(0)
    # c_attn (q, k, v), attn c_proj, mlp c_fc (SwiGLU's gate and up side by side), mlp c_proj
    layer = [(C, C + 2 * cfg.kv_width), (C, C), (C, F if cfg.gpt2 else 2 * F), (F, C)]
    shapes = layer * cfg.n_layer + [(C, V)]  # then the LM head
    dtype = tf.as_dtype(model.precision)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(dtype, (B, C))
        h = tf.compat.v1.placeholder(dtype, (B, F))
        # The engine's layout: (in, out) in float32, (out, in) with transpose_b otherwise (lmgraph.model.Transposed).
        flip = model.precision != "float32"
        weights = [tf.compat.v1.get_variable(f"w{i}", initializer=rng.standard_normal(s[::-1] if flip else s)
                                             .astype(dtype.as_numpy_dtype), use_resource=True, trainable=False)
                   for i, s in enumerate(shapes)]
        total = tf.add_n([tf.reduce_sum(tf.cast(tf.matmul(x if k == C else h, w, transpose_b=flip), tf.float32))
                          for (k, _), w in zip(shapes, weights)])
        init = tf.compat.v1.global_variables_initializer()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=os.cpu_count() or 1,
                                      inter_op_parallelism_threads=2)
    config.graph_options.rewrite_options.disable_meta_optimizer = True  # no merging of the repeated shapes
    session = tf.compat.v1.Session(graph=graph, config=config)
    session.run(init)
    run = session.make_callable(total, [x, h])
    xs, hs = (np.ones(s, dtype.as_numpy_dtype) for s in ((B, C), (B, F)))
    return (lambda: run(xs, hs)), dtype.size * sum(k * n for k, n in shapes)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="an exported model (python -m pipeline.export ...)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=48, help="decode steps between the two engine runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)

    model = GenerationModel(args.model_dir, precision=args.precision)
    if model.precision == "int8":
        p.error("the kernel floor is plain matmuls in the model's float precision: run float32 or bfloat16")
    print(f"precision {model.precision}")
    rng = np.random.default_rng(0)
    print("| batch | engine ms/step | kernel floor ms/step | floor GB/s | engine / floor |")
    print("|---:|---:|---:|---:|---:|")
    for B in args.batches:
        prompts = rng.integers(0, 50000, (B, args.prompt)).tolist()
        short, long = (SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 8 + args.steps))
        floor, nbytes = kernel_floor(model, B)
        engine_steps, floors = [], []
        for run in (lambda: model.generate(prompts, short), lambda: model.generate(prompts, long), floor):
            run()  # warm-up
        for _ in range(args.repeats):  # alternate the sides so noise hits both
            engine_steps.append((seconds(lambda: model.generate(prompts, long))
                                 - seconds(lambda: model.generate(prompts, short))) / args.steps)
            floors.append(seconds(floor))
        step, fl = np.median(engine_steps), np.median(floors)
        print(f"| {B} | {step * 1e3:.1f} | {fl * 1e3:.1f} | {nbytes / fl / 1e9:.1f} | {step / fl:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
