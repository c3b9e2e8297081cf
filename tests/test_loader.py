"""A model directory is untrusted: checksums, op allowlist, format version, path tricks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from lmgraph.checkpoint import CheckpointError, detect_format
from lmgraph.manifest import sha256_file
from lmgraph.loader import GenerationModel
from lmgraph.manifest import ModelError
from lmgraph.sampling import SamplingParams


GRAPHS = {"model.pb", "model-bfloat16.pb", "model-float16.pb", "model-int8.pb", "model-int8-bfloat16-cache.pb"}


@pytest.fixture
def copy_dir(tmp_path, model_dir):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    return d


def rewrite_manifest(d, **changes):
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))
    return m


def test_valid_model_loads_and_names_itself(model_dir):
    m = GenerationModel(model_dir)
    assert m.name.startswith("tiny@") and len(m.generate([[1, 2]], SamplingParams(max_new_tokens=3))[0].token_ids) == 3
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["random_weights"] is False and manifest["source"]["format"] == "hf"
    assert set(manifest["files"]) == GRAPHS | {"weights.safetensors", "vocab.json", "merges.txt"}
    m.close()


@pytest.mark.parametrize("name", ["model.pb", "model-bfloat16.pb", "weights.safetensors"])
def test_flipped_byte_is_refused(copy_dir, name):
    data = bytearray((copy_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy_dir / name).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{name} does not match its sha256"):
        GenerationModel(copy_dir, precision="float32")  # every file is checked, not only the one loaded


def test_precision_the_model_lacks_is_refused(copy_dir):
    m = json.loads((copy_dir / "manifest.json").read_text())
    rewrite_manifest(copy_dir, graphs={"float32": "model.pb"})
    with pytest.raises(ModelError, match="exported with float32 graphs only, not bfloat16"):
        GenerationModel(copy_dir, precision="bfloat16")
    rewrite_manifest(copy_dir, graphs={"int4": "model.pb"}, files=m["files"])
    with pytest.raises(ModelError, match="'int4' -> 'model.pb' is not a known precision"):
        GenerationModel(copy_dir)


@pytest.mark.parametrize("op", ["ReadFile", "PyFunc", "WriteFile"])
def test_graph_with_io_ops_is_refused(copy_dir, op):
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((copy_dir / "model.pb").read_bytes())
    node = graph_def.library.function.add() if op == "PyFunc" else None
    if node is not None:  # hidden inside a function of the library
        node.signature.name = "innocent"
        node.node_def.add(name="evil", op=op)
    else:
        graph_def.node.add(name="evil", op=op)
    (copy_dir / "model.pb").write_bytes(graph_def.SerializeToString())
    m = json.loads((copy_dir / "manifest.json").read_text())
    rewrite_manifest(copy_dir, files={**m["files"], "model.pb": sha256_file(copy_dir / "model.pb")})
    with pytest.raises(ModelError, match=f"ops outside the allowlist: \\['{op}'\\]"):
        GenerationModel(copy_dir, precision="float32")  # the graph of model.pb


def test_newer_format_version_is_refused(copy_dir):
    rewrite_manifest(copy_dir, format_version=99)
    with pytest.raises(ModelError, match="format_version 99 is newer"):
        GenerationModel(copy_dir)


def test_path_tricks_are_refused(copy_dir, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    m = json.loads((copy_dir / "manifest.json").read_text())
    rewrite_manifest(copy_dir, files={**m["files"], "../outside.json": sha256_file(outside)})
    with pytest.raises(ModelError, match="points outside the model directory"):
        GenerationModel(copy_dir)
    (copy_dir / "link.json").symlink_to(outside)
    rewrite_manifest(copy_dir, files={**m["files"], "link.json": sha256_file(outside)})
    with pytest.raises(ModelError, match="outside the model directory"):
        GenerationModel(copy_dir)


def test_missing_or_incomplete_model_dir(tmp_path, copy_dir):
    with pytest.raises(ModelError, match="no manifest.json"):
        GenerationModel(tmp_path / "nope")
    (copy_dir / "vocab.json").unlink()
    with pytest.raises(ModelError, match="vocab.json is listed in the manifest but missing"):
        GenerationModel(copy_dir)


def test_pickled_weights_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not even looked at")
    with pytest.raises(CheckpointError, match="never load. Convert it to safetensors"):
        detect_format(tmp_path)


def test_random_export_is_labelled(tmp_path):
    from pipeline.export import main

    assert main(["--random", "tiny", "--output", str(tmp_path / "r")]) == 0
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["random_weights"] is True and manifest["name"] == "gpt2-tiny-random"
    assert set(manifest["files"]) == GRAPHS | {"weights.safetensors", "encoder.json", "vocab.bpe"}


def test_cpu_allocator_pool_is_on_unless_the_user_says_otherwise():
    """Importing lmgraph turns on TensorFlow's BFC pool for CPU memory (no page faults per run); a user's setting wins."""
    code = "import os, lmgraph; print(os.environ['TF_CPU_ALLOCATOR_USE_BFC'])"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    user = subprocess.run([sys.executable, "-c", code], env={**env, "TF_CPU_ALLOCATOR_USE_BFC": "false"},
                          capture_output=True, text=True, check=True)
    assert (default.stdout.strip(), user.stdout.strip()) == ("true", "false")


def test_weights_file_outside_the_manifests_files_is_refused(copy_dir):
    """The weights are hashed as they are bound, so the file bound must be one the manifest lists a sha256 for."""
    shutil.copyfile(copy_dir / "weights.safetensors", copy_dir / "other.safetensors")
    m = json.loads((copy_dir / "manifest.json").read_text())
    rewrite_manifest(copy_dir, weights={**m["weights"], "file": "other.safetensors"})
    with pytest.raises(ModelError, match="'other.safetensors' is not among the manifest's files"):
        GenerationModel(copy_dir, precision="float32")


def test_weights_with_a_tensor_of_another_shape_are_refused(copy_dir, model_dir):
    """A weights file whose header declares another shape (same bytes) is refused, whatever the graph allows."""
    from lmgraph import tensorfile

    with tensorfile.Reader(copy_dir / "weights.safetensors") as r:
        tensors = {n: r.read(n) for n in r.keys()}
    tensors["wpe"] = tensors["wpe"].reshape(-1, 2 * tensors["wpe"].shape[1])
    tensorfile.write(copy_dir / "weights.safetensors", {n: (a.dtype, a.shape) for n, a in tensors.items()},
                     tensors.items())
    m = json.loads((copy_dir / "manifest.json").read_text())
    from lmgraph.manifest import sha256_file

    rewrite_manifest(copy_dir, files={**m["files"], "weights.safetensors": sha256_file(copy_dir / "weights.safetensors")})
    with pytest.raises(ModelError, match="tensor wpe is float32"):
        GenerationModel(copy_dir, precision="float32")


# --- weights cast and laid out on the host at load (lmgraph.loader._host_form) --------------------------------------

def graph_form(name, w, cfg, precision):
    """TensorFlow's own cast and layout of a stored weight: what the graph's assign computes."""
    from lmgraph.export import weight_dtype
    from lmgraph.model import Transposed, graph_weight

    form = graph_weight(name, tf.cast(w, weight_dtype(name, precision)), cfg, precision)
    return (form.t if isinstance(form, Transposed) else form).numpy()


def same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_bound_weights_are_the_graphs_own_cast_and_layout(model_dir, precision):
    from safetensors.numpy import load_file

    m = GenerationModel(model_dir, precision=precision, warm_up=False)
    stored = load_file(model_dir / "weights.safetensors")
    with m.graph.as_default():
        reads = {name: tf.raw_ops.ReadVariableOp(resource=m.graph.get_operation_by_name(f"weights/{name}").outputs[0],
                                                 dtype=m.graph.get_operation_by_name(f"weights/{name}").get_attr("dtype"))
                 for name in stored}
    bound = m.session.run(reads)
    for name, w in stored.items():
        assert same_bits(bound[name], graph_form(name, w, m.config, precision)), name


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_host_layout_equals_the_graphs_at_real_widths(precision):
    """The tiny model has no reduction chunks; GPT-2's widths do (3072 -> 4 x 768), and wte is padded."""
    import numpy as np

    from lmgraph.config import ModelConfig
    from lmgraph.export import weight_dtype
    from lmgraph.model import Transposed, graph_weight

    cfg, rng = ModelConfig(), np.random.default_rng(0)
    for name, shape in {"wte": (cfg.n_vocab, 768), "h0/attn/c_attn/w": (768, 2304), "h0/mlp/c_proj/w": (3072, 768),
                        "h0/ln_1/g": (768,)}.items():
        w = rng.normal(0, 0.5, shape).astype(np.float32)
        host = graph_weight(name, w.astype(weight_dtype(name, precision).as_numpy_dtype), cfg, precision, xp=np)
        host = np.ascontiguousarray(host.t if isinstance(host, Transposed) else host)
        assert same_bits(host, graph_form(name, w, cfg, precision)), name
