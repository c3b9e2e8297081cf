"""Where and in what precision a worker process runs the graph: its device, its GPU (one per process on machines
with several), the Session's config, and the fastest precision the device has. The choices are pure functions
of what the process sees, so they are tested without the hardware.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Sequence

from lmgraph.manifest import INT8_BF16_CACHE, PRECISIONS

# CPU flags (as /proc/cpuinfo names them) whose presence makes bfloat16 matmuls faster than float32: AMX tiles
# (Sapphire Rapids and later) and AVX512-BF16 (Cooper Lake, Zen 4). On AVX2-only CPUs TensorFlow's bfloat16
# matmuls run about 2x slower than float32 (BENCHMARKS.md), so those stay float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# CPU flags of int8 dot products straight into int32 (VNNI, AMX). Without them oneDNN's int8 matmul adds each pair of
# u8 x s8 products in saturating int16 first (BENCHMARKS.md), which is less accurate.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")  # named with figures


@dataclasses.dataclass(frozen=True)
class Placement:
    device: str  # what the graph is imported under: "/GPU:0" or "/CPU:0"
    gpu: int | None = None  # the one GPU this process keeps to (gpu_options.visible_device_list); None: TF's default
    compute_capability: tuple[int, int] | None = None  # of that GPU, when known


def select_device(gpus: Sequence[str], slot: int | None = None,
                  compute_capability: tuple[int, int] | None = None) -> Placement:
    """Where this process runs the graph, given the GPUs it sees and, on a machine with several, its slot: a GPU
    of its own (which is then its /GPU:0), so that N worker processes on N GPUs hold one Session per GPU."""
    if not gpus:
        return Placement("/CPU:0")
    return Placement("/GPU:0", None if slot is None else slot % len(gpus), compute_capability)


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

            gpus = tf.config.list_physical_devices("GPU")
            slot = claim_gpu(len(gpus)) if len(gpus) > 1 else None
            cc = None
            if gpus:
                details = tf.config.experimental.get_device_details(gpus[slot or 0])
                cc = details.get("compute_capability")
            _placement = select_device([d.name for d in gpus], slot, cc)
        return _placement


# oneDNN's ISA levels in order (the values ONEDNN_MAX_CPU_ISA takes), each with the CPU flags it adds to the one
# before. oneDNN kernels use nothing above the level the variable caps them at, so those flags count as absent:
# with oneDNN capped at AVX2 on a bfloat16 CPU, bfloat16 matmuls fall back to slow paths or fail to build.
ONEDNN_ISA_LEVELS = (
    ("SSE41", ("sse4_1",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2", "fma")),
    ("AVX2_VNNI", ("avx_vnni",)),
    ("AVX2_VNNI_2", ("avx_vnni_int8", "avx_ne_convert")),
    ("AVX512_CORE", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")),
    ("AVX512_CORE_VNNI", ("avx512_vnni",)),
    ("AVX512_CORE_BF16", ("avx512_bf16",)),
    ("AVX512_CORE_FP16", ("avx512_fp16",)),  # also spelled AVX10_1_512
    ("AVX512_CORE_AMX", ("amx_tile", "amx_int8", "amx_bf16")),  # also spelled AVX10_1_512_AMX
)
ISA_ALIASES = {"AVX10_1_512": "AVX512_CORE_FP16", "AVX10_1_512_AMX": "AVX512_CORE_AMX"}


def cpu_flags(cpuinfo: str | None = None, max_isa: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), less those above oneDNN's ISA cap
    (`max_isa`; by default the environment's ONEDNN_MAX_CPU_ISA, as oneDNN reads it)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    m = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = set(m.group(1).split()) if m else set()
    return flags - above_isa(os.environ.get("ONEDNN_MAX_CPU_ISA", "") if max_isa is None else max_isa)


def above_isa(max_isa: str) -> set[str]:
    """The flags of oneDNN's ISA levels above `max_isa` (none for "", ALL or a level this table does not know)."""
    names = [name for name, _ in ONEDNN_ISA_LEVELS]
    cap = ISA_ALIASES.get(max_isa.strip().upper(), max_isa.strip().upper())
    if cap not in names:
        return set()
    return {flag for _, flags in ONEDNN_ISA_LEVELS[names.index(cap) + 1:] for flag in flags}


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return m.group(1).strip() if m else "unknown CPU"


def choose_precision(available: Sequence[str], placement: Placement, flags: set[str]) -> tuple[str, str]:
    """(precision, why): the fastest of the model's graphs on this device.

    GPUs: bfloat16 from compute capability 8.0 (Ampere) on, float16 before (tensor cores since Volta; float16 has
    the smaller range, bfloat16 the safer choice where both run fast). CPUs: bfloat16 where the CPU has AMX or
    AVX512-BF16, else float32.
    """
    def pick(order: Sequence[str], why: str) -> tuple[str, str]:
        for p in order:
            if p in available:
                return p, why
        return available[0], f"{why}; this model has only {', '.join(available)}"

    if placement.device.startswith("/GPU"):
        cc = placement.compute_capability
        if cc is not None and tuple(cc) >= (8, 0):
            return pick(("bfloat16", "float16", "float32"), f"GPU with compute capability {cc[0]}.{cc[1]}")
        return pick(("float16", "float32"), "GPU before compute capability 8.0")
    units = bf16_units(flags)
    if units:
        return pick(("bfloat16", "float32"), f"CPU has {' and '.join(units)}")
    return pick(("float32",), "CPU without bfloat16 units (no amx_bf16 or avx512_bf16)")


def resolve_precision(requested: str, available: Sequence[str], placement: Placement,
                      flags: set[str] | None = None) -> tuple[str, str]:
    """The precision to run: `requested` if the model has it, or the device's best for "auto"."""
    if requested == "auto":
        return choose_precision(available, placement, cpu_flags() if flags is None else flags)
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "int8" and placement.device.startswith("/GPU"):
        raise ValueError("int8 runs on CPUs only (TensorFlow's quantized matmul has no GPU kernel); use auto, "
                         "bfloat16 or float16 on a GPU")
    if requested not in available:
        raise ValueError(f"this model was exported with {', '.join(available)} graphs only, not {requested}; "
                         f"export it again with external weights (the default) for every precision")
    return requested, "requested"


def bf16_units(flags: set[str]) -> list[str]:
    """The CPU's bfloat16 units (BF16_CPU_FLAGS it has)."""
    return [f for f in BF16_CPU_FLAGS if f in flags]


def graph_key(precision: str, graphs: Sequence[str], flags: set[str] | None = None) -> str:
    """Which of the model's graphs runs `precision` on this CPU: int8 with a bfloat16 KV cache where the CPU has
    bfloat16 units (attention reads half the bytes of float32's: 4-5% of an int8 job on AMD Zen 5) and the model
    has that graph; the precision's own graph otherwise (AVX2-only CPUs run TensorFlow's bfloat16 matmuls slowly)."""
    flags = cpu_flags() if flags is None else flags
    if precision == "int8" and INT8_BF16_CACHE in graphs and bf16_units(flags):
        return INT8_BF16_CACHE
    return precision


def engine_threads(threads: int | None = None) -> int:
    """The cores a worker process's generation uses: `threads`, else those this process may run on."""
    if threads is not None:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def session_config(threads: int | None = None, placement: Placement | None = None, one_thread_ops: bool = False):
    """The Session's config for `threads` cores (engine_threads): `threads` runs may go side by side (TensorFlow's
    inter-op threads; GenerationModel splits a batch into parts), and each op uses `threads` threads, or one with
    one_thread_ops on a CPU. At 124M a decode step's ~600 ops are small (a (128, 768) add is 30-60 us), and each op
    split over two threads spent more on waking and waiting for them than it saved: 1.7 of 2 cores busy, 11k
    context switches a second; one thread an op, two parts side by side, was 1.24-1.34x faster at 128 rows. Where a
    run's step is bound by reading the weights (774M at 16 rows: 7.2-7.7 s on one thread, 4.5-5.5 on two) each op
    keeps every core (BENCHMARKS.md). TensorFlow sizes the op threads once per process, by its first Session."""
    import tensorflow as tf

    placement = placement or process_placement()
    threads = engine_threads(threads)
    on_cpu = placement.device.startswith("/CPU")
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=1 if on_cpu and one_thread_ops else threads,
        inter_op_parallelism_threads=threads if on_cpu else 2,
        allow_soft_placement=True)  # ops without a GPU kernel (if any) run on the CPU instead of failing
    config.gpu_options.allow_growth = True  # share the GPU with other processes instead of grabbing it all
    # The exporter already ran Grappler's device-independent passes. On a CPU none runs at load: the device ones
    # cost 0.6 s of a 124M load, and the remapper's MatMul + BiasAdd fusion was 5-10% slower at batch 64-128 and
    # made bfloat16 rows depend on their batch (the fused kernel's rounding differs between 1 and several rows;
    # BENCHMARKS.md). On a GPU the device-specific passes (fusions, host pinning) run as TensorFlow means.
    rewrite = config.graph_options.rewrite_options
    if on_cpu:
        rewrite.disable_meta_optimizer = True
    else:
        for name in ("constant_folding", "arithmetic_optimization", "dependency_optimization", "loop_optimization",
                     "function_optimization", "shape_optimization", "common_subgraph_elimination"):
            setattr(rewrite, name, rewrite.OFF)
    if placement.gpu is not None:
        config.gpu_options.visible_device_list = str(placement.gpu)
    return config
