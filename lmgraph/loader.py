"""The engine: a verified model directory loaded into its own Session, in the precision chosen for this device.

Loading (`GenerationModel(model_dir)`): read and check the manifest, verify every file's sha256, choose the
precision (auto: the fastest the device has, see lmgraph.device), parse that precision's graph and refuse ops outside
the allowlist (lmgraph.manifest), import it on the process's device, bind the weights one tensor at a time from
weights.safetensors (cast to the precision), then warm up: Grappler and kernel selection run at the first
Session.run, so that is paid in setup, not by the first batch.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np

from lmgraph import import_tensorflow, tensorfile
from lmgraph.checkpoint import expected_shapes
from lmgraph.config import ModelConfig
from lmgraph.device import engine_threads, graph_key, process_placement, resolve_precision, session_config
from lmgraph.manifest import (CACHE_INPUT, INPUTS, LENGTH, OUTPUTS, PRECISIONS, SCORE_INPUTS, SCORE_OUTPUTS, STATE,
                              UNFINISHED, ModelError, check_digest, check_ops, model_label, read_manifest,
                              verify_files)
from lmgraph.sampling import FIELDS, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
BIND_GROUP_BYTES = 64 << 20
BIND_SCOPE = "bind"  # where the weights' assigns are imported, apart from the generation graph
SCORE_SCOPE = "score"  # where scoring's nodes are imported on first use (external weights)
# Fewest slots a lane keeps when a CPU runs a run as lanes side by side (GenerationModel.generate_parts): each lane
# reads every weight each step, and below about 32 rows a step is bound by those reads (bfloat16 124M, 2 cores:
# 8 rows 0.93 s in two lanes against 0.79 in one, 64 rows alike, 128 rows 1.25x faster in two).
LANE_SLOTS = 32
LANES_WIDTH = 768  # models up to this n_embd run each op on one thread on a CPU (GenerationModel)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 256 << 10


def map_large_allocations() -> None:
    """Have glibc serve each allocation of MMAP_THRESHOLD bytes or more from a mapping of its own, unmapped when
    freed. By default glibc raises that threshold whenever such a block is freed (up to 32 MiB); past it, oneDNN's
    buffers come from the C heap of the thread that ran the op and stay there once freed. With a batch's parts run
    side by side, one thread each, int8's 124M 1024 x 64 job peaked at 2017 MiB, 1822 with this (bfloat16 1872
    and 1877, the same time). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps freed mid-sized blocks: 0.23 GB after a 124M
    load). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-text) or "length"


def stop_pattern(stops: Sequence[str]) -> bytes:
    """The RE2 pattern the graph matches a row's text (its raw bytes so far) against: it holds one of `stops`.
    b"" for none. \\C matches any byte (a token may end inside a UTF-8 character, which `.` would not match);
    ASCII punctuation is escaped by code, other characters stand for themselves."""
    stops = [s for s in stops if s]
    if not stops:
        return b""
    escape = lambda c: c if c.isalnum() or ord(c) > 127 else f"\\x{{{ord(c):02x}}}"  # noqa: E731
    return ("\\C*(?:" + "|".join("".join(map(escape, s)) for s in stops) + ")\\C*").encode()


def split_rows(prompts: Sequence[Sequence[int]], costs: Sequence[int], lanes: int) -> list[list[int]]:
    """The rows (indices) of each of up to `lanes` lanes: a prompt's rows (its samples) stay in one lane, which
    prefills it once, unless there are fewer distinct prompts than lanes; each lane gets about the same total cost
    (largest first, each to the least loaded lane so far). Each lane's rows are in their given order."""
    blocks: dict[tuple[int, ...], list[int]] = {}
    for row, ids in enumerate(prompts):
        blocks.setdefault(tuple(ids), []).append(row)
    groups = list(blocks.values()) if len(blocks) >= lanes else [[row] for row in range(len(prompts))]
    split: list[list[int]] = [[] for _ in range(min(lanes, len(groups)))]
    load = [0] * len(split)
    for rows in sorted(groups, key=lambda rows: -sum(costs[r] for r in rows)):  # stable: ties in row order
        least = load.index(min(load))
        split[least].extend(rows)
        load[least] += sum(costs[r] for r in rows)
    return [sorted(rows) for rows in split]


def side_by_side(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Each call's result, the first call made in this thread and the others each in a thread of its own
    (Session.run releases the GIL)."""
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(len(calls) - 1) as pool:
        others = [pool.submit(call) for call in calls[1:]]
        results = [calls[0]()] + [f.result() for f in others]
    # The threads each kept what oneDNN freed in their own C heap (int8: 0.1 GiB a run, growing run by run: the
    # 1024 x 64 job peaked at 2139 MiB, against 1874 in one lane); handed back after each call.
    release_free_memory()
    return results


class Part(NamedTuple):
    """What a part of a run did: the completions of the rows that ended in it (by row index) and the tokens it
    generated, those of rows still going included."""
    done: dict[int, Completion]
    tokens: int


def sub_graph(graph_def, outputs: Sequence[str]):
    """The nodes `outputs` need (their inputs, transitively) as a GraphDef of its own: what TensorFlow's
    deprecated extract_sub_graph does, without its warning on every load."""
    nodes = {n.name: n for n in graph_def.node}
    keep: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(i.lstrip("^").split(":")[0] for i in nodes[name].input)
    out = type(graph_def)()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(n for n in graph_def.node if n.name in keep)
    return out


class Lane:
    """A run's rows that one Session.run at a time decodes (`slots` at once), in parts: each `part` goes on from
    the loop state the last one returned (lmgraph.manifest.STATE) and from the KV cache it left in the buffer the
    lane holds until it ends. rows: the rows' indices in the run, which Part.done uses."""

    def __init__(self, model: GenerationModel, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams], logprobs: bool, slots: int, stops: Sequence[str]):
        # Longest first (by max_new_tokens; stable, so a prompt's samples stay together): the graph admits rows in
        # order, so the rows that start last are the shortest and the slots empty together at the end. In arrival
        # order a long row admitted last ran on alone: 0.64x the tokens/s of even rows, 0.90x longest first
        # (BENCHMARKS.md). Rows are independent: the order changes no row's output.
        order = sorted(range(len(prompts)), key=lambda r: -params[r].max_new_tokens)
        self.model, self.rows = model, [rows[r] for r in order]
        prompts, params = [prompts[r] for r in order], [params[r] for r in order]
        distinct: dict[tuple[int, ...], int] = {}  # a prompt given several times (samples) is prefilled once
        prompt_index = np.array([distinct.setdefault(tuple(ids), len(distinct)) for ids in prompts], np.int32)
        lengths = np.array([len(ids) for ids in distinct], np.int32)
        batch = np.full((len(distinct), lengths.max()), model.config.eos_ids[0], np.int32)
        for row, ids in enumerate(distinct):
            batch[row, :len(ids)] = ids  # right padding
        per_row = [np.array([getattr(p, name) for p in params], INPUTS[name][0]) for name in FIELDS]
        self.inputs = [batch, lengths, prompt_index, np.bool_(logprobs), None, stop_pattern(stops), *per_row]
        R, eot = len(prompts), model.config.eos_ids[0]
        self.N = max(max(p.max_new_tokens for p in params), 1)
        S = min(slots, R)
        self.state = {  # empty slots, no request admitted, every row UNFINISHED (lmgraph.model.generate)
            "slot_request": np.full(S, R, np.int32), "slot_step": np.zeros(S, np.int32),
            "slot_token": np.full(S, eot, np.int32), "slot_done": np.ones(S, np.bool_),
            "slot_n_new": np.zeros(S, np.int32), "slot_text": np.full(S, b"", object),
            "next_request": np.int32(0), "out_tokens": np.full(R * self.N + 1, eot, np.int32),
            "out_logprobs": np.zeros(R * self.N + 1, np.float32), "out_lengths": np.zeros(R + 1, np.int32),
            "out_finish": np.full(R + 1, UNFINISHED, np.int32)}
        self.reported = np.zeros(R, np.bool_)  # rows whose completion a part has returned
        self.tokens = 0  # generated so far
        length = max(len(ids) + max(p.max_new_tokens, 1) for ids, p in zip(prompts, params))  # the graph's L
        self.cache: np.ndarray | None = model._cache(S * length)

    @property
    def ended(self) -> bool:
        return bool(self.reported.all())

    def part(self, deadline: float) -> Part:
        """The next part, up to `deadline` (time.time()'s clock)."""
        self.inputs[4] = np.float64(deadline)
        outputs = self.model._run(*self.inputs, self.cache, *self.state.values())
        self.state = dict(zip(STATE, outputs))
        R = len(self.rows)
        finish, lengths = self.state["out_finish"][:R], self.state["out_lengths"][:R]
        ended = finish != UNFINISHED
        tokens = self.state["out_tokens"][:R * self.N].reshape(R, self.N)
        logprobs = self.state["out_logprobs"][:R * self.N].reshape(R, self.N)
        done = {self.rows[r]: Completion(tokens[r, :n].tolist(), logprobs[r, :n].tolist(),
                                         "stop" if finish[r] != LENGTH else "length")
                for r, n in enumerate(lengths) if ended[r] and not self.reported[r]}
        self.reported |= ended
        going = self.state["slot_n_new"][~self.state["slot_done"]]
        generated = int(lengths[ended].sum() + going.sum())
        generated, self.tokens = generated - self.tokens, generated
        return Part(done, generated)

    def close(self) -> None:
        """Hand the cache buffer back to the model for its next run."""
        if self.cache is not None:
            self.model._caches.append(self.cache)
            self.cache = None


class GenerationModel:
    """A verified model in its own tf.compat.v1.Session; `generate` is safe to call from many threads.

    precision: "auto" (the device's fastest: bfloat16 on CPUs with AMX or AVX512-BF16 and on Ampere GPUs,
    float16 on older GPUs, else float32), or "float32" | "bfloat16" | "float16" | "int8" (CPUs only).
    intra_threads: the cores generation uses (default: those the process may run on). On a CPU a call's rows run
    as that many lanes side by side (generate_parts), and up to LANES_WIDTH each op on one thread (lmgraph.device).
    """

    def __init__(self, model_dir: str | Path, *, precision: str = "auto", intra_threads: int | None = None,
                 warm_up: bool = True):
        tf = import_tensorflow()
        map_large_allocations()

        start = time.perf_counter()
        self.load_breakdown: dict[str, float] = {}  # seconds per stage of the load (bench.sizes reports them)

        def stage_done(name: str) -> None:
            self.load_breakdown[name] = time.perf_counter() - start - sum(self.load_breakdown.values())

        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(model_dir)
        weights_file = self.manifest["weights"].get("file")
        if self.manifest["weights"]["mode"] == "external" and weights_file not in self.manifest["files"]:
            raise ModelError(f"{model_dir}: the weights file {weights_file!r} is not among the manifest's files")
        # The weights' sha256 is checked as they are bound (one read of the file, hashed beside TensorFlow's work)
        verify_files(model_dir, self.manifest, hashed_by_caller=frozenset({weights_file} - {None}))
        stage_done("verify")
        self.config = ModelConfig.from_dict(self.manifest["config"])
        placement = process_placement()
        try:
            self.precision, why = resolve_precision(
                precision, [g for g in self.manifest["graphs"] if g in PRECISIONS], placement)
        except ValueError as e:
            raise ModelError(f"{model_dir}: {e}") from None
        self.graph_key = graph_key(self.precision, self.manifest["graphs"])
        graph_file = self.model_dir / self.manifest["graphs"][self.graph_key]
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(graph_file.read_bytes())
        check_ops(graph_def, str(graph_file))

        stage_done("graph")

        self.graph = tf.Graph()
        # On a CPU a call's rows run as a lane per core side by side (generate_parts). At widths up to LANES_WIDTH
        # (124M) the pipeline's runs hold enough slots for two lanes or more (transforms.batching: 128 slots at
        # 124M, at most ~35 above), and each op then runs on one thread; wider models keep every core on each op.
        one_thread_ops = placement.device.startswith("/CPU") and self.config.n_embd <= LANES_WIDTH
        self.session = tf.compat.v1.Session(graph=self.graph,
                                            config=session_config(intra_threads, placement, one_thread_ops))
        self._lanes = engine_threads(intra_threads) if placement.device.startswith("/CPU") else 1
        # Close the Session when the model is garbage-collected (e.g. the last DoFn holding it torn down).
        self._close_session = weakref.finalize(self, self.session.close)
        if self.manifest["weights"]["mode"] == "external":
            # Bound before the generation graph is imported, in a graph of their assigns alone: each Session.run
            # with new feeds and fetches prunes the whole graph, which at 1.5B (46k nodes, 73 groups) was half
            # the load. The generation graph imported next finds the variables by their shared names.
            assigns = sorted({b["assign"] for b in self.manifest["weights"]["bind"].values()})
            with self.graph.as_default(), tf.device(placement.device):
                tf.compat.v1.import_graph_def(sub_graph(graph_def, assigns),
                                              name=BIND_SCOPE)
            self._bind_weights(self.manifest["weights"])
            stage_done("bind")
        io, scoring = (self.manifest["inputs"], self.manifest["outputs"]), self.manifest["score"]
        self._device = placement.device
        if self.manifest["weights"]["mode"] == "external":
            # Generation's nodes alone (35k of 50k at 1.5B): the weights' assigns are in BIND_SCOPE already, and
            # scoring's nodes are imported on the first score() (`_scoring`), in a scope of their own that
            # finds the same variables by their shared names. Each imported node costs memory twice (the Graph
            # and the Session's copy of it) for as long as the worker lives.
            generation = sub_graph(graph_def, [name.split(":")[0] for name in io[1].values()])
            self._scoring_graph: bytes | None = sub_graph(
                graph_def, [name.split(":")[0] for name in scoring["outputs"].values()]).SerializeToString()
        else:  # frozen: the weights are constants both share, imported once
            generation, self._scoring_graph = graph_def, None
        with self.graph.as_default(), tf.device(placement.device):
            tf.compat.v1.import_graph_def(generation, name="")
        del graph_def, generation
        stage_done("import")
        self._run = self.session.make_callable([io[1][n] for n in OUTPUTS],
                                               feed_list=[io[0][n] for n in [*INPUTS, CACHE_INPUT, *STATE]])
        self._cache_dtype = self.graph.get_tensor_by_name(io[0][CACHE_INPUT]).dtype.as_numpy_dtype
        self._caches: list[np.ndarray] = []  # KV cache buffers between runs (one per concurrent run)
        self._score = None if self._scoring_graph else self._scoring_callable("")
        self.name = model_label(self.manifest)
        self._lock = threading.Lock()
        if warm_up:
            self.generate([[self.config.eos_ids[0]]], SamplingParams(max_new_tokens=2))
        release_free_memory()  # what the graph's import and the first run freed (0.09 GB at 1.5B)
        stage_done("warm_up")
        self.load_seconds = time.perf_counter() - start
        log.info("model %s loaded in %.1f s: %s on %s (%s)", self.name, self.load_seconds, self.precision,
                 placement.device, why)

    def _bind_weights(self, info: dict) -> None:
        """The weights from the safetensors file into their variables (the graph casts them to this precision),
        read once in file order with plain reads into aligned buffers (a mapped file's pages count as resident
        memory for as long as it is mapped), a group of about BIND_GROUP_BYTES per Session.run: the transient
        copies stay that small, while each run's own executor (one per distinct group) stays a small part of the
        load. The file's sha256 is computed over the same reads, in a thread while TensorFlow assigns the group
        (hashlib releases the GIL), and checked before the model is used: a file that does not match its manifest
        is refused as in verify_files; until then its bytes are only values fed to the verified graph's assigns."""
        expected = expected_shapes(self.config)
        try:
            reader = tensorfile.Reader(self.model_dir / info["file"])
        except tensorfile.TensorFileError as e:
            raise ModelError(str(e)) from None
        digest = hashlib.sha256(reader.header_bytes)

        def hash_group(group: list[tuple[str, np.ndarray]]) -> None:
            for _, value in group:
                digest.update(value.reshape(-1).view(np.uint8))

        with reader, ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(2) as converter:
            missing = sorted(set(info["bind"]) - set(reader.keys()))
            if missing:
                raise ModelError(f"{self.model_dir}: {info['file']} has no tensor {missing[0]!r}")
            group: list[tuple[str, np.ndarray]] = []
            names = reader.keys()
            for i, name in enumerate(names):
                group.append((name, reader.read(name)))
                if sum(v.nbytes for _, v in group) >= BIND_GROUP_BYTES or i == len(names) - 1:
                    hashed = hasher.submit(hash_group, group)
                    self._assign(info["bind"], [(n, v) for n, v in group if n in info["bind"]], expected, converter)
                    hashed.result()
                    group = []
        check_digest(self.model_dir, info["file"], digest.hexdigest(), self.manifest)
        release_free_memory()

    def _assign(self, bind: dict, group: list[tuple[str, np.ndarray]], expected: dict,
                converter: ThreadPoolExecutor) -> None:
        """One Session.run setting the variables of `group` from their stored values.

        Each value is cast, laid out (and for int8 quantized) on the host (graph_weight on numpy arrays, in
        `converter`'s threads) and fed straight to its variables' assigns, past the graph's own cast, transposes and
        quantization: the variable then keeps the fed buffer itself. Done in the graph, those steps' outputs came
        from TensorFlow's CPU pool (a BFC allocator, which never hands memory back to the OS), so their transients
        stayed resident beside the weights for the life of the worker: 0.29 GiB at 1.5B in bfloat16, and int8's
        float32 transients held more (BENCHMARKS.md)."""
        import tensorflow as tf

        checked = []
        for name, value in group:
            feed = self.graph.get_tensor_by_name(f"{BIND_SCOPE}/{bind[name]['feed']}")
            if value.dtype == np.uint16:  # bfloat16 bits (safetensors.numpy has no bfloat16 dtype)
                value = value.view(tf.bfloat16.as_numpy_dtype)
            if tuple(value.shape) != expected.get(name) or value.dtype != feed.dtype.as_numpy_dtype:
                raise ModelError(f"{self.model_dir}: tensor {name} is {value.dtype}{value.shape}, the model wants "
                                 f"{feed.dtype.name}{expected.get(name)}")
            checked.append((name, feed, value))
        feeds = dict(pair for fed in converter.map(lambda c: self._host_form(bind[c[0]]["assign"], c[0], c[2]),
                                                  checked) for pair in fed)
        if feeds:
            self.session.run([f"{BIND_SCOPE}/{bind[name]['assign']}" for name, _ in group], feeds)

    def _host_form(self, assign: str, name: str, value: np.ndarray) -> list[tuple]:
        """[(the tensor a variable of the weight is assigned from, its part of the weight in that tensor's dtype
        and layout, contiguous and aligned so that TensorFlow keeps it without a copy)]: one variable per part of
        the weight's graph form (an int8 weight's q, scale and offset; a single one otherwise)."""
        from lmgraph.export import weight_dtype
        from lmgraph.model import graph_weight

        group = self.graph.get_operation_by_name(f"{BIND_SCOPE}/{assign}")
        targets = {op.inputs[0].op.name: op.inputs[1] for op in group.control_inputs if op.type == "AssignVariableOp"}
        form = graph_weight(name, value.astype(weight_dtype(name, self.precision).as_numpy_dtype, copy=False),
                            self.config, self.precision, xp=np)
        parts = form if isinstance(form, tuple) else (form,)  # the exporter's variables: weights/NAME[/i]
        fed = []
        for i, part in enumerate(parts):
            target = targets.get(f"{BIND_SCOPE}/weights/{name}" + (f"/{i}" if i else ""))
            if target is None:
                raise ModelError(f"{self.model_dir}: tensor {name} has {len(parts)} parts in its graph form, the "
                                 f"graph has no variable for part {i}")
            if tuple(part.shape) != tuple(target.shape) or part.dtype != target.dtype.as_numpy_dtype:
                raise ModelError(f"{self.model_dir}: tensor {name} lays out as {part.dtype}{part.shape}, its "
                                 f"variable is {target.dtype.name}{tuple(target.shape)}")
            if not (part.flags.c_contiguous and part.ctypes.data % tensorfile.ALIGNMENT == 0):
                aligned = tensorfile.aligned_empty(part.shape, part.dtype)
                np.copyto(aligned, part)
                part = aligned
            fed.append((target, part))
        return fed

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 logprobs: bool = True, slots: int | None = None, stops: Sequence[str] = ()) -> list[Completion]:
        """Complete each prompt (a non-empty list of token ids), `slots` rows decoded at once (default: every
        prompt): a row that ends frees its slot for the next prompt, longest max_new_tokens first (continuous
        batching). `stops`: strings that end a row as soon as its text holds one; the completion keeps the stop
        string (transforms/detokenize.py cuts it). Without `logprobs` the graph skips the log-sum-exp over the
        vocabulary and Completion.logprobs are zeros. `generate_parts` is the same run, in parts."""
        done: dict[int, Completion] = {}
        for part in self.generate_parts(prompts, params, logprobs, slots, stops):
            done.update(part.done)
        return [done[r] for r in range(len(done))]

    def generate_parts(self, prompts: Sequence[Sequence[int]],
                       params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                       logprobs: bool = True, slots: int | None = None, stops: Sequence[str] = (),
                       seconds: float | None = None) -> Iterator[Part]:
        """`generate`'s run in parts of about `seconds` each (None: one part), yielding what each part did: a
        part is a Session.run that stops after the first decode step that ends past its deadline, and the next
        goes on from the loop state and KV cache it left (lmgraph.model.generate), so the rows are the same bits
        as in one part, while a caller sees rows end and tokens come every `seconds`.

        On a CPU with several cores (intra_threads) the rows run as that many lanes side by side, each with its
        share of the slots (split_rows; no lane under LANE_SLOTS slots), their parts in step. A row's output is
        the same bits in any lane (rows are independent: test_invariance)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        if not prompts:
            return
        for row, (ids, p) in enumerate(zip(prompts, params)):
            p.validate()
            if not ids:
                raise ValueError(f"row {row}: empty prompt (GPT-2 needs at least one token)")
            if len(ids) + p.max_new_tokens > self.config.n_ctx:
                raise ValueError(f"row {row}: {len(ids)} prompt tokens + {p.max_new_tokens} new tokens exceed "
                                 f"the model context of {self.config.n_ctx}")
        slots = min(slots or len(prompts), len(prompts))
        split = split_rows(prompts, [len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)],
                           min(self._lanes, max(1, slots // LANE_SLOTS)))
        lanes = [Lane(self, rows, [prompts[r] for r in rows], [params[r] for r in rows], logprobs,
                      -(-slots * len(rows) // len(prompts)), stops)  # a lane keeps its share of the slots, rounded up
                 for rows in split]
        try:
            while lanes:
                deadline = math.inf if seconds is None else time.time() + seconds  # tf.timestamp's clock
                parts = side_by_side([lambda lane=lane: lane.part(deadline) for lane in lanes])
                yield Part({r: c for part in parts for r, c in part.done.items()}, sum(p.tokens for p in parts))
                for lane in [lane for lane in lanes if lane.ended]:
                    lane.close()
                lanes = [lane for lane in lanes if not lane.ended]
        finally:
            for lane in lanes:
                lane.close()

    def _cache(self, positions: int) -> np.ndarray:
        """A zeroed KV cache buffer for `positions` positions (lmgraph.model.generate writes the run's cache into it
        in place): one kept from an earlier run, grown when too small, so a worker holds one cache's memory
        (per concurrent run) outside TensorFlow's pool, aligned so that TensorFlow feeds it without a copy."""
        c = self.config
        rows = c.n_layer * 2 * c.kv_heads * positions
        with self._lock:
            cache = self._caches.pop() if self._caches else None
        if cache is None or len(cache) < rows:
            del cache  # the old buffer goes back to the OS before the new one is taken
            cache = tensorfile.aligned_empty((rows, c.head_size), self._cache_dtype)
        cache[:rows] = 0
        return cache

    def score(self, texts: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token | tokens before it) for every token of each text but its first (which has no context:
        start a text with <|endoftext|> to score all of its tokens), in one Session.run."""
        if not texts:
            return []
        for row, ids in enumerate(texts):
            if not 1 <= len(ids) <= self.config.n_ctx:
                raise ValueError(f"row {row}: {len(ids)} tokens; a text to score holds 1 to {self.config.n_ctx} "
                                 f"(the model context)")
        # On a CPU with several cores, as that many Session.runs side by side (as generate): texts dealt longest
        # first, so each run pads to about the same length.
        order = sorted(range(len(texts)), key=lambda r: -len(texts[r]))
        lanes = [order[i::self._lanes] for i in range(min(self._lanes, len(texts)))]
        done: list = [None] * len(texts)
        for rows, scored in zip(lanes, side_by_side([lambda rows=rows: self._score_run([texts[r] for r in rows])
                                                     for rows in lanes])):
            for r, logprobs in zip(rows, scored):
                done[r] = logprobs
        return done

    def _score_run(self, texts: Sequence[Sequence[int]]) -> list[list[float]]:
        lengths = np.array([len(ids) for ids in texts], np.int32)
        batch = np.full((len(texts), lengths.max()), self.config.eos_ids[0], np.int32)
        for row, ids in enumerate(texts):
            batch[row, :len(ids)] = ids  # right padding
        logprobs = self._scoring()(batch, lengths)
        return [logprobs[r, 1:n].tolist() for r, n in enumerate(lengths)]

    def _scoring(self):
        """The scoring callable, its nodes imported on first use (external weights)."""
        with self._lock:
            if self._score is None:
                import tensorflow as tf

                graph_def = tf.compat.v1.GraphDef()
                graph_def.ParseFromString(self._scoring_graph)  # part of the graph checked at load
                with self.graph.as_default(), tf.device(self._device):
                    tf.compat.v1.import_graph_def(graph_def, name=SCORE_SCOPE)
                self._score, self._scoring_graph = self._scoring_callable(f"{SCORE_SCOPE}/"), None
            return self._score

    def _scoring_callable(self, scope: str):
        scoring = self.manifest["score"]
        return self.session.make_callable(scope + scoring["outputs"][SCORE_OUTPUTS[0]],
                                          feed_list=[scope + scoring["inputs"][n] for n in SCORE_INPUTS])

    def close(self) -> None:
        with self._lock:
            if self.session is not None:
                self._close_session()
                self.session = None
            self._caches.clear()  # the KV cache buffers go with the session
