"""Read GPT-2 weights from OpenAI's TF checkpoint or Hugging Face's safetensors directory a tensor at a time,
and write both.

Weights go by canonical names, OpenAI's without the `model/` prefix and with Conv1D's leading 1 squeezed:
`wte` (V, C), `wpe` (n_ctx, C), `h0/attn/c_attn/w` (C, 3C), `ln_f/g` (C,) ... Readers yield them one at a time,
so an export holds one tensor of a checkpoint at a time, not the model.
Nothing here ever unpickles: a `pytorch_model.bin` is refused with a message saying how to convert it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmgraph import tensorfile
from lmgraph.config import GPT2Config

Weights = dict[str, np.ndarray]
Tensors = Iterator[tuple[str, np.ndarray]]  # (canonical name, array), one at a time

# Per-layer tensors: canonical suffix -> Hugging Face suffix.
_LAYER_KEYS = {
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}
_TOP_KEYS = {"wte": "wte.weight", "wpe": "wpe.weight", "ln_f/g": "ln_f.weight", "ln_f/b": "ln_f.bias"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with the reason."""


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    C = cfg.n_embd
    shapes = {"wte": (cfg.n_vocab, C), "wpe": (cfg.n_ctx, C), "ln_f/g": (C,), "ln_f/b": (C,)}
    per_layer = {"ln_1/g": (C,), "ln_1/b": (C,), "attn/c_attn/w": (C, 3 * C), "attn/c_attn/b": (3 * C,),
                 "attn/c_proj/w": (C, C), "attn/c_proj/b": (C,), "ln_2/g": (C,), "ln_2/b": (C,),
                 "mlp/c_fc/w": (C, 4 * C), "mlp/c_fc/b": (4 * C,), "mlp/c_proj/w": (4 * C, C),
                 "mlp/c_proj/b": (C,)}
    for i in range(cfg.n_layer):
        shapes.update({f"h{i}/{k}": s for k, s in per_layer.items()})
    return shapes


def detect_format(directory: str | Path) -> str:
    """'openai' or 'hf', from the files present."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    if (d / "hparams.json").is_file():
        return "openai"
    if (d / "config.json").is_file():
        if (d / "model.safetensors").is_file():
            return "hf"
        if (d / "pytorch_model.bin").is_file():
            raise CheckpointError(
                f"{d}: only pytorch_model.bin, a pickle, which we never load. Convert it to safetensors first, e.g. "
                "`GPT2LMHeadModel.from_pretrained(d).save_pretrained(d, safe_serialization=True)` on a trusted "
                "machine, then export again.")
        raise CheckpointError(f"{d}: config.json but no model.safetensors")
    raise CheckpointError(f"{d}: neither an OpenAI checkpoint (hparams.json) nor a Hugging Face one (config.json)")


def read_checkpoint(directory: str | Path) -> tuple[GPT2Config, Tensors, str]:
    """(config, tensors, format) from either checkpoint layout, auto-detected. `tensors` yields (canonical name,
    float32 array) one at a time in expected_shapes' order: only one tensor of the checkpoint is in memory at a
    time. Every tensor's presence and shape is checked before the first is read."""
    fmt = detect_format(directory)
    cfg, tensors = (_read_openai if fmt == "openai" else _read_hf)(Path(directory))
    return cfg, tensors, fmt


def load_checkpoint(directory: str | Path) -> tuple[GPT2Config, Weights, str]:
    """(config, weights, format): every tensor in memory at once (tests and small models)."""
    cfg, tensors, fmt = read_checkpoint(directory)
    return cfg, dict(tensors), fmt


def _check_shapes(shapes: dict[str, tuple[int, ...]], cfg: GPT2Config, source: str) -> None:
    """The checkpoint's tensors (canonical name -> shape) hold every tensor GPT-2 of `cfg` needs, in its shape."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(shapes[name])}, expected {shape}")


def _read_openai(d: Path) -> tuple[GPT2Config, Tensors]:
    import tensorflow as tf

    cfg = GPT2Config.from_dict(json.loads((d / "hparams.json").read_text()))
    ckpt = tf.train.latest_checkpoint(str(d))
    if ckpt is None:
        raise CheckpointError(f"{d}: hparams.json but no TF checkpoint (no `checkpoint` file or model.ckpt.*)")
    reader = tf.train.load_checkpoint(ckpt)
    squeeze = lambda s: tuple(s[1:]) if len(s) == 3 and s[0] == 1 else tuple(s)  # noqa: E731  Conv1D: (1, in, out)
    shapes = {name.removeprefix("model/"): squeeze(shape)
              for name, shape in reader.get_variable_to_shape_map().items() if name.startswith("model/")}
    _check_shapes(shapes, cfg, str(d))

    def tensors() -> Tensors:
        for name, shape in expected_shapes(cfg).items():
            yield name, np.asarray(reader.get_tensor(f"model/{name}"), dtype=np.float32).reshape(shape)
    return cfg, tensors()


def _read_hf(d: Path) -> tuple[GPT2Config, Tensors]:
    hf = json.loads((d / "config.json").read_text())
    cfg = GPT2Config(n_vocab=hf["vocab_size"], n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
                     n_embd=hf["n_embd"], n_head=hf["n_head"], n_layer=hf["n_layer"])
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{d}: activation_function {act!r} is not GPT-2's tanh GELU")
    try:
        reader = tensorfile.Reader(d / "model.safetensors")
    except tensorfile.TensorFileError as e:
        raise CheckpointError(str(e)) from None
    theirs = {k.removeprefix("transformer."): k for k in reader.keys()}  # with or without the prefix
    keys = {ours: theirs[hf_name] for ours, hf_name in hf_names(cfg).items() if hf_name in theirs}
    _check_shapes({ours: reader.shape(key) for ours, key in keys.items()}, cfg, str(d))
    for key in keys.values():
        if reader.dtype(key) not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{d}: {key} is {reader.dtype(key)}, not a float tensor")

    def tensors() -> Tensors:
        with reader:
            for name in expected_shapes(cfg):
                yield name, _float32(reader.read(keys[name]), reader.dtype(keys[name]))
    return cfg, tensors()


def _float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor as float32; BF16 arrives as its uint16 bits, the top half of a float32's."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def random_tensors(cfg: GPT2Config, seed: int = 0, std: float = 0.02) -> Tensors:
    """GPT-2-initialised random weights (for demos and tests), one tensor at a time in expected_shapes' order:
    the same values as random_weights with the same seed."""
    rng = np.random.default_rng(seed)
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("/g"):
            yield name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("/b"):
            yield name, (0.1 * std * rng.standard_normal(shape)).astype(np.float32)
        else:
            w = rng.standard_normal(shape)
            w *= std  # in place: one float64 temporary of the tensor, not two (the same values)
            yield name, w.astype(np.float32)


def random_weights(cfg: GPT2Config, seed: int = 0, std: float = 0.02) -> Weights:
    """GPT-2-initialised random weights, all in memory (tests and small models)."""
    return dict(random_tensors(cfg, seed, std))


def hf_names(cfg: GPT2Config) -> dict[str, str]:
    """Canonical name -> the Hugging Face checkpoint's name, for every tensor."""
    names = dict(_TOP_KEYS)
    for i in range(cfg.n_layer):
        names.update({f"h{i}/{ours}": f"h.{i}.{theirs}" for ours, theirs in _LAYER_KEYS.items()})
    return names


def save_hf(directory: str | Path, cfg: GPT2Config, weights: Weights | Iterable[tuple[str, np.ndarray]]) -> None:
    """Write a Hugging Face GPT-2 directory (config.json + model.safetensors), a tensor at a time from `weights`
    (a dict, or (name, float32 array) pairs such as random_tensors yields); tokenizer files are the caller's."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = hf_names(cfg)
    specs = {names[n]: (np.float32, s) for n, s in expected_shapes(cfg).items()}
    items = weights.items() if isinstance(weights, dict) else weights
    tensorfile.write(d / "model.safetensors", specs, ((names[n], np.asarray(w, np.float32)) for n, w in items),
                     metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.n_vocab,
              "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
              "n_layer": cfg.n_layer, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 50256,
              "eos_token_id": 50256, "tie_word_embeddings": True}
    (d / "config.json").write_text(json.dumps(config, indent=2))


def save_openai(directory: str | Path, cfg: GPT2Config, weights: Weights) -> None:
    """Write an OpenAI-layout TF checkpoint (hparams.json, checkpoint, model.ckpt.*) with `model/...` names."""
    import tensorflow as tf

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "hparams.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    graph = tf.Graph()
    with graph.as_default():
        for name, w in weights.items():
            w = w[None] if name.endswith("/w") else w  # Conv1D weights carry a leading 1
            tf.compat.v1.get_variable(f"model/{name}", initializer=tf.constant(w), use_resource=False)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(d / "model.ckpt"))
