"""A model directory's manifest and integrity: format, files and their sha256, the op allowlist. No TensorFlow.

A model directory is untrusted input: before anything is imported, every file listed in the manifest must sit
inside the directory (no `..`, no symlink leading out), match its sha256, and a graph (and every function in its
library) may hold only allowlisted ops: pure math, shapes, control flow and read-only weights; no file, network,
Python or other I/O ops. Weights are read from safetensors, never unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

FORMAT = "gpt2-tf-generation-graph"
FORMAT_VERSION = 9  # 3: one graph per precision, weights bound at load by default; 4: continuous batching;
# 5: right-padded inputs, left-aligned cache rows, batch-invariant bfloat16; 6: weight placeholders of unknown shape
# (the loader checks shapes against the config), weights.safetensors contiguous and hashed as it is bound;
# 7: the KV cache is an input (CACHE_INPUT); 8: int8 weights (out, in) through _QuantizedMatMul, and an int8 graph
# with a bfloat16 cache; 9: a run in parts (the decode loop's STATE in and out, a deadline)
MANIFEST = "manifest.json"
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# Graphs by key: one per precision, and int8 weights with a bfloat16 KV cache and attention for CPUs with bfloat16
# units (lmgraph.device.graph_key): a float32 cache reads twice the bytes each step.
INT8_BF16_CACHE = "int8+bfloat16_cache"
GRAPH_KEYS = (*PRECISIONS, INT8_BF16_CACHE)

# Graph inputs: name -> (dtype, shape). Per-row sampling parameters make one batch mix greedy and sampled rows.
INPUTS = {
    "input_ids": ("int32", [None, None]),  # (B, T) right padded
    "input_lengths": ("int32", [None]),  # (B,) real tokens per row, >= 1
    "prompt_index": ("int32", [None]),  # (R,) the prompt each output row continues
    "want_logprobs": ("bool", []),  # compute each token's log-probability (else zeros)
    # the part ends at the first loop iteration that ends at or past it (seconds since the epoch; inf: never)
    "deadline": ("float64", []),
    "stop_pattern": ("string", []),  # RE2 pattern a row's text fully matches once it holds a stop string; "" = none
    # the rest are per output row: the SamplingParams fields, in their order
    "max_new_tokens": ("int32", [None]),
    "temperature": ("float32", [None]),  # 0 = greedy
    "top_k": ("int32", [None]),  # 0 = off
    "top_p": ("float32", [None]),  # 1 = off
    "seed": ("int64", [None]),
    "ignore_eos": ("bool", [None]),  # go on past end-of-text (fixed-length benchmarks)
}
# The run's KV cache, written in place: (at least n_layer x 2 x n_head x S x L rows, head_size), zeros, in the
# graph's cache dtype (so not in INPUTS: its dtype is the precision's). Fed by the loader from a buffer of its own.
CACHE_INPUT = "cache_buffer"
# The decode loop's state but its cache (lmgraph.model.LoopState), fed in and returned as `<name>_out` (OUTPUTS):
# a run is decoded in parts, each a Session.run that goes on where the last one stopped (lmgraph.loader.Run).
# S slots (their number is the length of the slot_ tensors), R requests, N = the largest max_new_tokens.
STATE = {
    "slot_request": ("int32", [None]),  # (S,) the request in the slot (R: none)
    "slot_step": ("int32", [None]),  # (S,) its own step whose token it chose last
    "slot_token": ("int32", [None]),  # (S,) that token
    "slot_done": ("bool", [None]),  # (S,) the row has ended, or the slot is empty
    "slot_n_new": ("int32", [None]),  # (S,) tokens it has emitted
    "slot_text": ("string", [None]),  # (S,) its bytes so far (with stop strings)
    "next_request": ("int32", []),  # the first request not yet admitted
    "out_tokens": ("int32", [None]),  # (R*N + 1,) request r's token of step k at r*N + k
    "out_logprobs": ("float32", [None]),  # (R*N + 1,)
    "out_lengths": ("int32", [None]),  # (R + 1,) tokens emitted, once the request has ended
    "out_finish": ("int32", [None]),  # (R + 1,) why it ended (lmgraph.model's codes; UNFINISHED until then)
}
OUTPUTS = [f"{name}_out" for name in STATE]
LENGTH, END_OF_TEXT, STOP_STRING = 0, 1, 2  # out_finish: why a row ended
UNFINISHED = -1  # out_finish of a row that has not ended (yet)
# The same graph scores given text (lmgraph.model.score), sharing the weights: its own inputs and output.
SCORE_INPUTS = {"score_ids": ("int32", [None, None]), "score_lengths": ("int32", [None])}  # (B, T) right padded
SCORE_OUTPUTS = ["token_logprobs"]  # (B, T) log p(token | tokens before it)

# Every op our exporter emits, and nothing that touches the outside world.
ALLOWED_OPS = frozenset("""
    Abs AddN AddV2 All Any ArgMax AssignVariableOp BatchMatMulV2 BiasAdd Bitcast BitwiseAnd BitwiseOr BitwiseXor
    BroadcastTo Cast ConcatV2 Const Cumsum DivNoNan Enter Equal Exit Exp ExpandDims Fill FloorDiv GatherV2 Greater
    GreaterEqual Identity IdentityN InplaceUpdate LeftShift Less LessEqual Log LogSoftmax LogicalAnd LogicalNot
    LogicalOr LoopCond MatMul Max Maximum Mean Merge Min Minimum Mul Neg NextIteration NoOp Pack Pad PadV2
    Placeholder Pow Prod Range ReadVariableOp RealDiv Reshape RightShift Rsqrt Select SelectV2 Shape Sigmoid Slice
    Snapshot Softmax Split SplitV Sqrt Square SquaredDifference Squeeze StopGradient StridedSlice Sub Sum Switch Tanh
    TensorListConcatV2 TensorListFromTensor TensorListGather TensorListGetItem TensorListLength TensorListReserve
    TensorListSetItem TensorListStack TopKV2 Transpose Unpack VarHandleOp Where ZerosLike
    _QuantizedMatMul RegexFullMatch Round Size StringJoin StringLength TensorScatterUpdate Tile Unique Timestamp
""".split())


class ModelError(ValueError):
    """A model directory that must not or cannot be loaded, with the reason."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_manifest(manifest, source: str) -> dict:
    """The parsed manifest if its format and version are ones this loader reads, and its file names are safe."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{source}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{source}: format_version {version!r} is newer than this loader supports "
                         f"({FORMAT_VERSION}); upgrade the package that runs the pipeline")
    if version < FORMAT_VERSION:
        raise ModelError(f"{source}: format_version {version} was written by an older exporter; export the "
                         f"checkpoint again with `python -m pipeline.export`")
    files = manifest.get("files")
    graphs = manifest.get("graphs")
    if not isinstance(files, dict) or not isinstance(graphs, dict) or not graphs:
        raise ModelError(f"{source}: manifest lists no files or no graphs")
    for name in files:
        parts = PurePosixPath(name).parts
        if not name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in parts or name == MANIFEST:
            raise ModelError(f"{source}: manifest file {name!r} points outside the model directory")
    for key, name in graphs.items():
        if key not in GRAPH_KEYS or name not in files:
            raise ModelError(f"{source}: graph {key!r} -> {name!r} is not a known precision with a listed file")
    return manifest


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ModelError(f"{model_dir}: no manifest.json (is this a directory written by `python -m pipeline.export`?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    return check_manifest(manifest, str(path))


def verify_files(model_dir: str | Path, manifest: dict, hashed_by_caller: frozenset[str] = frozenset()) -> None:
    """Every listed file is a regular file inside model_dir and matches its sha256, except that the sha256 of the
    files in `hashed_by_caller` is left to the caller, who hashes them as it reads them (check_digest)."""
    root = Path(model_dir).resolve()
    for name, digest in manifest["files"].items():
        path = root / name
        if not path.resolve().is_relative_to(root):
            raise ModelError(f"{model_dir}: {name} is a symlink leading outside the model directory")
        if not path.is_file():
            raise ModelError(f"{model_dir}: {name} is listed in the manifest but missing")
        if name not in hashed_by_caller:
            check_digest(model_dir, name, sha256_file(path), manifest)


def check_digest(model_dir: str | Path, name: str, digest: str, manifest: dict) -> None:
    if digest != manifest["files"][name]:
        raise ModelError(f"{model_dir}: {name} does not match its sha256 in the manifest (corrupt or tampered)")


def model_label(manifest: dict) -> str:
    """name@12 hex digits that change with any file of the model (graphs, weights, vocabulary)."""
    digest = hashlib.sha256(json.dumps(sorted(manifest["files"].items())).encode()).hexdigest()
    return f"{manifest['name']}@{digest[:12]}"


def graph_ops(graph_def) -> set[str]:
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def check_ops(graph_def, source: str) -> None:
    bad = graph_ops(graph_def) - ALLOWED_OPS
    if bad:
        raise ModelError(f"{source}: graph holds ops outside the allowlist: {sorted(bad)}; refusing to load it")
