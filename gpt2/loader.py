"""Load an exported model directory safely and generate with it.

A model directory is untrusted input: before anything is imported, every file listed in the manifest must sit
inside the directory (no `..`, no symlink leading out), match its sha256, and the graph (and every function in
its library) may hold only allowlisted ops: pure math, shapes and control flow; no file, network, Python or
other I/O ops. Weights are never unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt2.config import EOT_TOKEN, GPT2Config
from gpt2.export import FORMAT, FORMAT_VERSION, INPUTS, OUTPUTS, sha256_file

# Every op our exporter emits, and nothing that touches the outside world.
ALLOWED_OPS = frozenset("""
    Abs AddN AddV2 All Any ArgMax AssignVariableOp BatchMatMulV2 BiasAdd Bitcast BitwiseAnd BitwiseOr BitwiseXor
    BroadcastTo Cast ConcatV2 Const Cumsum Enter Equal Exit Exp ExpandDims Fill GatherV2 Greater GreaterEqual
    Identity IdentityN InplaceUpdate LeftShift Less LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr LoopCond
    MatMul Max Maximum Mean Merge Min Minimum Mul Neg NextIteration NoOp Pack Pad PadV2 Placeholder Pow Prod Range
    ReadVariableOp RealDiv Reshape RightShift Rsqrt Select SelectV2 Shape Slice Snapshot Softmax Sqrt Square
    SquaredDifference Squeeze StopGradient StridedSlice Sub Sum Switch Tanh TensorListFromTensor TensorListGather
    TensorListGetItem TensorListLength TensorListReserve TensorListSetItem TensorListStack TopKV2 Transpose Unpack
    VarHandleOp Where ZerosLike
""".split())


class ModelError(ValueError):
    """A model directory that must not or cannot be loaded, with the reason."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    ignore_eos: bool = False  # go on past end-of-text to max_new_tokens (fixed-length benchmarks)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not (isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (np.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.seed, (int, np.integer)) and -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


@dataclasses.dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-text) or "length"


def read_manifest(model_dir: str | Path) -> dict:
    d = Path(model_dir)
    path = d / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{d}: no manifest.json (is this a directory written by `python -m pipeline.export`?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {version!r} is newer than this loader supports "
                         f"({FORMAT_VERSION}); upgrade the package that runs the pipeline")
    if version < FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {version} was written by an older exporter; export the "
                         f"checkpoint again with `python -m pipeline.export`")
    return manifest


def verify_files(model_dir: str | Path, manifest: dict) -> None:
    """Every listed file is a regular file inside model_dir and matches its sha256."""
    root = Path(model_dir).resolve()
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.pb" not in files:
        raise ModelError(f"{model_dir}: manifest lists no files (model.pb missing)")
    for name, digest in files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root):
            raise ModelError(f"{model_dir}: manifest file {name!r} points outside the model directory")
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ModelError(f"{model_dir}: {name} is a symlink leading outside the model directory")
        if not path.is_file():
            raise ModelError(f"{model_dir}: {name} is listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise ModelError(f"{model_dir}: {name} does not match its sha256 in the manifest (corrupt or tampered)")


def graph_ops(graph_def) -> set[str]:
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def check_ops(graph_def, source: str) -> None:
    bad = graph_ops(graph_def) - ALLOWED_OPS
    if bad:
        raise ModelError(f"{source}: graph holds ops outside the allowlist: {sorted(bad)}; refusing to load it")


@dataclasses.dataclass(frozen=True)
class Placement:
    device: str  # what the graph is imported under: "/GPU:0" or "/CPU:0"
    gpu: int | None = None  # the one GPU this process keeps to (gpu_options.visible_device_list); None: TF's default


def select_device(gpus: Sequence[str], slot: int | None = None) -> Placement:
    """Where this process runs the graph, given the GPUs it sees and, on a machine with several, its slot: a GPU
    of its own (which is then its /GPU:0), so that N worker processes on N GPUs hold one Session per GPU."""
    if not gpus:
        return Placement("/CPU:0")
    return Placement("/GPU:0", None if slot is None else slot % len(gpus))


_claimed = []  # lock files held open: a GPU stays claimed as long as this process lives


def claim_gpu(n_gpus: int, lock_dir: str | Path | None = None) -> int:
    """The first of n_gpus GPUs that no other process on this machine has claimed (a non-blocking flock); when
    every one is taken (more processes than GPUs), one chosen by process id."""
    import fcntl
    import tempfile

    lock_dir = Path(lock_dir or tempfile.gettempdir())
    for i in range(n_gpus):
        f = open(lock_dir / f"gpt2-beam-gpu{i}-uid{os.getuid()}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _claimed.append(f)
        return i
    return os.getpid() % n_gpus


_placement: Placement | None = None
_placement_lock = threading.Lock()


def process_placement() -> Placement:
    """This process's placement, chosen once: every Session of a process must see the same GPUs."""
    global _placement
    with _placement_lock:
        if _placement is None:
            import tensorflow as tf

            gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
            _placement = select_device(gpus, claim_gpu(len(gpus)) if len(gpus) > 1 else None)
        return _placement


def session_config(intra_threads: int | None = None, inter_threads: int = 2, placement: Placement | None = None):
    import tensorflow as tf

    placement = placement or process_placement()
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=intra_threads or os.cpu_count() or 1,
        inter_op_parallelism_threads=inter_threads,
        allow_soft_placement=True)  # ops without a GPU kernel (if any) run on the CPU instead of failing
    config.gpu_options.allow_growth = True  # share the GPU with other processes instead of grabbing it all
    # The exporter already ran Grappler's device-independent passes; running them again at the first
    # Session.run on a graph holding the weights as constants doubled the load time of 124M (BENCHMARKS.md).
    # The device-specific ones (remapper fusions, layout) still run here, on the worker's own device.
    rewrite = config.graph_options.rewrite_options
    for name in ("constant_folding", "arithmetic_optimization", "dependency_optimization", "loop_optimization",
                 "function_optimization", "shape_optimization", "common_subgraph_elimination", "debug_stripper"):
        setattr(rewrite, name, rewrite.OFF)
    if placement.gpu is not None:
        config.gpu_options.visible_device_list = str(placement.gpu)
    return config


class GenerationModel:
    """A verified model in its own tf.compat.v1.Session; `generate` is safe to call from many threads."""

    def __init__(self, model_dir: str | Path, *, intra_threads: int | None = None, warm_up: bool = True):
        import tensorflow as tf

        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(model_dir)
        verify_files(model_dir, self.manifest)
        self.config = GPT2Config.from_dict(self.manifest["config"])
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((self.model_dir / "model.pb").read_bytes())
        check_ops(graph_def, str(self.model_dir / "model.pb"))

        self.graph = tf.Graph()
        with self.graph.as_default(), tf.device(process_placement().device):
            tf.compat.v1.import_graph_def(graph_def, name="")
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config(intra_threads))
        # Close the Session when the model is garbage-collected (e.g. the last DoFn holding it torn down).
        self._close_session = weakref.finalize(self, self.session.close)
        weights = self.manifest["weights"]
        if weights["mode"] == "external":
            self._bind_weights(weights)
        io = self.manifest["inputs"], self.manifest["outputs"]
        self._run = self.session.make_callable([io[1][n] for n in OUTPUTS], feed_list=[io[0][n] for n in INPUTS])
        self.name = f"{self.manifest['name']}@{self.manifest['files']['model.pb'][:12]}"
        self._lock = threading.Lock()
        if warm_up:  # Grappler and kernel selection run at the first Session.run: pay for them in setup
            self.generate([[EOT_TOKEN]], SamplingParams(max_new_tokens=2))

    def _bind_weights(self, info: dict) -> None:
        from safetensors.numpy import load_file
        import tensorflow as tf

        tensors = load_file(str(self.model_dir / info["file"]))
        feeds = {}
        for name, placeholder in info["init_feeds"].items():
            t = self.graph.get_tensor_by_name(placeholder)
            value = tensors[name]
            feeds[t] = value.view(tf.bfloat16.as_numpy_dtype) if t.dtype == tf.bfloat16 else value
        self.session.run(info["init_op"], feed_dict=feeds)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Complete each prompt (a non-empty list of token ids) in one Session.run."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        for row, (ids, p) in enumerate(zip(prompts, params)):
            p.validate()
            if not ids:
                raise ValueError(f"row {row}: empty prompt (GPT-2 needs at least one token)")
            if len(ids) + p.max_new_tokens > self.config.n_ctx:
                raise ValueError(f"row {row}: {len(ids)} prompt tokens + {p.max_new_tokens} new tokens exceed "
                                 f"the model context of {self.config.n_ctx}")
        lengths = np.array([len(ids) for ids in prompts], np.int32)
        batch = np.full((len(prompts), lengths.max()), EOT_TOKEN, np.int32)
        for row, ids in enumerate(prompts):
            batch[row, batch.shape[1] - len(ids):] = ids  # left padding
        tokens, n_new, finish, logprobs = self._run(
            batch, lengths,
            np.array([p.max_new_tokens for p in params], np.int32),
            np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array([p.seed for p in params], np.int64),
            np.array([p.ignore_eos for p in params], bool))
        return [Completion(tokens[r, :n].tolist(), logprobs[r, :n].tolist(), "stop" if finish[r] else "length")
                for r, n in enumerate(n_new)]

    def close(self) -> None:
        with self._lock:
            if self.session is not None:
                self._close_session()
                self.session = None
