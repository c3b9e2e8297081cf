"""Export a checkpoint (GPT-2, or the Llama family) to a model directory: generation graphs, one per precision, plus
weights, tokenizer and manifest.

MODEL_DIR/
  model.pb, model-bfloat16.pb, model-float16.pb, model-int8.pb, model-int8-bfloat16-cache.pb
                      GraphDefs of `lmgraph.model.generate` for float32, bfloat16, float16 and int8 weight matrices
                      (int8 with a float32 or a bfloat16 KV cache). The
                      whole generation loop is fixed in the graph; the weights are read-only variables with no
                      gradient or optimizer, bound once at load from weights.safetensors ("external", the default)
  weights.safetensors the weights, float32 (or --dtype), read without pickle and cast at load to the precision run
  encoder.json, vocab.bpe   GPT-2's tokenizer; or the Llama family's tokenizer.json, tokenizer_config.json,
                      chat_template.jinja, special_tokens_map.json (those the checkpoint has)
  manifest.json       format version, hyperparameters, graphs by precision, tensor names, sha256 of every file

`--weights frozen` instead bakes the weights into one graph as constants (one precision, the export dtype). That
is what "frozen" classically means, and it is expensive in TensorFlow: every copy of the GraphDef the runtime makes
on the way to running it (import, the Session's graph, Grappler's working copy, the partitioned graph, the constant
kernels' tensors) carries the weights, so 124M took 25 s to its first result and 8-10 GB of memory for 0.5 GB of
weights (BENCHMARKS.md), against about 2 s and 1.5 GB bound at load.

Grappler runs here with device-independent passes only (constant folding, arithmetic, dependency, loop and
function optimisation); device-specific fusions (remapper, layout) run at load time on the worker's own device,
so one export serves CPU and GPU workers (lmgraph.device.session_config).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import tensorflow as tf

from lmgraph import model, tensorfile
from lmgraph.model import graph_weight, is_matrix
from lmgraph.checkpoint import Weights, expected_shapes
from lmgraph.config import ModelConfig
from lmgraph.manifest import (CACHE_INPUT, FORMAT, FORMAT_VERSION, INPUTS, INT8_BF16_CACHE, OUTPUTS, PRECISIONS,
                           SCORE_INPUTS, SCORE_OUTPUTS, STATE, sha256_file)
from lmgraph.tokenizer import HF_TOKENIZER, HF_TOKENIZER_FILES, GPT2Tokenizer, HFTokenizer, find_vocab_files

PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB cap, less room for the graph itself
DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}
GRAPH_FILES = {"float32": "model.pb", "bfloat16": "model-bfloat16.pb", "float16": "model-float16.pb",
               "int8": "model-int8.pb", INT8_BF16_CACHE: "model-int8-bfloat16-cache.pb"}
# graph key -> (precision, KV cache dtype); None: the weights' dtype (model.matmul_dtype)
GRAPHS = {**{p: (p, None) for p in PRECISIONS}, INT8_BF16_CACHE: ("int8", "bfloat16")}
EXPORT_PASSES = ["pruning", "function", "constfold", "shape", "arithmetic", "dependency", "loop"]


def weight_dtype(name: str, precision: str) -> tf.DType:
    """The dtype a weight is cast to before graph_weight (int8 quantizes from float32)."""
    return DTYPES.get(precision, tf.float32) if is_matrix(name) else tf.float32


def tokenizer_files(cfg: ModelConfig, vocab_dir: str | Path) -> list[Path]:
    """The tokenizer files the model directory gets: GPT-2's vocabulary files (its tokenizer is tiktoken's, even
    where a Hugging Face directory also has a tokenizer.json), or the Llama family's tokenizer.json and its
    companions."""
    if cfg.gpt2:
        return list(find_vocab_files(vocab_dir))
    if not (Path(vocab_dir) / HF_TOKENIZER).is_file():
        raise FileNotFoundError(f"{vocab_dir}: no {HF_TOKENIZER} (the {cfg.family} tokenizer)")
    return [Path(vocab_dir) / f for f in HF_TOKENIZER_FILES if (Path(vocab_dir) / f).is_file()]


def vocabulary_bytes(cfg: ModelConfig, vocab_dir: str | Path) -> list[bytes]:
    """Each token id's bytes (b"" for ids the tokenizer lacks): the graph matches stop strings against them."""
    tok = (GPT2Tokenizer if cfg.gpt2 else HFTokenizer)(vocab_dir)
    return [tok.token_bytes(i) if i < tok.n_vocab else b"" for i in range(cfg.n_vocab)]


def build_graph(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], precision: str, token_bytes: list[bytes],
                stored: str = "float32", cache_dtype: str | None = None) -> tuple[tf.Graph, dict]:
    """The generation graph with one read-only resource variable per weight, each set at load by its own assign
    op from a placeholder of the dtype the weights are stored in; the cast to `precision` is in the graph
    (TensorFlow's Cast runs on every core, numpy's astype to bfloat16 on one: 0.34 s of a 124M load).

    cache_dtype: the KV cache's and attention's dtype, if not the weights' (model.matmul_dtype).
    Returns the graph and {weight name: {"feed": placeholder tensor, "assign": op name}}.
    """
    graph = tf.Graph()
    binding = {}
    with graph.as_default():
        inputs = {name: tf.compat.v1.placeholder(dt, shape, name=name) for name, (dt, shape) in INPUTS.items()}
        params = {}
        with tf.name_scope("weights"):
            for name, shape in shapes.items():
                # No static shape on the placeholder: Grappler (optimize) feeds every placeholder of known shape
                # a zero tensor of that shape, which was the whole model in float32 at export (6.6 GB at 1.5B).
                # The reshape gives the graph its static shape back at no cost (it shares the buffer).
                ph = tf.compat.v1.placeholder(weight_dtype(name, stored), None, name=f"{name}/init_value")
                value = tf.reshape(tf.cast(ph, weight_dtype(name, precision)), shape)
                form = graph_weight(name, value, cfg, precision)
                parts = form if isinstance(form, tuple) else (form,)  # a Transposed or Quantized: their tensors
                variables = [tf.compat.v1.get_variable(f"weights/{name}" + (f"/{i}" if i else ""), initializer=v,
                                                       use_resource=True, trainable=False)
                             for i, v in enumerate(parts)]
                assign = tf.group(*(v.initializer for v in variables), name=f"{name}/assign")
                binding[name] = {"feed": ph.name, "assign": assign.name}
                reads = [v.read_value() for v in variables]
                params[name] = type(form)(*reads) if isinstance(form, tuple) else reads[0]
        params = model.with_rope(params, cfg)
        vocabulary = tf.constant(token_bytes, name="token_bytes")  # (V,) string
        cache = tf.compat.v1.placeholder(cache_dtype or model.matmul_dtype(params), [None, cfg.head_size],
                                         name=CACHE_INPUT)
        state = {name: tf.compat.v1.placeholder(dt, shape, name=name) for name, (dt, shape) in STATE.items()}
        outputs = model.generate(params, cfg, *inputs.values(), token_bytes=vocabulary, cache=cache,  # INPUTS' order
                                 state=state)
        for name in OUTPUTS:
            tf.identity(outputs[name], name=name)
        scoring = {name: tf.compat.v1.placeholder(dt, shape, name=name) for name, (dt, shape) in SCORE_INPUTS.items()}
        tf.identity(model.score(params, cfg, *scoring.values()), name=SCORE_OUTPUTS[0])
    return graph, binding


def optimize(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Grappler's device-independent inference passes."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    meta = meta_graph_pb2.MetaGraphDef(graph_def=graph_def)
    meta.collection_def["train_op"].node_list.value.extend(outputs)  # Grappler keeps what this collection fetches
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers.extend(EXPORT_PASSES)
    rewrite.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(config, meta)


def frozen_graph(cfg: ModelConfig, weights: Weights, precision: str,
                 token_bytes: list[bytes]) -> tf.compat.v1.GraphDef:
    """The same graph with the weights as constants."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_from_session_graph

    graph, binding = build_graph(cfg, {n: w.shape for n, w in weights.items()}, precision, token_bytes, precision)
    with tf.compat.v1.Session(graph=graph) as sess:
        for name, b in binding.items():
            sess.run(b["assign"], {b["feed"]: weights[name].astype(weight_dtype(name, precision).as_numpy_dtype)})
        return convert_variables_to_constants_from_session_graph(sess, graph.as_graph_def(),
                                                                 OUTPUTS + SCORE_OUTPUTS)


def stored_dtype(name: str, dtype: str) -> np.dtype:
    """The numpy dtype weights.safetensors holds a weight in: `dtype` for matrices, float32 for the rest
    (bfloat16 is ml_dtypes', written as safetensors' BF16)."""
    return np.dtype(weight_dtype(name, dtype).as_numpy_dtype)


def write_weights(path: Path, cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype: str) -> None:
    """weights.safetensors, converted and written a tensor at a time as `tensors` yields them."""
    def stored(name: str, w: np.ndarray) -> np.ndarray:
        return w.astype(weight_dtype(name, dtype).as_numpy_dtype, copy=False).view(stored_dtype(name, dtype))

    specs = {n: (stored_dtype(n, dtype), shape) for n, shape in expected_shapes(cfg).items()}
    tensorfile.write(path, specs, ((n, stored(n, w)) for n, w in tensors))


def export(cfg: ModelConfig, weights: Weights | Iterable[tuple[str, np.ndarray]], output_dir: str | Path,
           vocab_dir: str | Path, *, dtype: str = "float32", weights_mode: str = "external",
           source: dict | None = None, name: str = "gpt2") -> dict:
    """Write a model directory; returns its manifest. `weights`: a dict, or (name, float32 array) pairs as
    lmgraph.checkpoint's readers yield them, which the external mode consumes one at a time (an export holds one
    tensor of the model at a time, not the model).

    weights_mode "external" (default): graphs for every precision, weights stored in `dtype` and cast at load.
    "frozen": one graph, the weights as constants in `dtype`.
    """
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, graphs = [], {}
    vocab_files = tokenizer_files(cfg, vocab_dir)
    token_bytes = vocabulary_bytes(cfg, vocab_dir)
    shapes = expected_shapes(cfg)
    tensors = weights.items() if isinstance(weights, dict) else weights
    if weights_mode == "frozen":
        weight_bytes = sum(math.prod(s) * weight_dtype(n, dtype).size for n, s in shapes.items())
        if weight_bytes >= PROTO_LIMIT:
            raise ValueError(f"{weight_bytes / 1e9:.2f} GB of {dtype} weights cannot be frozen into one protobuf "
                             "(2 GB cap): use --weights external (the default)")
        graph_def = optimize(frozen_graph(cfg, dict(tensors), dtype, token_bytes), OUTPUTS + SCORE_OUTPUTS)
        (out / GRAPH_FILES["float32"]).write_bytes(graph_def.SerializeToString())
        files.append(GRAPH_FILES["float32"])
        graphs[dtype] = GRAPH_FILES["float32"]
        weights_info: dict = {"mode": "frozen"}
    elif weights_mode == "external":
        for key, (precision, cache_dtype) in GRAPHS.items():
            graph, binding = build_graph(cfg, shapes, precision, token_bytes, dtype, cache_dtype)  # same op names
            keep = OUTPUTS + SCORE_OUTPUTS + sorted({b["assign"] for b in binding.values()})
            graph_def = optimize(graph.as_graph_def(), keep)
            (out / GRAPH_FILES[key]).write_bytes(graph_def.SerializeToString())
            files.append(GRAPH_FILES[key])
            graphs[key] = GRAPH_FILES[key]
        write_weights(out / "weights.safetensors", cfg, tensors, dtype)
        files.append("weights.safetensors")
        weights_info = {"mode": "external", "file": "weights.safetensors",
                        "dtypes": {n: weight_dtype(n, dtype).name for n in shapes}, "bind": binding}
    else:
        raise ValueError(f"weights_mode must be external or frozen, got {weights_mode!r}")
    for f in vocab_files:
        if f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
        files.append(f.name)

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "random_weights": bool((source or {}).get("random", False)),
        "config": cfg.to_dict(),
        "dtype": dtype,
        "graphs": graphs,
        "weights": weights_info,
        "inputs": {n: f"{n}:0" for n in [*INPUTS, CACHE_INPUT, *STATE]},
        "outputs": {n: f"{n}:0" for n in OUTPUTS},
        "score": {"inputs": {n: f"{n}:0" for n in SCORE_INPUTS}, "outputs": {n: f"{n}:0" for n in SCORE_OUTPUTS}},
        "source": source or {},
        "exporter": {"tensorflow": tf.__version__, "grappler_passes": EXPORT_PASSES,
                     "seconds": round(time.perf_counter() - start, 2)},
        "files": {f: sha256_file(out / f) for f in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
