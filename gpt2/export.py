"""Export a GPT-2 checkpoint to a model directory: the generation graph, frozen and optimised, plus a manifest.

MODEL_DIR/
  model.pb            GraphDef of `gpt2.model.generate` with the weights as constants ("frozen"), or, when the
                      weights do not fit protobuf's 2 GB cap, with read-only variables bound at load ("external")
  weights.safetensors only for "external": the weights, read without pickle
  encoder.json, vocab.bpe   the tokenizer
  manifest.json       format version, hyperparameters, dtype, tensor names, sha256 of every file, source

Grappler runs here with device-independent passes only (constant folding, arithmetic, dependency, loop and
function optimisation); device-specific fusions (remapper, layout) run at load time on the worker's own device,
so one export serves CPU and GPU workers.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from gpt2 import model
from gpt2.checkpoint import Weights
from gpt2.config import GPT2Config
from gpt2.tokenizer import find_vocab_files

FORMAT = "gpt2-tf-generation-graph"
FORMAT_VERSION = 2  # 2: input ignore_eos
PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB cap, less room for the graph itself
DTYPES = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}
EXPORT_PASSES = ["pruning", "function", "constfold", "shape", "arithmetic", "dependency", "loop"]

# Graph inputs: name -> (dtype, shape). Per-row sampling parameters make one batch mix greedy and sampled rows.
INPUTS = {
    "input_ids": (tf.int32, [None, None]),  # (B, T) left padded
    "input_lengths": (tf.int32, [None]),  # (B,) real tokens per row, >= 1
    "max_new_tokens": (tf.int32, [None]),
    "temperature": (tf.float32, [None]),  # 0 = greedy
    "top_k": (tf.int32, [None]),  # 0 = off
    "top_p": (tf.float32, [None]),  # 1 = off
    "seed": (tf.int64, [None]),
    "ignore_eos": (tf.bool, [None]),  # go on past end-of-text (fixed-length benchmarks)
}
OUTPUTS = ["tokens", "lengths", "finish_reason", "logprobs"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_matrix(name: str) -> bool:
    """Matrices take the export dtype; vectors (norms, biases) and wpe stay float32, they are tiny."""
    return name == "wte" or name.endswith("/w")


def build_graph(cfg: GPT2Config, weights: Weights, dtype: str) -> tuple[tf.Graph, dict[str, np.ndarray]]:
    """The generation graph with one resource variable per weight, initialised from placeholders by op `init`.

    Returns the graph and the init feed {placeholder name: array}.
    """
    graph = tf.Graph()
    feeds = {}
    with graph.as_default():
        inputs = {name: tf.compat.v1.placeholder(dt, shape, name=name) for name, (dt, shape) in INPUTS.items()}
        params = {}
        with tf.name_scope("weights"):
            for name, w in weights.items():
                dt = DTYPES[dtype] if is_matrix(name) else tf.float32
                ph = tf.compat.v1.placeholder(dt, w.shape, name=f"{name}/init_value")
                var = tf.compat.v1.get_variable(f"weights/{name}", initializer=ph, use_resource=True,
                                                trainable=False)
                feeds[ph.name] = w.astype(dt.as_numpy_dtype)
                params[name] = var.read_value()
        outputs = model.generate(params, cfg, inputs["input_ids"], inputs["input_lengths"],
                                 inputs["max_new_tokens"], inputs["temperature"], inputs["top_k"],
                                 inputs["top_p"], inputs["seed"], inputs["ignore_eos"])
        for name in OUTPUTS:
            tf.identity(outputs[name], name=name)
        tf.group(*[v.initializer for v in tf.compat.v1.global_variables()], name="init")
    return graph, feeds


def optimize(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Grappler's device-independent inference passes on a frozen graph."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
    from tensorflow.python.grappler import tf_optimizer

    meta = meta_graph_pb2.MetaGraphDef(graph_def=graph_def)
    meta.collection_def["train_op"].node_list.value.extend(outputs)  # Grappler keeps what this collection fetches
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.optimizers.extend(EXPORT_PASSES)
    rewrite.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(config, meta)


def export(cfg: GPT2Config, weights: Weights, output_dir: str | Path, vocab_dir: str | Path, *,
           dtype: str = "float32", weights_mode: str = "auto", source: dict | None = None,
           name: str = "gpt2") -> dict:
    """Write a model directory; returns its manifest. weights_mode: auto | frozen | external."""
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    weight_bytes = sum(w.size * (bytes_per if is_matrix(n) else 4) for n, w in weights.items())
    if weights_mode == "auto":
        weights_mode = "frozen" if weight_bytes < PROTO_LIMIT else "external"
    if weights_mode == "frozen" and weight_bytes >= PROTO_LIMIT:
        raise ValueError(f"{weight_bytes / 1e9:.2f} GB of {dtype} weights cannot be frozen into one protobuf "
                         "(2 GB cap): use --weights external, or --dtype float16")

    graph, feeds = build_graph(cfg, weights, dtype)
    with tf.compat.v1.Session(graph=graph) as sess:
        if weights_mode == "frozen":
            from tensorflow.python.framework.convert_to_constants import (
                convert_variables_to_constants_from_session_graph)

            sess.run("init", feed_dict=feeds)
            graph_def = convert_variables_to_constants_from_session_graph(sess, graph.as_graph_def(), OUTPUTS)
        else:
            graph_def = graph.as_graph_def()
    del feeds
    graph_def = optimize(graph_def, OUTPUTS + (["init"] if weights_mode == "external" else []))
    (out / "model.pb").write_bytes(graph_def.SerializeToString())

    files = ["model.pb"]
    weights_info: dict = {"mode": weights_mode}
    if weights_mode == "external":
        from safetensors.numpy import save_file

        # bfloat16 has no numpy dtype in safetensors.numpy: store its raw bits as uint16.
        tensors = {n: (w.astype(DTYPES[dtype].as_numpy_dtype).view(np.uint16) if dtype == "bfloat16" else
                       w.astype(np.float16 if dtype == "float16" else np.float32))
                   if is_matrix(n) else w.astype(np.float32) for n, w in weights.items()}
        save_file(tensors, str(out / "weights.safetensors"))
        files.append("weights.safetensors")
        weights_info.update(file="weights.safetensors", init_op="init",
                            init_feeds={n: f"weights/{n}/init_value:0" for n in weights})
    for f in find_vocab_files(vocab_dir):
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
        "weights": weights_info,
        "inputs": {n: f"{n}:0" for n in INPUTS},
        "outputs": {n: f"{n}:0" for n in OUTPUTS},
        "source": source or {},
        "exporter": {"tensorflow": tf.__version__, "grappler_passes": EXPORT_PASSES,
                     "seconds": round(time.perf_counter() - start, 2)},
        "files": {f: sha256_file(out / f) for f in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
