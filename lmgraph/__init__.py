"""Language models as one TensorFlow generation graph: configs, checkpoints, tokenizers, the graph, export and safe
loading."""

import os
import sys

# TensorFlow's default CPU allocator returns large buffers (activations, the logits; then also the KV cache,
# which the loader now keeps itself) to the OS after every Session.run, so the next run page-faults them in
# again: 2.2 million minor faults per run at batch 64, prompt 128, 16% of CPU time in the kernel. Its BFC pool
# keeps them (2.4 thousand faults, +19-22% tokens/s there; BENCHMARKS.md attempt 11). The pool never gives memory
# back, so nothing that lives long or varies in size should come from it (lmgraph.loader). TensorFlow reads this when it creates its CPU device, so it is set on importing
# this package, before any Session; an explicit setting in the environment wins.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

# TensorFlow's C++ start-up lines (the oneDNN notice, "Could not find cuda drivers", and on every machine without
# a GPU "failed call to cuInit: ... UNKNOWN ERROR (303)") read like failures and tell a user nothing to act on; a
# failure that matters reaches Python as an exception. So they are off unless the user set TF_CPP_MIN_LOG_LEVEL
# or a job runs with --log_level DEBUG (pipeline.run.configure_logging); worker processes started from the
# launcher inherit the choice.
QUIET_TF = "GPT2_BEAM_QUIET_TENSORFLOW"  # "1": the level below is ours, and worker processes inherit it as ours
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ.update({"TF_CPP_MIN_LOG_LEVEL": "3", QUIET_TF: "1"})


def show_tensorflow_logs() -> None:
    """TensorFlow's C++ logs from INFO on, unless the user chose a level; call before TensorFlow is imported."""
    if os.environ.get(QUIET_TF) == "1":
        os.environ.update({"TF_CPP_MIN_LOG_LEVEL": "0", QUIET_TF: "0"})


def import_tensorflow():
    """TensorFlow, imported with its start-up lines silenced when they are off (above). TF_CPP_MIN_LOG_LEVEL only
    filters what TensorFlow logs once its logging is set up; the lines printed while its libraries load go to
    the process's stderr whatever it says, so that file descriptor points at /dev/null for the import."""
    if "tensorflow" in sys.modules or os.environ.get(QUIET_TF) != "1":
        import tensorflow
        return tensorflow
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow
