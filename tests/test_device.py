"""Where the graph runs: the device choice (pure), GPU claims between processes, and the Session's config.
This machine has no GPU: the GPU cases are checked through the choice and the config, not on a device."""
from __future__ import annotations

import os

import pytest

from lmgraph.device import (Placement, choose_precision, claim_gpu, cpu_flags, cpu_name, graph_key,
                         process_placement, resolve_precision, select_device, session_config)
from lmgraph.manifest import INT8_BF16_CACHE

GPUS = [f"/physical_device:GPU:{i}" for i in range(4)]


def test_no_gpu_runs_on_the_cpu():
    assert select_device([]) == Placement("/CPU:0", None)
    assert select_device([], slot=3) == Placement("/CPU:0", None)


def test_one_gpu_is_used_by_every_process():
    assert select_device(GPUS[:1]) == Placement("/GPU:0", None)


def test_several_gpus_one_per_process():
    # a process keeps to its own GPU through visible_device_list, so inside the process it is /GPU:0
    assert [select_device(GPUS, slot) for slot in range(4)] == [Placement("/GPU:0", i) for i in range(4)]
    assert select_device(GPUS, slot=6) == Placement("/GPU:0", 2)  # more processes than GPUs: they share


def test_claims_are_exclusive_while_held(tmp_path):
    # flock locks belong to the open file, so claims made here conflict as those of separate processes would
    assert [claim_gpu(2, tmp_path), claim_gpu(2, tmp_path)] == [0, 1]
    assert claim_gpu(2, tmp_path) == os.getpid() % 2  # all taken: chosen by process id
    assert claim_gpu(3, tmp_path) == 2


def test_session_config_for_a_gpu():
    config = session_config(3, placement=Placement("/GPU:0", 2))
    assert config.gpu_options.visible_device_list == "2" and config.gpu_options.allow_growth
    assert config.allow_soft_placement and config.intra_op_parallelism_threads == 3
    assert not config.graph_options.rewrite_options.disable_meta_optimizer


def test_session_config_for_the_cpu():
    config = session_config(placement=Placement("/CPU:0"))
    assert config.gpu_options.visible_device_list == "" and config.allow_soft_placement
    # a run per core side by side (the cores this process may use), each op on every core or on one
    cores = len(os.sched_getaffinity(0))
    assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (cores, cores)
    config = session_config(3, placement=Placement("/CPU:0"), one_thread_ops=True)
    assert (config.intra_op_parallelism_threads, config.inter_op_parallelism_threads) == (1, 3)
    assert session_config(3, placement=Placement("/GPU:0"), one_thread_ops=True).intra_op_parallelism_threads == 3


def test_the_graph_is_imported_on_the_chosen_device(model):
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert process_placement().device == ("/GPU:0" if gpu else "/CPU:0")  # on this machine and CI: the CPU
    assert {op.device for op in model.graph.get_operations()} == {"/device:GPU:0" if gpu else "/device:CPU:0"}


AVX2 = {"fma", "avx2"}
ZEN4 = AVX2 | {"avx512f", "avx512_bf16"}
SPR = ZEN4 | {"amx_bf16", "amx_tile"}
ALL = ["float32", "bfloat16", "float16", "int8"]
CPU = Placement("/CPU:0")


def test_precision_follows_the_cpus_bf16_units():
    assert choose_precision(ALL, CPU, AVX2)[0] == "float32"  # bf16 runs 2x slower than fp32 there
    assert choose_precision(ALL, CPU, ZEN4)[0] == "bfloat16"
    assert choose_precision(ALL, CPU, SPR) == ("bfloat16", "CPU has amx_bf16 and avx512_bf16")
    assert choose_precision(["float32"], CPU, SPR)[0] == "float32"  # a frozen float32 model has nothing else


def test_precision_on_gpus_follows_the_compute_capability():
    assert choose_precision(ALL, Placement("/GPU:0", None, (7, 0)), set())[0] == "float16"  # V100, T4
    assert choose_precision(ALL, Placement("/GPU:0", None, (8, 0)), set())[0] == "bfloat16"  # A100, L4
    assert choose_precision(ALL, Placement("/GPU:0"), set())[0] == "float16"  # capability unknown


def test_requested_precision_wins_and_is_checked():
    assert resolve_precision("float32", ALL, CPU, SPR) == ("float32", "requested")
    assert resolve_precision("auto", ALL, CPU, AVX2)[0] == "float32"
    with pytest.raises(ValueError, match="float32 graphs only, not bfloat16"):
        resolve_precision("bfloat16", ["float32"], CPU, SPR)
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        resolve_precision("int4", ALL, CPU, SPR)


def test_int8_only_when_asked_and_only_on_cpus():
    for flags in (AVX2, ZEN4, SPR):
        assert choose_precision(ALL, CPU, flags)[0] != "int8"  # it changes outputs: never picked by auto
    assert resolve_precision("int8", ALL, CPU, AVX2) == ("int8", "requested")
    with pytest.raises(ValueError, match="int8 runs on CPUs only"):
        resolve_precision("int8", ALL, Placement("/GPU:0", None, (8, 0)), set())


def test_int8_runs_its_bfloat16_cache_graph_where_the_cpu_has_bfloat16_units():
    graphs = [*ALL, INT8_BF16_CACHE]
    assert graph_key("int8", graphs, AVX2) == "int8"
    assert graph_key("int8", graphs, AVX2 | {"avx512f", "avx512_vnni"}) == "int8"
    assert graph_key("int8", graphs, AVX2 | {"avx512_bf16"}) == INT8_BF16_CACHE
    assert graph_key("int8", graphs, AVX2 | {"amx_bf16"}) == INT8_BF16_CACHE
    assert graph_key("int8", ALL, AVX2 | {"avx512_bf16"}) == "int8"  # a model without that graph
    assert graph_key("bfloat16", graphs, AVX2 | {"avx512_bf16"}) == "bfloat16"


def test_cpu_flags_are_read_from_cpuinfo():
    info = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16\n"
    assert cpu_flags(info, max_isa="") == {"fpu", "avx2", "amx_bf16"} and cpu_name(info) == "Some CPU"


def test_flags_above_onednns_isa_cap_count_as_absent(monkeypatch):
    """ONEDNN_MAX_CPU_ISA keeps oneDNN's kernels below an ISA: a Zen 4 capped at AVX2 must choose as an AVX2-only
    CPU does (float32, int8 with a float32 cache), or it would pick bfloat16 graphs oneDNN then cannot build."""
    info = "model name\t: Zen 4\nflags\t\t: " + " ".join(sorted(ZEN4 | {"avx512bw", "avx512_vnni"})) + "\n"
    assert cpu_flags(info, max_isa="AVX2") == {"avx2", "fma"}
    assert cpu_flags(info, max_isa="avx512_core_vnni") == {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}
    for cap in ("", "ALL", "AVX10_1_512_AMX", "SOMETHING_NEW"):  # no cap, or above every flag it has
        assert cpu_flags(info, max_isa=cap) == ZEN4 | {"avx512bw", "avx512_vnni"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what the process runs with, by default
    assert choose_precision(ALL, CPU, cpu_flags(info))[0] == "float32"
    assert graph_key("int8", [*ALL, INT8_BF16_CACHE], cpu_flags(info)) == "int8"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert choose_precision(ALL, CPU, cpu_flags(info))[0] == "bfloat16"
