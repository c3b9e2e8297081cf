"""Checkpoints read and model weights written a tensor at a time: the files are what safetensors itself writes,
both checkpoint layouts and --random give the same weights, and an export never holds the model whole."""
from __future__ import annotations

import json
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save, save_file

from lmgraph import tensorfile
from lmgraph.checkpoint import (CheckpointError, expected_shapes, load_checkpoint, random_tensors, random_weights,
                             read_checkpoint, save_hf, save_openai)
from lmgraph.config import SIZES, ModelConfig
from lmgraph.export import stored_dtype, write_weights
from lmgraph.tokenizer import default_vocab_dir
from tests.conftest import TINY, write_hf_checkpoint


def mixed_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"b/w": rng.standard_normal((3, 5)).astype(np.float32), "a": rng.standard_normal(7).astype(np.float16),
            "c": rng.integers(0, 1 << 16, (2, 2, 3)).astype(np.uint16), "z": np.float32(rng.standard_normal((4,))),
            "empty": np.zeros((0, 3), np.float32)}


def test_streamed_file_is_byte_for_byte_what_safetensors_writes(tmp_path):
    tensors = mixed_tensors()
    specs = {n: (a.dtype, a.shape) for n, a in tensors.items()}
    order = ["c", "z", "b/w", "empty", "a"]  # arrival order differs from the file's layout
    tensorfile.write(tmp_path / "ours", specs, ((n, tensors[n]) for n in order), metadata={"format": "pt"})
    assert (tmp_path / "ours").read_bytes() == save(tensors, metadata={"format": "pt"})
    tensorfile.write(tmp_path / "plain", specs, tensors.items())
    assert (tmp_path / "plain").read_bytes() == save(tensors)
    loaded = load_file(tmp_path / "ours")
    with tensorfile.Reader(tmp_path / "ours") as r:
        assert r.keys() == ["b/w", "empty", "z", "a", "c"]  # file order: widest dtype first, then by name
        for n, a in tensors.items():
            got = r.read(n)
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
            assert np.array_equal(loaded[n], a) and (got.size == 0 or got.ctypes.data % tensorfile.ALIGNMENT == 0)


def test_writer_refuses_tensors_that_do_not_match_their_declaration(tmp_path):
    specs = {"a": (np.float32, (2,)), "b": (np.float32, (3,))}
    with pytest.raises(tensorfile.TensorFileError, match="declared float32"):
        tensorfile.write(tmp_path / "f", specs, [("a", np.zeros(2, np.float16))])
    with pytest.raises(tensorfile.TensorFileError, match="never given"):
        tensorfile.write(tmp_path / "f", specs, [("a", np.zeros(2, np.float32))])
    with pytest.raises(tensorfile.TensorFileError, match="not declared, or came twice"):
        tensorfile.write(tmp_path / "f", specs, [("a", np.zeros(2, np.float32))] * 2)


def bad_file(tmp_path, header: bytes, data: bytes = b"\0" * 8):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, message", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "not 16 bytes inside"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}', "not 4 bytes inside"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "malformed"),
    (b'{"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}', "malformed"),
])
def test_reader_refuses_a_malformed_header(tmp_path, header, message):
    with pytest.raises(tensorfile.TensorFileError, match=message):
        tensorfile.Reader(bad_file(tmp_path, header))


@pytest.mark.parametrize("data, message", [(b"\0" * 12, "4 bytes after the last tensor"),
                                           (b"\0" * 4, "not 4 bytes inside the file's 4 data")])
def test_reader_refuses_data_the_tensors_do_not_tile(tmp_path, data, message):
    """Reading every tensor reads every byte of the file (the loader hashes the file as it reads it)."""
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], '
    with pytest.raises(tensorfile.TensorFileError, match=message):
        tensorfile.Reader(bad_file(tmp_path, header + b'"data_offsets": [4, 8]}}', data))
    gap = header + b'"data_offsets": [8, 12]}}'
    with pytest.raises(tensorfile.TensorFileError, match="not contiguous"):
        tensorfile.Reader(bad_file(tmp_path, gap, b"\0" * 12))


def test_reader_refuses_a_header_longer_than_the_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(tensorfile.TensorFileError, match="header of"):
        tensorfile.Reader(path)


def test_random_tensors_are_random_weights_one_at_a_time():
    cfg = SIZES["tiny"]
    streamed = list(random_tensors(cfg, seed=4))
    assert [n for n, _ in streamed] == list(expected_shapes(cfg))
    whole = random_weights(cfg, seed=4)
    assert all(np.array_equal(w, whole[n]) for n, w in streamed)
    assert not np.array_equal(whole["wte"], random_weights(cfg, seed=5)["wte"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_file_is_what_safetensors_writes_for_the_converted_tensors(tmp_path, tiny_weights, dtype):
    import tensorflow as tf

    from lmgraph.export import weight_dtype

    import torch
    from safetensors.torch import save_file as save_torch

    write_weights(tmp_path / "w.safetensors", TINY, iter(tiny_weights.items()), dtype)
    ref = {n: w.astype(weight_dtype(n, dtype).as_numpy_dtype) for n, w in tiny_weights.items()}
    if dtype == "bfloat16":  # safetensors' numpy writer has no BF16: its torch writer, from the same bits
        save_torch({n: torch.from_numpy(w.view(np.int16)).view(torch.bfloat16) if w.dtype.itemsize == 2
                    else torch.from_numpy(w) for n, w in ref.items()}, tmp_path / "ref.safetensors")
    else:
        save_file(ref, tmp_path / "ref.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    if dtype == "bfloat16":
        assert stored_dtype("wte", dtype) == tf.bfloat16.as_numpy_dtype and stored_dtype("ln_f/g", dtype) == np.float32
        bits = tensorfile.Reader(tmp_path / "w.safetensors").read("wte").view(tf.bfloat16.as_numpy_dtype)
        np.testing.assert_allclose(bits.astype(np.float32), tiny_weights["wte"], rtol=1 / 128)


def test_openai_and_hf_checkpoints_and_random_export_the_same_weights(tmp_path, hf_dir, tiny_weights):
    from pipeline.export import main

    openai = tmp_path / "openai"
    save_openai(openai, TINY, tiny_weights)
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(default_vocab_dir() / f, openai / f)
    digests = []
    for source in (openai, hf_dir):
        out = tmp_path / f"model-{source.name}"
        assert main(["--checkpoint", str(source), "--output", str(out), "--name", "tiny"]) == 0
        digests.append(json.loads((out / "manifest.json").read_text())["files"]["weights.safetensors"])
        cfg, weights, fmt = load_checkpoint(source)
        assert cfg == TINY and list(weights) == list(expected_shapes(TINY))
        assert all(np.array_equal(weights[n], w) for n, w in tiny_weights.items()), fmt
    assert digests[0] == digests[1]
    # --random: the seed's tensors, generated one at a time, are the file random_weights' dict gives
    assert main(["--random", "tiny", "--seed", "7", "--output", str(tmp_path / "r")]) == 0
    write_weights(tmp_path / "ref.safetensors", SIZES["tiny"], random_weights(SIZES["tiny"], seed=7).items(),
                  "float32")
    assert (tmp_path / "r" / "weights.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_hf_checkpoint_in_bfloat16_and_float16_reads_as_float32(tmp_path, tiny_weights):
    import tensorflow as tf

    from lmgraph.checkpoint import hf_names

    for dtype in (tf.bfloat16, tf.float16):
        d = tmp_path / dtype.name
        write_hf_checkpoint(d, TINY, tiny_weights)
        low = {hf_names(TINY)[n]: w.astype(dtype.as_numpy_dtype) for n, w in tiny_weights.items()}
        save_file({k: (v.view(np.uint16) if dtype == tf.bfloat16 else v) for k, v in low.items()},
                  d / "model.safetensors")
        if dtype == tf.bfloat16:  # safetensors.numpy cannot write BF16: relabel the uint16 bits
            raw = bytearray((d / "model.safetensors").read_bytes())
            (n,) = struct.unpack("<Q", raw[:8])
            header = bytes(raw[8:8 + n]).rstrip(b" ").replace(b'"U16"', b'"BF16"')  # offsets are data-relative
            header += b" " * (-len(header) % 8)
            (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(raw[8 + n:]))
        _, weights, _ = load_checkpoint(d)
        for n, w in tiny_weights.items():
            assert weights[n].dtype == np.float32
            assert np.array_equal(weights[n], w.astype(dtype.as_numpy_dtype).astype(np.float32)), (dtype, n)


def test_hf_checkpoint_missing_a_tensor_is_refused_before_reading(tmp_path, tiny_weights):
    d = tmp_path / "hf"
    write_hf_checkpoint(d, TINY, tiny_weights)
    tensors = load_file(d / "model.safetensors")
    del tensors["h.2.mlp.c_fc.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*h2/mlp/c_fc/w"):
        read_checkpoint(d)


def test_export_holds_one_tensor_at_a_time(tmp_path):
    """A checkpoint read and its weights written (the export's data path) under tracemalloc, which counts every
    numpy buffer: the peak is a few of the largest tensor, not the model (deterministic, unlike RSS)."""
    cfg = ModelConfig(n_vocab=1000, n_ctx=64, n_embd=256, n_head=4, n_layer=16)
    save_hf(tmp_path / "hf", cfg, random_tensors(cfg, seed=0))
    shapes = expected_shapes(cfg)
    model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    largest = 4 * max(int(np.prod(s)) for s in shapes.values())
    tracemalloc.start()
    try:
        _, tensors, _ = read_checkpoint(tmp_path / "hf")
        write_weights(tmp_path / "w.safetensors", cfg, tensors, "bfloat16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest + (1 << 20) < model_bytes / 4, (peak, largest, model_bytes)
