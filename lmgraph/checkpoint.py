"""Read a model's weights a tensor at a time: GPT-2 from OpenAI's TF checkpoint or Hugging Face's safetensors
directory, the Llama family (llama, qwen2, mistral) from Hugging Face's; and write GPT-2's layouts (tests, demos).

Weights go by canonical names, OpenAI's without the `model/` prefix and with Conv1D's leading 1 squeezed:
`wte` (V, C), `wpe` (n_ctx, C), `h0/attn/c_attn/w` (C, 3C), `ln_f/g` (C,) ... Matrices are (in, out). The Llama
family maps onto the same names: q, k and v side by side in `attn/c_attn/w` (C, (nh + 2 nkv) hs), o_proj as
`attn/c_proj/w`, gate and up side by side in `mlp/c_fc/w` (C, 2I), down as `mlp/c_proj/w`, the RMSNorms' weights as
`ln_1/g`, `ln_2/g`, `ln_f/g`, an untied lm_head as `head` (V, C). Readers yield them one at a time, so an export
holds one tensor of a checkpoint at a time (a layer's q, k and v at most), not the model.
Nothing here ever unpickles: a `pytorch_model.bin` is refused with a message saying how to convert it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmgraph import tensorfile
from lmgraph.config import FAMILIES, ModelConfig

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


LLAMA_FAMILY = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "llama3")
MAX_CONTEXT = 32768  # positions a rotary model is exported for at most (its position tables grow with them)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    if not cfg.gpt2:
        return _llama_shapes(cfg)
    C = cfg.n_embd
    shapes = {"wte": (cfg.n_vocab, C), "wpe": (cfg.n_ctx, C), "ln_f/g": (C,), "ln_f/b": (C,)}
    per_layer = {"ln_1/g": (C,), "ln_1/b": (C,), "attn/c_attn/w": (C, 3 * C), "attn/c_attn/b": (3 * C,),
                 "attn/c_proj/w": (C, C), "attn/c_proj/b": (C,), "ln_2/g": (C,), "ln_2/b": (C,),
                 "mlp/c_fc/w": (C, 4 * C), "mlp/c_fc/b": (4 * C,), "mlp/c_proj/w": (4 * C, C),
                 "mlp/c_proj/b": (C,)}
    for i in range(cfg.n_layer):
        shapes.update({f"h{i}/{k}": s for k, s in per_layer.items()})
    return shapes


def _llama_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, I, q, kv = cfg.n_embd, cfg.mlp_width, cfg.n_head * cfg.head_size, cfg.kv_width
    shapes = {"wte": (cfg.n_vocab, C), **({} if cfg.tied_head else {"head": (cfg.n_vocab, C)}), "ln_f/g": (C,)}
    per_layer = {"ln_1/g": (C,), "attn/c_attn/w": (C, q + 2 * kv), "attn/c_attn/b": (q + 2 * kv,),
                 "attn/c_proj/w": (q, C), "ln_2/g": (C,), "mlp/c_fc/w": (C, 2 * I), "mlp/c_proj/w": (I, C)}
    if not cfg.qkv_bias:
        del per_layer["attn/c_attn/b"]
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
        if (d / "model.safetensors").is_file() or (d / INDEX).is_file():
            return "hf"
        if (d / "pytorch_model.bin").is_file():
            raise CheckpointError(
                f"{d}: only pytorch_model.bin, a pickle, which we never load. Convert it to safetensors first, e.g. "
                "`GPT2LMHeadModel.from_pretrained(d).save_pretrained(d, safe_serialization=True)` on a trusted "
                "machine, then export again.")
        raise CheckpointError(f"{d}: config.json but no model.safetensors")
    raise CheckpointError(f"{d}: neither an OpenAI checkpoint (hparams.json) nor a Hugging Face one (config.json)")


def read_checkpoint(directory: str | Path) -> tuple[ModelConfig, Tensors, str]:
    """(config, tensors, format) from either checkpoint layout, auto-detected. `tensors` yields (canonical name,
    float32 array) one at a time in expected_shapes' order: only one tensor of the checkpoint is in memory at a
    time. Every tensor's presence and shape is checked before the first is read."""
    fmt = detect_format(directory)
    cfg, tensors = (_read_openai if fmt == "openai" else _read_hf)(Path(directory))
    return cfg, tensors, fmt


STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def checkpoint_dtype(directory: str | Path) -> str:
    """The dtype a checkpoint's float tensors are stored in (float32, float16 or bfloat16), float32 if they mix
    them or the layout is OpenAI's: what an export stores them in by default, losing nothing and taking no more
    disk or load time than the checkpoint did."""
    d = Path(directory)
    if detect_format(d) == "openai":
        return "float32"
    reader = ShardedReader(d)
    try:
        found = {STORED_DTYPES.get(reader.dtype(k)) for k in reader.where}
    finally:
        reader.close()
    return found.pop() if len(found) == 1 and None not in found else "float32"


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, Weights, str]:
    """(config, weights, format): every tensor in memory at once (tests and small models)."""
    cfg, tensors, fmt = read_checkpoint(directory)
    return cfg, dict(tensors), fmt


def _check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """The checkpoint's tensors (canonical name -> shape) hold every tensor GPT-2 of `cfg` needs, in its shape."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(shapes[name])}, expected {shape}")


def _read_openai(d: Path) -> tuple[ModelConfig, Tensors]:
    import tensorflow as tf

    cfg = ModelConfig.from_dict(json.loads((d / "hparams.json").read_text()))
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


def _read_hf(d: Path) -> tuple[ModelConfig, Tensors]:
    hf = _read_json(d / "config.json")
    family = hf.get("model_type")
    if family in LLAMA_FAMILY:
        return _read_llama(d, hf)
    if family not in (None, "gpt2"):
        raise CheckpointError(f"{d}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    cfg = ModelConfig(n_vocab=hf["vocab_size"], n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
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


INDEX = "model.safetensors.index.json"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def llama_config(hf: dict, generation: dict, source: str) -> ModelConfig:
    """The config of a llama / qwen2 / mistral config.json (transformers 4.x: rope_theta and rope_scaling at the
    top level; 5.x: rope_parameters) and generation_config.json (its eos_token_id, maybe a list, wins over the
    config's). Anything the engine does not compute as transformers does is refused, naming the field."""
    family = hf["model_type"]
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                                  f"{', '.join(ROPE_TYPES)}")
        llama3 = () if rope_type == "default" else tuple(float(rope[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        if hf.get("mlp_bias") or (family != "qwen2" and hf.get("attention_bias")):
            raise CheckpointError(f"{source}: mlp_bias / attention_bias are not supported for {family}")
        n_ctx = min(int(hf.get("max_position_embeddings", 2048)), MAX_CONTEXT)
        window = hf.get("sliding_window") if hf.get("use_sliding_window", family == "mistral") else None
        if window:  # attention is cut to the last `window` positions beyond it: refused there instead
            n_ctx = min(n_ctx, int(window))
        eos = generation.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        if not eos_ids:
            raise CheckpointError(f"{source}: no eos_token_id in config.json or generation_config.json")
        return ModelConfig(
            family=family, n_vocab=int(hf["vocab_size"]), n_ctx=n_ctx, n_embd=n_embd, n_head=n_head,
            n_layer=int(hf["num_hidden_layers"]), n_kv_head=int(hf.get("num_key_value_heads") or n_head),
            head_dim=int(hf.get("head_dim") or n_embd // n_head), n_mlp=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_llama3=llama3,
            qkv_bias=family == "qwen2", tied_head=bool(hf.get("tie_word_embeddings", False)), eos_ids=eos_ids)
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: config.json: {e}") from None


def llama_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Canonical name -> the Hugging Face tensors it is made of, side by side along its last axis (each matrix
    transposed from Linear's (out, in) first)."""
    sources = {"wte": ["model.embed_tokens.weight"], "ln_f/g": ["model.norm.weight"]}
    if not cfg.tied_head:
        sources["head"] = ["lm_head.weight"]
    for i in range(cfg.n_layer):
        hf = f"model.layers.{i}."
        layer = {"ln_1/g": ["input_layernorm.weight"],
                 "attn/c_attn/w": [f"self_attn.{x}_proj.weight" for x in "qkv"],
                 "attn/c_attn/b": [f"self_attn.{x}_proj.bias" for x in "qkv"],
                 "attn/c_proj/w": ["self_attn.o_proj.weight"], "ln_2/g": ["post_attention_layernorm.weight"],
                 "mlp/c_fc/w": ["mlp.gate_proj.weight", "mlp.up_proj.weight"], "mlp/c_proj/w": ["mlp.down_proj.weight"]}
        sources.update({f"h{i}/{k}": [hf + t for t in v] for k, v in layer.items()})
    return {name: sources[name] for name in expected_shapes(cfg)}


class ShardedReader:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json lists, by name."""

    def __init__(self, d: Path):
        if (d / INDEX).is_file():
            weight_map = _read_json(d / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{d / INDEX}: no weight_map")
            files = sorted(set(weight_map.values()))
            if any(Path(f).name != f for f in files):  # a shard outside the directory
                raise CheckpointError(f"{d / INDEX}: shard names must be plain file names")
        else:
            weight_map, files = None, ["model.safetensors"]
        try:
            self.readers = {f: tensorfile.Reader(d / f) for f in files}
        except (tensorfile.TensorFileError, FileNotFoundError) as e:
            raise CheckpointError(str(e)) from None
        self.where = {k: r for r in self.readers.values() for k in r.keys()}
        if weight_map is not None:
            self.where = {k: self.readers[f] for k, f in weight_map.items() if k in self.readers[f].keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].shape(key))

    def dtype(self, key: str) -> str:
        return self.where[key].dtype(key)

    def read(self, key: str) -> np.ndarray:
        return _float32(self.where[key].read(key), self.dtype(key))

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _read_llama(d: Path, hf: dict) -> tuple[ModelConfig, Tensors]:
    generation = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    cfg = llama_config(hf, generation, str(d))
    reader = ShardedReader(d)
    sources = llama_sources(cfg)
    missing = sorted(k for keys in sources.values() for k in keys if k not in reader)
    if missing:
        reader.close()
        raise CheckpointError(f"{d}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key in (k for keys in sources.values() for k in keys):
        if reader.dtype(key) not in ("F32", "F16", "BF16"):
            reader.close()
            raise CheckpointError(f"{d}: {key} is {reader.dtype(key)}, not a float tensor")

    def joined_shape(keys: list[str]) -> tuple[int, ...]:
        shapes = [reader.shape(k)[::-1] for k in keys]  # (in, out) for matrices
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    try:
        _check_shapes({name: joined_shape(keys) if name not in ("wte", "head") else reader.shape(keys[0])
                       for name, keys in sources.items()}, cfg, str(d))
    except CheckpointError:
        reader.close()
        raise

    def tensors() -> Tensors:
        try:
            for name, keys in sources.items():
                if name in ("wte", "head"):  # (V, C) as stored
                    yield name, reader.read(keys[0])
                    continue
                parts = [reader.read(k).T for k in keys]  # matrices (in, out); vectors as they are
                yield name, np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1))
        finally:
            reader.close()
    return cfg, tensors()


def _float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor as float32; BF16 arrives as its uint16 bits, the top half of a float32's."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def random_tensors(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Tensors:
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


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Weights:
    """GPT-2-initialised random weights, all in memory (tests and small models)."""
    return dict(random_tensors(cfg, seed, std))


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Canonical name -> the Hugging Face checkpoint's name, for every tensor."""
    names = dict(_TOP_KEYS)
    for i in range(cfg.n_layer):
        names.update({f"h{i}/{ours}": f"h.{i}.{theirs}" for ours, theirs in _LAYER_KEYS.items()})
    return names


def save_hf(directory: str | Path, cfg: ModelConfig, weights: Weights | Iterable[tuple[str, np.ndarray]]) -> None:
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


def save_openai(directory: str | Path, cfg: ModelConfig, weights: Weights) -> None:
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
