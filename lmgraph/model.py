"""A decoder language model's generation as one TensorFlow graph: a `tf.while_loop` that admits requests into slots (prefill) and
decodes every occupied slot one token a step (continuous batching, see `generate`).

One graph serves every family of lmgraph.config: GPT-2's block, or the Llama family's (RMSNorm, rotary positions,
SwiGLU, grouped-query attention); `block`, `embed` and `mlp` are where they differ.

Shapes: B prompts (right padded to T), R requests, S slots, N = the largest max_new_tokens, L cache columns (the
longest prompt + max_new_tokens of any request), C n_embd, nh query heads, nkv key/value heads (nh for GPT-2), hs
head size, V vocabulary (padded, see below).

The KV cache is one tensor, `past` (n_layer, 2, S, nkv, L, hs): keys [:, 0] and values [:, 1] of every layer, in
the weights' dtype (keys and values come out of a matmul in that dtype, so storing them so loses nothing, and a
bfloat16 cache halves the bytes attention reads each step; int8 weights come with a float32 cache, or bfloat16 on
CPUs with bfloat16 units: lmgraph.device.graph_key). A slot's row holds its request's prompt in columns [0, length)
and its k-th new token in column length + k, as the request alone would. It is the run's share of the `cache`
input, written in place through `InplaceUpdate` on a row view (rows of hs values), so a step costs the same
whatever L is; `tensor_scatter_nd_update` or `concat` would copy the whole cache every step. This is safe because
the loader feeds each concurrent run a buffer of its own (lmgraph.loader), nothing else holds it during the run, and
every read of a column depends on the write before it.

Sampling is per row: a row's choice depends only on its own logits, parameters, seed and step, never on its
neighbours (see `choose_tokens`, `sample_tokens`).

Batch invariance. In bfloat16 a row's tokens and log-probabilities are the same bits alone, in any batch, at any
slot, next to any neighbours (float16 on CPUs runs through Eigen's matmuls, which this does not cover; docs/precision.md). A
last-bit difference anywhere would not stay small: the next cast to bfloat16 turns it into a whole bf16 step now
and then, and a greedy token or a draw flips. So every op a row's values go through computes them in an order that
depends on nothing but the row:
- Matmuls reduce over at most MAX_REDUCTION inputs per call (`linear`, `Transposed`): oneDNN sums up to that many
  in one pass whatever the row count (measured up to 1024), while it splits longer reductions (mlp/c_proj's 3072)
  in a way that depends on the number of rows. Longer ones run as chunks of equal width whose float32 results
  are added in a fixed order.
- A row's cache is left aligned: its prompt in columns [0, length), its k-th new token in column length + k, and
  masked (zero-weight) columns only after them, so attention reads its values at the same offsets whatever the
  run's cache width: bfloat16 dot products pair adjacent inputs, so shifting a row's columns (as left padding
  would) changes the rounding of the attention-weighted sum.
- Element-wise kernels compute a value with vector or scalar code depending on where it falls in the flattened
  tensor; every row is therefore a whole number of 16-float vectors wide: the vocabulary is padded to
  VOCAB_MULTIPLE (its extra logits are -inf), the sampler's candidate lists to CANDIDATE_MULTIPLE, and the
  attention softmax's width to SOFTMAX_MULTIPLE (`softmax`).
- The log-sum-exp over the vocabulary sums integers (`row_sum_exp`), which is exact in any order.
- LayerNorm divides by sqrt, not rsqrt (Eigen's vector and scalar rsqrt round differently), and Grappler's
  fusions stay off at load on CPUs (lmgraph.device.session_config; the fused MatMul + BiasAdd rounds differently for
  1 row than for 2).
- int8 weights (`matmul_int8`): each row is quantized with its own scale and the kernel sums integers, exact in
  any order and at any length, so int8 rows are the same bits in any batch as well.
The tests check these at the real layer widths (tests/test_invariance.py). A consequence the same tests show: in
bfloat16, a row's prompt and tokens so far, prefilled, give the same next values as decoding did (in int8 too with
a bfloat16 cache; not with a float32 one, whose prefill (T, T) and decode step (1, L) matmuls round apart).
float32 keeps the tokens of a row whatever its batch; its logits may differ in last bits that never reach a token.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import tensorflow as tf

import numpy as np

from lmgraph.config import ModelConfig
from lmgraph.manifest import END_OF_TEXT, LENGTH, STOP_STRING

NEG_INF = -1e9  # additive mask; finite so a fully masked (padding) query row stays finite
MAX_REDUCTION = 768  # inputs a bfloat16/float16 matmul sums in one call (see the module docstring)
VOCAB_MULTIPLE = 64  # the LM head's width is padded to a multiple of this (50257 -> 50304, as nanoGPT does)
SOFTMAX_MULTIPLE = 32  # attention's softmax runs over a width padded to a multiple of this (see attend)
CANDIDATE_MULTIPLE = 16  # the sampler's candidates per row, rounded up to whole vectors of 16 floats
ADMIT_ROWS = 16  # requests prefilled together when slots free up, at most (see admit)
# and at most so many positions x n_embd (124M: 512 prompt positions; 1.5B: 245). A CPU runs a run per core side
# by side (lmgraph.loader), each prefilling its own group: 124M's 1024 x 64 job peaked 50 MiB higher at 1024 positions.
ADMIT_WIDTH = 512 * 768
GELU_A = 2.0 * math.sqrt(2.0 / math.pi)  # GPT-2's GELU as y * sigmoid(y * (GELU_A + GELU_B * y^2)) (linear)
GELU_B = GELU_A * 0.044715
EXACT_SCALE = 2.0 ** 36  # row_sum_exp's fixed point: 2^36 * (2^16 values of at most 1) stays below 2^53


def round_up(n, multiple: int):
    """n (an int or an int tensor) rounded up to a multiple of `multiple`."""
    return (n + multiple - 1) // multiple * multiple


def padded_vocab(n_vocab: int) -> int:
    return round_up(n_vocab, VOCAB_MULTIPLE)


def reduction_chunks(n_in: int) -> int:
    """How many equal chunks a matmul over n_in inputs runs as: the fewest of at most MAX_REDUCTION inputs each,
    each a whole number of 16-value vectors (3072 -> 4 x 768, 1024 -> 2 x 512, 1600 -> 4 x 400)."""
    c = -(-n_in // MAX_REDUCTION)
    while n_in % c or (n_in // c) % 16:
        c += 1
    return c


class Transposed(NamedTuple):
    """A bfloat16/float16 weight matrix stored (out, in) and multiplied with transpose_b; with more than
    MAX_REDUCTION inputs, stored (chunks, out, in / chunks) and multiplied chunk by chunk (`reduction_chunks`).
    oneDNN's bfloat16 matmuls read weights in the (out, in) layout about 15% faster on AMX CPUs (BENCHMARKS.md);
    float32 matmuls are faster with (in, out)."""
    t: tf.Tensor


class Quantized(NamedTuple):
    """An int8 weight matrix stored (out, in), quantized per output channel: weight ~= q * scale. Its matmul
    quantizes each input row with the row's own scale and accumulates in int32 (`matmul_int8`), which is exact in
    any order, so a row's result is the same bits in any batch, and long reductions need no chunks."""
    q: tf.Tensor  # (out, in) int8
    scale: tf.Tensor  # (out,) float32
    offset: tf.Tensor  # (out,) float32: the kernel's bias, -128 * scale / 127 * the row sums of q (activations go
    # in as unsigned, q_x + 128)


class KeepLayout(NamedTuple):
    """A Quantized weight whose matmul keeps oneDNN's laid-out copy of it: decode steps, see quantized_matmul."""
    w: Quantized


Weight = "tf.Tensor | Transposed | Quantized | KeepLayout"
Params = dict[str, Weight]  # canonical weight name -> tensor (a variable read, or a constant), in its graph form


VOCAB_MATRICES = ("wte", "head")  # (V, C) in checkpoints: the embedding, and an untied LM head


def is_matrix(name: str) -> bool:
    """Matrices run in the precision; vectors (norms, biases) and wpe stay float32, they are tiny."""
    return name in VOCAB_MATRICES or name.endswith("/w")


def graph_weight(name: str, value, cfg: ModelConfig, precision: str, xp=tf) -> Weight:
    """A checkpoint weight (matrices (in, out), wte (V, C); cast to `precision`'s dtype, float32 for int8) in the
    form the graph of `precision` multiplies it (`matmul`). wte is padded to padded_vocab rows and stored as the
    LM head's weight; `embed` reads a token's vector back from it.
    - float32: (in, out), wte (C, Vp): a float32 matmul with a transposed operand runs 1.3-2x slower on CPUs.
    - bfloat16, float16: Transposed, (out, in), in reduction chunks when long; wte (Vp, C) is (out, in) already.
    - int8: Quantized, (out, in); wte (Vp, C).
    xp=numpy computes the same form on the host from a numpy array (as views: the caller makes it contiguous):
    the loader binds weights that way (lmgraph.loader)."""
    if name in VOCAB_MATRICES:
        value = xp.transpose(xp.pad(value, [[0, padded_vocab(cfg.n_vocab) - cfg.n_vocab], [0, 0]]))  # (C, Vp)
    if not is_matrix(name) or precision == "float32":
        return value
    if precision == "int8":
        return quantize(value, xp)
    value = xp.transpose(value)  # (out, in)
    n_out, n_in = value.shape
    c = reduction_chunks(n_in)
    if c == 1:
        return Transposed(value)  # (out, in)
    return Transposed(xp.transpose(xp.reshape(value, [n_out, c, n_in // c]), [1, 0, 2]))  # (c, out, in / c)


def graph_params(weights: dict, cfg: ModelConfig, precision: str = "float32") -> Params:
    """Checkpoint weights (name -> array) as constants in the graph's form: for tests and tools that build the
    model's functions directly (the exporter binds variables instead)."""
    params = {name: graph_weight(name, tf.constant(w, tf.float32 if precision == "int8" or not is_matrix(name)
                                                   else getattr(tf, precision)), cfg, precision)
              for name, w in weights.items()}
    return with_rope(params, cfg)


def with_rope(params: Params, cfg: ModelConfig) -> Params:
    """params with the rotary position tables as constants (`rope/cos`, `rope/sin`), for families with RoPE."""
    if not cfg.rope_theta:
        return params
    cos, sin = rope_tables(cfg)
    return {**params, "rope/cos": tf.constant(cos), "rope/sin": tf.constant(sin)}


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotary frequencies (hs / 2,) float32, computed as transformers does (float32 throughout), with Llama 3's
    scaling of the low frequencies when the config has it."""
    f32 = np.float32
    hs = cfg.head_size
    inv_freq = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, hs, 2).astype(f32) / f32(hs)))  # (hs / 2,)
    if not cfg.rope_llama3:
        return inv_freq
    factor, low, high, original = (f32(v) for v in cfg.rope_llama3)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)  # long waves slowed down by factor
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every position's angles, (n_ctx, hs / 2) float32 each. Tables, not tf.cos in the graph:
    Eigen computes cos with vector code for whole vectors and scalar code for the tail, which round apart, so a
    row's angles would depend on where they fall in the batch (the module docstring); a gather is exact."""
    angles = np.arange(cfg.n_ctx, dtype=np.float32)[:, None] * rope_frequencies(cfg)[None, :]  # (n_ctx, hs / 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_at(params: Params, pos: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """cos and sin at position ids pos (...,): (..., 1, hs / 2) each, the 1 broadcasting over heads once pos's
    last axis is moved (`rotate`)."""
    return tf.gather(params["rope/cos"], pos), tf.gather(params["rope/sin"], pos)


def rotate(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    """Rotary position embedding of x (B, heads, T, hs) float32 with cos/sin (B, 1, T, hs / 2): each pair (x_j,
    x_{j + hs/2}) turned by its angle, transformers' rotate_half convention."""
    x1, x2 = tf.split(x, 2, axis=-1)  # (B, heads, T, hs / 2) each
    return tf.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def norm(x: tf.Tensor, g: tf.Tensor, b: tf.Tensor, eps: float = 1e-5) -> tf.Tensor:
    """LayerNorm over the last axis of x (M, C).

    A division by sqrt, not a product with rsqrt: sqrt and division are correctly rounded (IEEE) in vector and
    scalar code alike, so a row's value is the same bits whatever M is. Eigen computes rsqrt with a vector
    approximation for full vector registers and a scalar one for the tail, so a row's result depended on its
    position in the batch: in float32 last-bit noise, but in bfloat16 the next cast turned it into a whole bf16 step
    now and then, and greedy tokens changed with the batch. (DivNoNan, not RealDiv: Grappler rewrites x / sqrt(y)
    into x * rsqrt(y).)
    """
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return tf.math.divide_no_nan(x - mean, tf.sqrt(var + eps)) * g + b


def rms_norm(x: tf.Tensor, g: tf.Tensor, eps: float) -> tf.Tensor:
    """RMSNorm over the last axis of x (M, C): x / sqrt(mean(x^2) + eps) * g, divided as `norm` does (sqrt, not
    rsqrt, for the same reason)."""
    return tf.math.divide_no_nan(x, tf.sqrt(tf.reduce_mean(x * x, axis=-1, keepdims=True) + eps)) * g


def normalize(x: tf.Tensor, p: Callable[[str], Weight], name: str, cfg: ModelConfig) -> tf.Tensor:
    """The family's norm `name` (ln_1, ln_2, ln_f) of x (M, C): LayerNorm for GPT-2, RMSNorm otherwise."""
    if cfg.gpt2:
        return norm(x, p(f"{name}/g"), p(f"{name}/b"))
    return rms_norm(x, p(f"{name}/g"), cfg.norm_eps)


def linear(x: tf.Tensor, w: "tf.Tensor | Transposed", b: tf.Tensor | None, gelu: bool = False) -> tf.Tensor:
    """x (M, in) @ w + b (then GPT-2's tanh GELU), float32 out. The matmul runs in w's dtype (float32, float16 or
    bfloat16); a Transposed w runs as its chunks, whose results are added in float32 in chunk order (see the
    module docstring). The GELU is GPT-2's tanh approximation written with a sigmoid and y * y, not tf.nn.gelu's
    Pow, which cost 10-17% of a decode step.
    """
    y = matmul(x, w) if b is None else tf.nn.bias_add(matmul(x, w), b)
    if gelu:  # 0.5 y (1 + tanh(z)) = y sigmoid(2z), z = sqrt(2/pi) (y + 0.044715 y^3): 6 element-wise ops, not 9
        y = y * tf.sigmoid(y * (GELU_A + GELU_B * (y * y)))
    return y


def matmul(x: tf.Tensor, w: Weight) -> tf.Tensor:
    """x (M, in) @ w, float32 (M, out), in the weight's own form: float32 (in, out), Transposed or Quantized."""
    if isinstance(w, KeepLayout):
        return matmul_int8(x, w.w, keep_layout=True)
    if isinstance(w, Quantized):
        return matmul_int8(x, w)
    if isinstance(w, Transposed):
        return matmul_transposed(x, w)
    return tf.cast(tf.matmul(tf.cast(x, w.dtype), w), tf.float32)


QUANTIZE_ROWS = 1024  # rows per block when quantizing on the host


def quantize(w, xp=tf) -> Quantized:
    """A float32 matrix (in, out) as int8 (out, in) with one scale per output channel (its largest |value| -> 127).
    xp=numpy computes the same bits on the host (IEEE float32 division, rounding half to even, exact sums)."""
    if xp is tf:
        scale = tf.maximum(tf.reduce_max(tf.abs(w), axis=0), 1e-30) / 127.0  # (out,) zero channels stay zero
        q = tf.cast(tf.round(tf.transpose(w) / scale[:, None]), tf.int8)  # (out, in)
        sums = tf.reduce_sum(tf.cast(q, tf.float32), axis=1)  # (out,) exact: a few thousand int8 values
        return Quantized(q, scale, -128.0 * sums * (scale / 127.0))
    f32 = xp.float32
    scale = xp.maximum(xp.maximum(w.max(axis=0), -w.min(axis=0)), f32(1e-30)) / f32(127.0)  # (out,) no |w| copy
    # A block of rows at a time along w's memory order: no float32 transient the size of w (wte's took 0.5 s of
    # page faults at load).
    rows, along_out = (w.T, True) if w.T.flags.c_contiguous else (w, False)  # wte is (C, Vp) over a (Vp, C) array
    q = xp.empty(rows.shape, xp.int8)
    for i in range(0, len(rows), QUANTIZE_ROWS):
        block = slice(i, i + QUANTIZE_ROWS)
        t = rows[block] / (scale[block, None] if along_out else scale)
        q[block] = xp.rint(t, out=t)  # integers already: the cast is exact
    q = q if along_out else xp.ascontiguousarray(q.T)  # (out, in)
    sums = q.sum(axis=1, dtype=xp.int32).astype(f32)  # (out,)
    return Quantized(q, scale, f32(-128.0) * sums * (scale / f32(127.0)))


def matmul_int8(x: tf.Tensor, w: Quantized, keep_layout: bool = False) -> tf.Tensor:
    """x (M, in) @ w, float32 (M, out), through oneDNN's int8 matmul (VNNI or AMX where the CPU has them).

    Each row is quantized with its own scale s (its largest |value| -> 127), never one shared by the batch, so a
    row's integers, and with them its exact int32 sums, do not depend on its neighbours. The kernel takes the
    activations unsigned, u = q_x + 128 (w.offset takes the 128s back out), and scales each channel's sum by
    w.scale / 127; the row's s is applied after.
    """
    x = tf.cast(x, tf.float32)  # attention's output comes in the cache's dtype
    s = tf.maximum(tf.reduce_max(tf.abs(x), axis=1, keepdims=True), 1e-30)  # (M, 1) a zero row stays zero
    u = tf.cast(x * (127.0 / s) + 128.5, tf.uint8)  # (M, in) in [1, 255]: q_x + 128, q_x rounded half up
    return quantized_matmul(tf.bitcast(u, tf.quint8), w, keep_layout) * s  # (M, out)


def quantized_matmul(u: tf.Tensor, w: Quantized, keep_layout: bool = False) -> tf.Tensor:
    """u (M, in) quint8 @ w.q (out, in) qint8 transposed: float32 (M, out), each channel's integer sum times
    w.scale / 127, plus w.offset.

    TensorFlow's oneDNN op `_QuantizedMatMul` (no Python wrapper: built as a node). With keep_layout it is told
    its weight is constant (`is_weight_const`): it reorders q into oneDNN's blocked layout on its first call and
    keeps that copy (our weights never change once bound, so the copy stays right), where
    QuantizedMatMulWithBiasAndDequantize reordered on every call, which cost more than the matmul itself
    (BENCHMARKS.md). Each node keeps its own copy, so only decode steps, which multiply every weight once per
    token, keep one; prefill and scoring multiply q as TensorFlow holds it (no copy, about 10% slower a call).
    The kernel's scale of a channel is max(|min|, |max|) / 127 of the weight range it is given (w.scale,
    w.scale), and 1 for u's range (0, 255).
    """
    attr = tf.compat.v1.AttrValue
    types = lambda ts: attr(list=attr.ListValue(type=[t.as_datatype_enum for t in ts]))  # noqa: E731
    u_range = [tf.constant(v, tf.float32) for v in (0.0, 255.0)]
    graph = tf.compat.v1.get_default_graph()
    return graph.create_op(
        "_QuantizedMatMul", [u, tf.bitcast(w.q, tf.qint8), w.offset, *u_range, w.scale, w.scale],
        [tf.float32], name=graph.unique_name("QuantizedMatMul"),
        attrs={"Tdevice_inputs": types([tf.quint8, tf.qint8, tf.float32]), "Thost_inputs": types([tf.float32] * 4),
               "Tdevice_outputs": types([tf.float32]), "Thost_outputs": types([]),
               "T1": attr(type=tf.quint8.as_datatype_enum), "T2": attr(type=tf.qint8.as_datatype_enum),
               "Tbias": attr(type=tf.float32.as_datatype_enum), "U": attr(type=tf.float32.as_datatype_enum),
               "Tout": attr(type=tf.float32.as_datatype_enum), "transpose_a": attr(b=False),
               "transpose_b": attr(b=True), "is_weight_const": attr(b=keep_layout), "is_bias_const": attr(b=True),
               "fused_ops": attr(list=attr.ListValue(s=[b"BiasAdd", b"Dequantize"])),
               "input_quant_mode": attr(s=b"SCALED"), "output_quant_mode": attr(s=b"SCALED")}).outputs[0]


def matmul_transposed(x: tf.Tensor, w: Transposed) -> tf.Tensor:
    """x (M, in) @ w, float32 (M, out): one matmul, or one per chunk of w (chunks, out, in / chunks), added in
    chunk order."""
    x = tf.cast(x, w.t.dtype)
    if w.t.shape.rank == 2:
        return tf.cast(tf.matmul(x, w.t, transpose_b=True), tf.float32)  # (M, out)
    c, _, k = w.t.shape
    xs = tf.transpose(tf.reshape(x, [-1, c, k]), [1, 0, 2])  # (c, M, k)
    ys = tf.cast(tf.matmul(xs, w.t, transpose_b=True), tf.float32)  # (c, M, out)
    y = ys[0]
    for i in range(1, c):
        y = y + ys[i]
    return y


def matmul_dtype(params: Params) -> tf.DType:
    """The dtype the KV cache and attention run in unless the cache says otherwise: the weights' (float32 for int8
    weights; the exporter also builds int8 with a bfloat16 cache, for CPUs with bfloat16 units)."""
    wte = params["wte"]
    if isinstance(wte, Quantized):
        return tf.float32
    return wte.t.dtype if isinstance(wte, Transposed) else wte.dtype


def mlp(x: tf.Tensor, p: Callable[[str], tf.Tensor], cfg: ModelConfig) -> tf.Tensor:
    """GPT-2's GELU MLP, or the Llama family's SwiGLU: c_fc holds the gate and up projections side by side (one
    matmul, lmgraph.checkpoint), silu(gate) * up goes down through c_proj."""
    if cfg.gpt2:
        h = linear(x, p("mlp/c_fc/w"), p("mlp/c_fc/b"), gelu=True)  # (M, 4C)
        return linear(h, p("mlp/c_proj/w"), p("mlp/c_proj/b"))  # (M, C)
    gate, up = tf.split(matmul(x, p("mlp/c_fc/w")), 2, axis=1)  # (M, I) each
    return matmul(gate * tf.sigmoid(gate) * up, p("mlp/c_proj/w"))  # (M, C)


def attend(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, bias: tf.Tensor, float64_sums: bool = False) -> tf.Tensor:
    """Scaled dot-product attention. q (B, nh, Tq, hs), k/v (B, nkv, Tk, hs) in the cache's dtype, bias
    (B, 1, Tq, Tk) additive mask. The matmuls run in the cache's dtype, the softmax in float32.

    Grouped-query attention (nkv < nh): the g = nh / nkv query heads of a key/value head (heads j*g .. j*g + g - 1,
    transformers' repeat_kv) each multiply its keys and values, broadcast, not copied g times. Not as g * Tq rows of
    one matmul: oneDNN's float32 kernel for several rows splits the sum over the cache's columns by the run's
    cache width, and a decode step's values then changed with it (an AVX2 AMD EPYC, 400 columns).

    float64_sums (int8 weights with a float32 cache, several queries a row: prefill, scoring): multiply in float64
    and round once to float32. oneDNN's AVX2 float32 batch matmul sums even q . k's 64 products in an order that
    depends on Tq and Tk (the part's padded prompt length), so an int8 row, the same bits in every weight matmul in
    any batch, changed with its batch on CPUs without bfloat16 units. float64's matmul is Eigen's (no oneDNN
    kernel) and each product is exact in it: the float32 it rounds to is the same bits in any order but in
    vanishingly rare ties (a prefill of 128 x 64 tokens on AVX2: +10%). Decode's one query a row needs none: its
    float32 kernel keeps a row's bits at any width and batch (test_invariance)."""
    q = q * tf.constant(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    dtype = tf.float64 if float64_sums else q.dtype
    nh, nkv = q.shape[1], k.shape[1]
    if nh == nkv:
        w = tf.cast(tf.matmul(tf.cast(q, dtype), tf.cast(k, dtype), transpose_b=True), tf.float32) + bias  # (B,nh,Tq,Tk)
        return tf.cast(tf.matmul(tf.cast(softmax(w), dtype), tf.cast(v, dtype)), v.dtype)  # (B, nh, Tq, hs)
    B, Tq, hs, out = tf.shape(q)[0], tf.shape(q)[2], q.shape[3], v.dtype
    q = tf.reshape(q, [B, nkv, nh // nkv, Tq, hs])  # (B, nkv, g, Tq, hs) a key/value head's g query heads
    k, v = tf.cast(k, dtype)[:, :, None], tf.cast(v, dtype)[:, :, None]  # (B, nkv, 1, Tk, hs) broadcast over g
    w = tf.cast(tf.matmul(tf.cast(q, dtype), k, transpose_b=True), tf.float32) + bias[:, :, None]  # (B,nkv,g,Tq,Tk)
    return tf.reshape(tf.cast(tf.matmul(tf.cast(softmax(w), dtype), v), out), [B, nh, Tq, hs])


def softmax(w: tf.Tensor) -> tf.Tensor:
    """Softmax over the last axis, its sum exact (`exact_sum`): TensorFlow's softmax and reduce_sum order a row's
    sum by how they split the whole tensor, which depends on the row count (on AVX2 CPUs a row among 48 came out
    other bits than alone). exp runs over a width padded to whole pairs of 16-float vectors, so a row's values fall
    in vector lanes, never in the scalar tail, whatever the run's cache width."""
    n = tf.shape(w)[-1]
    pad = round_up(n, SOFTMAX_MULTIPLE) - n
    paddings = tf.concat([tf.zeros([tf.rank(w) - 1, 2], tf.int32), [[0, pad]]], 0)
    w = tf.pad(w, paddings, constant_values=NEG_INF)
    e = tf.exp(w - tf.reduce_max(w, axis=-1, keepdims=True))  # in [0, 1]; masked columns 0
    return (e / tf.cast(exact_sum(e), tf.float32)[..., None])[..., :n]


def embed(params: Params, ids: tf.Tensor, pos: tf.Tensor) -> tf.Tensor:
    """Token (+ learned position, where the model has wpe) embeddings (..., C) float32 for ids and position ids of
    the same shape, the token vectors read from wte in its LM-head form (graph_weight)."""
    wte, flat = params["wte"], tf.reshape(ids, [-1])
    if isinstance(wte, Transposed) and wte.t.shape.rank == 3:  # (c, Vp, C / c): a token's c chunks side by side
        tokens = tf.transpose(tf.gather(wte.t, flat, axis=1), [1, 0, 2])  # (n, c, C / c)
    elif isinstance(wte, Transposed):  # (Vp, C)
        tokens = tf.gather(wte.t, flat)  # (n, C)
    elif isinstance(wte, Quantized):  # (Vp, C): a token's row, times its scale
        tokens = tf.cast(tf.gather(wte.q, flat), tf.float32) * tf.gather(wte.scale, flat)[:, None]
    else:  # (C, Vp)
        tokens = tf.transpose(tf.gather(wte, flat, axis=1))  # (n, C)
    tokens = tf.reshape(tf.cast(tokens, tf.float32), tf.concat([tf.shape(ids), [-1]], 0))  # (..., C)
    if "wpe" not in params:  # rotary positions: applied to queries and keys instead (rotate)
        return tokens
    return tokens + tf.cast(tf.gather(params["wpe"], pos), tf.float32)


def lm_head(params: Params, cfg: ModelConfig, x: tf.Tensor) -> tf.Tensor:
    """x (M, C) -> logits (M, Vp) float32, Vp = padded_vocab(V), -inf past V: ln_f, then the output projection."""
    return logits_of(params, cfg, normalize(x, params.get, "ln_f", cfg))


def logits_of(params: Params, cfg: ModelConfig, x: tf.Tensor) -> tf.Tensor:
    """Normalised hidden states x (M, C) -> logits (M, Vp) float32, -inf past V (the padding is never chosen).
    The output projection is wte (tied) or the model's own head."""
    V, Vp = cfg.n_vocab, padded_vocab(cfg.n_vocab)
    vocab_mask = tf.constant([0.0] * V + [-math.inf] * (Vp - V), tf.float32)  # (Vp,)
    return matmul(x, params["wte" if cfg.tied_head else "head"]) + vocab_mask


def row_sum_exp(logits: tf.Tensor, top: tf.Tensor) -> tf.Tensor:
    """sum(exp(logits - top)) per row (M,), float64, the same bits in any summation order: each term (at most 1,
    top being the row's max) is rounded to a multiple of 2^-36 and the integers are summed, which is exact. A float
    sum's order follows how the kernel splits the row across threads, which depends on the row count."""
    return exact_sum(tf.exp(logits - top[:, None]))  # (M,)


def exact_sum(e: tf.Tensor) -> tf.Tensor:
    """Sums over the last axis of e (..., n), values in [0, 1], float64 (...,): each value rounded to a multiple of
    2^-36 and the integers summed, which is exact in any order (2^36 x 2^16 values stays below 2^53)."""
    q = tf.cast(tf.round(tf.cast(e, tf.float64) * EXACT_SCALE), tf.int64)
    return tf.cast(tf.reduce_sum(q, axis=-1), tf.float64) / EXACT_SCALE


def log_softmax_at(logits: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """log p(index) per row = logit - logsumexp(logits), (M,) float32 for logits (M, Vp), index (M,)."""
    top = tf.reduce_max(logits, axis=-1)  # (M,)
    lse = tf.cast(top, tf.float64) + tf.math.log(row_sum_exp(logits, top))
    return tf.cast(tf.cast(tf.gather(logits, index, batch_dims=1), tf.float64) - lse, tf.float32)


def layer_params(params: Params, i: int) -> Callable[[str], Weight | None]:
    """Layer i's weights by their name in the layer (None for one its family lacks, such as a bias)."""
    return lambda name: params.get(f"h{i}/{name}")


class KVCache:
    """The KV cache `past` (n_layer, 2, B, nkv, L, hs) while a pass builds its graph: a flat buffer of rows of hs
    values, written in place (InplaceUpdate) layer by layer, so a write costs the same whatever L is (module
    docstring). columns (b, Tq): the cache columns the pass writes in each of its rows; slots (b,): the slot of
    each row (default: 0..b-1). Every layer writes the same positions of its own part of the buffer, so their
    row numbers are computed once."""

    def __init__(self, past: tf.Tensor, columns: tf.Tensor, slots: tf.Tensor | None = None):
        self.shape = tf.shape(past)
        n_layer, _, self.B, self.nh, self.L, self.hs = tf.unstack(self.shape)
        self.rows = tf.reshape(past, [-1, self.hs])  # (n_layer*2*B*nh*L, hs) the same buffer, row-addressable
        slots = tf.range(tf.shape(columns)[0]) if slots is None else slots
        kind = tf.range(2)[:, None, None, None]  # (2, 1, 1, 1) K then V
        head = tf.range(self.nh)[None, None, :, None]  # (1, 1, nh, 1)
        row = (kind * self.B + slots[None, :, None, None]) * self.nh + head  # (2, b, nh, 1) in layer 0
        self.index = tf.reshape(row * self.L + columns[None, :, None, :], [-1])  # (2*b*nh*Tq,) in layer 0
        self.layer_rows = 2 * self.B * self.nh * self.L  # rows of one layer's keys and values

    def write(self, i: int, kv: tf.Tensor) -> None:
        """Layer i's keys and values kv (2, b, nkv, Tq, hs) into the pass's columns of its slots."""
        self.rows = tf.raw_ops.InplaceUpdate(x=self.rows, i=self.index + i * self.layer_rows,
                                             v=tf.reshape(kv, [-1, self.hs]))

    def layer(self, i: int) -> tuple[tf.Tensor, tf.Tensor]:
        """Layer i's keys and values (B, nkv, L, hs): views of the buffer, no copy."""
        kv = tf.reshape(self.rows, self.shape)[i]  # (2, B, nh, L, hs)
        return kv[0], kv[1]

    def past(self) -> tf.Tensor:
        return tf.reshape(self.rows, self.shape)


def block(x: tf.Tensor, p: Callable[[str], Weight], cfg: ModelConfig, B: tf.Tensor, Tq: tf.Tensor,
          keys_values: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]], bias: tf.Tensor,
          dtype: tf.DType, rope: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
    """One transformer block on x (B*Tq, C) float32, Tq positions per row: attention, then the MLP, each on the
    norm of the residual and added to it. keys_values(kv) keeps this pass's keys and values (2, B, nkv, Tq, hs)
    and gives those its queries attend to (B, nkv, Tk, hs), masked by bias (B or 1, 1, Tq, Tk). rope: cos and
    sin (B, 1, Tq, hs / 2) of the queries' positions, for rotary families."""
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_size
    qkv = linear(normalize(x, p, "ln_1", cfg), p("attn/c_attn/w"), p("attn/c_attn/b"))  # (B*Tq, (nh + 2nkv) hs)
    if rope is None:
        qkv = tf.transpose(tf.reshape(tf.cast(qkv, dtype), [B, Tq, 3, nh, hs]), [2, 0, 3, 1, 4])  # (3,B,nh,Tq,hs)
        q, kv = qkv[0], qkv[1:]  # a view of K and V, no copy
    else:  # queries and keys turned by their positions in float32, then cast
        qkv = tf.transpose(tf.reshape(qkv, [B, Tq, nh + 2 * nkv, hs]), [0, 2, 1, 3])  # (B, nh + 2nkv, Tq, hs)
        q, k, v = tf.split(qkv, [nh, nkv, nkv], axis=1)
        q = tf.cast(rotate(q, *rope), dtype)  # (B, nh, Tq, hs)
        kv = tf.cast(tf.stack([rotate(k, *rope), v]), dtype)  # (2, B, nkv, Tq, hs)
    exact = dtype == tf.float32 and isinstance(p("attn/c_attn/w"), Quantized)  # int8 prefill, float32 cache
    a = attend(q, *keys_values(kv), bias, exact)  # (B, nh, Tq, hs)
    a = tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [B * Tq, nh * hs])  # (B*Tq, nh*hs)
    x = x + linear(a, p("attn/c_proj/w"), p("attn/c_proj/b"))
    return x + mlp(normalize(x, p, "ln_2", cfg), p, cfg)


def forward(params: Params, cfg: ModelConfig, ids: tf.Tensor,
            keep: Callable[[int, tf.Tensor], None] | None = None,
            dtype: tf.DType | None = None) -> tf.Tensor:
    """The transformer over right-padded ids (B, T): hidden states (B*T, C) before ln_f. keep(i, kv), if given,
    is handed layer i's keys and values (2, B, nkv, T, hs), of columns [0, T). Padding comes after each row's
    tokens, so the causal mask alone keeps it out of them; its own outputs are unused.
    """
    B, T = tf.shape(ids)[0], tf.shape(ids)[1]
    dtype = dtype or matmul_dtype(params)  # attention's: the cache's when there is one
    t = tf.range(T)
    columns = tf.broadcast_to(t, [B, T])  # (B, T)
    bias = tf.where(t[:, None] >= t[None, :], 0.0, NEG_INF)[None, None]  # (1, 1, T, T) causal

    x = tf.reshape(embed(params, ids, columns), [B * T, cfg.n_embd])  # (B*T, C)
    rope = None if "rope/cos" not in params else [r[:, None] for r in rope_at(params, columns)]  # (B, 1, T, hs/2)
    for i in range(cfg.n_layer):
        def keys_values(kv, i=i):  # the prompt attends to its own keys and values
            if keep is not None:
                keep(i, kv)
            return kv[0], kv[1]
        x = block(x, layer_params(params, i), cfg, B, T, keys_values, bias, dtype, rope)
    return x


def prefill(params: Params, cfg: ModelConfig, ids: tf.Tensor, lengths: tf.Tensor, past: tf.Tensor | None = None,
            slots: tf.Tensor | None = None, which: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Run the right-padded prompts ids (U, T) with real lengths (U,): the logits of each prompt's last token
    (U, Vp), and given the cache past (n_layer, 2, S, nkv, L >= T, hs), past with the keys/values of prompt
    which[j] written in place into columns [0, T) of slot slots[j] (default: prompt j into slot j). Layer by
    layer, straight into the slots: no cache of the prompts' own, no copy of it.
    """
    U, T = tf.shape(ids)[0], tf.shape(ids)[1]
    which = tf.range(U) if which is None else which
    cache = None if past is None else KVCache(past, tf.broadcast_to(tf.range(T), [tf.size(which), T]), slots)

    def keep(i, kv):
        cache.write(i, tf.gather(kv, which, axis=1))

    x = forward(params, cfg, ids, None if cache is None else keep, None if past is None else past.dtype)
    last = tf.gather(tf.reshape(x, [U, T, cfg.n_embd]), lengths - 1, batch_dims=1)  # (U, C) each row's last token
    return lm_head(params, cfg, last), None if cache is None else cache.past()


def decode_step(params: Params, cfg: ModelConfig, token: tf.Tensor, pos: tf.Tensor, column: tf.Tensor,
                past: tf.Tensor, key_bias: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One new token per row: token (B,), position ids (B,), the cache column each row writes (B,) -> logits
    (B, Vp), updated past. Rows are independent: each writes its own column (continuous batching puts rows at
    different steps side by side), and key_bias (B, 1, 1, L) masks the columns a row has not written yet.
    """
    cache = KVCache(past, column[:, None])
    x = embed(params, token, pos)  # (B, C)
    rope = None if "rope/cos" not in params else [r[:, None, None] for r in rope_at(params, pos)]  # (B,1,1,hs/2)
    params = {name: KeepLayout(w) if isinstance(w, Quantized) else w for name, w in params.items()}
    for i in range(cfg.n_layer):
        def keys_values(kv, i=i):  # the row's new key and value join its cache; it attends to all of it
            cache.write(i, kv)
            return cache.layer(i)
        x = block(x, layer_params(params, i), cfg, cache.B, 1, keys_values, key_bias, past.dtype, rope)
    return lm_head(params, cfg, x), cache.past()


SCORE_CHUNK = 1024  # positions per LM-head chunk when scoring: (1024, V) float32 logits are 200 MB


def score(params: Params, cfg: ModelConfig, ids: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """log p(ids[:, t] | ids[:, <t]) under the model, (B, T) float32, for right-padded ids (B, T) with real
    lengths (B,); 0 at padding and at each row's first token, which has no context (prepend <|endoftext|> to
    score it). The LM head runs over SCORE_CHUNK positions at a time: memory holds one chunk's logits, never
    (B*T, V).
    """
    B, T = tf.shape(ids)[0], tf.shape(ids)[1]
    x = forward(params, cfg, ids)
    h = normalize(x, params.get, "ln_f", cfg)  # (B*T, C)
    predicted = tf.reshape(tf.concat([ids[:, 1:], ids[:, -1:]], 1), [-1])  # (B*T,) the token after each position
    M = B * T
    chunks = (M + SCORE_CHUNK - 1) // SCORE_CHUNK

    def chunk(i, out):
        span = tf.range(i * SCORE_CHUNK, tf.minimum((i + 1) * SCORE_CHUNK, M))
        logits = logits_of(params, cfg, tf.gather(h, span))  # (K, Vp)
        return i + 1, out.write(i, log_softmax_at(logits, tf.gather(predicted, span)))

    _, out = tf.while_loop(lambda i, _: i < chunks, chunk,
                           (tf.constant(0), tf.TensorArray(tf.float32, size=chunks, infer_shape=False)))
    after = tf.reshape(out.concat(), [B, T])  # after[:, t] = log p(ids[:, t + 1] | ids[:, <= t])
    logprobs = tf.concat([tf.zeros([B, 1]), after[:, :-1]], 1)  # (B, T) log p(ids[:, t] | ids[:, < t])
    t = tf.range(T)[None, :]
    return tf.where((t > 0) & (t < lengths[:, None]), logprobs, 0.0)


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """murmur3's 32-bit finaliser: a bijective avalanche hash on uint32."""
    rs, xor = tf.bitwise.right_shift, tf.bitwise.bitwise_xor
    x = xor(x, rs(x, tf.constant(16, tf.uint32))) * tf.constant(0x85EBCA6B, tf.uint32)
    x = xor(x, rs(x, tf.constant(13, tf.uint32))) * tf.constant(0xC2B2AE35, tf.uint32)
    return xor(x, rs(x, tf.constant(16, tf.uint32)))


def token_uniform(seed: tf.Tensor, step: tf.Tensor, token_ids: tf.Tensor) -> tf.Tensor:
    """A uniform (0, 1) number per (row seed, step, token id) alone: a stateless counter-based generator.

    TF's stateless random ops take one seed per op; per-row seeds need a vectorised keyed hash instead.
    seed (B,) int64, step scalar int32, token_ids (B, K) int32 -> (B, K) float32 with 24 random bits.
    """
    u32 = lambda v: tf.constant(v, tf.uint32)  # noqa: E731
    xor = tf.bitwise.bitwise_xor
    halves = tf.bitcast(seed, tf.uint32)  # (B, 2)
    row = _mix32(xor(halves[:, 0], _mix32(halves[:, 1] + u32(0x9E3779B9))))  # (B,)
    row = _mix32(xor(row, _mix32(tf.cast(step, tf.uint32) + u32(0x7F4A7C15))))  # (B,)
    token = _mix32(tf.cast(token_ids, tf.uint32) * u32(0x27D4EB2F) + u32(0x165667B1))  # (B, K)
    h = _mix32(xor(row[:, None], token))  # (B, K)
    return (tf.cast(tf.bitwise.right_shift(h, u32(8)), tf.float32) + 0.5) * (1.0 / (1 << 24))


def sample_tokens(logits: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor,
                  seed: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """Temperature, top-k, top-p sampling by the Gumbel-max trick: argmax(logit / T + Gumbel noise) over the
    kept tokens is an exact draw from their softmax.

    The noise of each candidate is keyed by (row seed, step, token id), so a row's draw depends on nothing but
    its own logits, parameters, seed and step. It is also robust: logits differ in the last bits between batch
    shapes (matmul kernels vary with the row count), and an inverse-CDF draw over thousands of tiny
    probabilities flips on such noise, while Gumbel-max flips only if the two best perturbed scores are within
    it.

    The kept set is the same whatever K (the batch's largest top-k; the whole vocabulary when a sampled row has
    none), so a row's draw does not depend on its neighbours' top_k:
    - the first n tokens by rank are kept, ties broken by token id (TopKV2 puts the lower index first for any K),
      not every token tied with the last kept value: bfloat16 logits tie often, and a K of 40 would cut a tie
      group that a K of the whole vocabulary keeps whole;
    - the nucleus sums run in float64, where the sum of a few float32 values is exact in any order (a scan's
      order may change with its length); top_p = 1 keeps all of the top k without them.
    """
    V = tf.shape(logits)[1]
    k_row = tf.where(top_k > 0, tf.minimum(top_k, V), V)  # (B,)
    K = tf.reduce_max(tf.where(temperature > 0, k_row, 1))
    K = tf.minimum(round_up(K, CANDIDATE_MULTIPLE), V)  # whole vectors (module docstring)
    scaled = logits / tf.where(temperature > 0, temperature, 1.0)[:, None]  # (B, V)
    vals, idx = tf.math.top_k(scaled, K)  # (B, K) descending
    rank = tf.range(K)[None, :]
    in_top_k = rank < k_row[:, None]  # (B, K)
    e = tf.cast(tf.where(in_top_k, tf.exp(vals - vals[:, :1]), 0.0), tf.float64)  # (B, K) unnormalised
    total = tf.cumsum(e, axis=1)[:, -1:]  # (B, 1)
    nucleus = tf.cumsum(e, axis=1, exclusive=True) < tf.cast(top_p, tf.float64)[:, None] * total  # (B, K)
    keep = (nucleus | (top_p >= 1.0)[:, None]) & in_top_k
    n_keep = tf.maximum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1), 1)  # (B,) nucleus size, at least 1
    gumbel = -tf.math.log(-tf.math.log(token_uniform(seed, step, idx)))  # (B, K)
    perturbed = tf.where(rank < n_keep[:, None], vals + gumbel, -math.inf)  # (B, K)
    return tf.gather(idx, tf.argmax(perturbed, axis=1, output_type=tf.int32), batch_dims=1)  # (B,)


def choose_tokens(logits: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor,
                  seed: tf.Tensor, step: tf.Tensor, want_logprobs: tf.Tensor | bool = True
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Next token per row (greedy where temperature == 0) and, when wanted, its log-probability under the model
    (B,); zeros otherwise (the log-sum-exp over the vocabulary is 6% of a batch-128 step). logits (B, Vp)."""
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)  # (B,)
    token = tf.cond(
        tf.reduce_any(temperature > 0),
        lambda: tf.where(temperature > 0, sample_tokens(logits, temperature, top_k, top_p, seed, step), greedy),
        lambda: greedy)  # skip the sort when the whole batch is greedy
    return token, tf.cond(want_logprobs, lambda: log_softmax_at(logits, token), lambda: tf.zeros_like(logits[:, 0]))




class Slots(NamedTuple):
    """The rows being decoded, one per slot (S slots), and where each one stands."""
    request: tf.Tensor  # (S,) int32 the output row in the slot (R: none yet)
    step: tf.Tensor  # (S,) int32 the row's own step whose token it chose last (0: the token after its prompt)
    token: tf.Tensor  # (S,) int32 that token: the row's next input
    done: tf.Tensor  # (S,) bool the row has ended, or the slot is empty: the slot takes the next request
    n_new: tf.Tensor  # (S,) int32 tokens the row has emitted
    text: tf.Tensor  # (S,) string the row's bytes so far (kept only when there are stop strings)


class Outputs(NamedTuple):
    """What the run returns, filled as rows emit and end. Flat, with one spare element at the end that takes the
    writes of rows with nothing to write (a scatter writes every row it is given)."""
    tokens: tf.Tensor  # (R*N + 1,) int32 request r's token of step k at r*N + k (eot where none)
    logprobs: tf.Tensor  # (R*N + 1,) float32 its log-probability (0 where none)
    lengths: tf.Tensor  # (R + 1,) int32 tokens emitted, written when the row ends
    finish: tf.Tensor  # (R + 1,) int32 LENGTH, END_OF_TEXT or STOP_STRING once the row ends, UNFINISHED before


class LoopState(NamedTuple):
    """What the decode loop carries from one iteration to the next."""
    slots: Slots
    past: tf.Tensor  # (n_layer, 2, S, nkv, L, hs) the KV cache, a row per slot
    next_request: tf.Tensor  # () int32 the first request not yet admitted (they are admitted in order)
    out: Outputs


class Run(NamedTuple):
    """What one `generate` call decodes, fixed for the whole loop: the model, the prompts and each request's
    parameters (R requests, N = the largest max_new_tokens, L cache columns)."""
    params: Params
    cfg: ModelConfig
    ids: tf.Tensor  # (B, T) int32 the distinct prompts, right padded
    lengths: tf.Tensor  # (B,) int32
    prompt_index: tf.Tensor  # (R,) int32 the prompt each request continues
    row_length: tf.Tensor  # (R,) int32 its prompt's length
    max_new_tokens: tf.Tensor  # (R,) int32
    temperature: tf.Tensor  # (R,) float32
    top_k: tf.Tensor  # (R,) int32
    top_p: tf.Tensor  # (R,) float32
    seed: tf.Tensor  # (R,) int64
    ignore_eos: tf.Tensor  # (R,) bool
    want_logprobs: tf.Tensor  # () bool
    stop_pattern: tf.Tensor  # () string
    token_bytes: tf.Tensor  # (V,) string
    eot: int
    R: tf.Tensor
    N: tf.Tensor
    L: tf.Tensor


class Chosen(NamedTuple):
    """Rows' tokens of one step and what follows from them."""
    token: tf.Tensor  # (k,) int32 the token (eot where the row emitted none)
    done: tf.Tensor  # (k,) bool the row has ended (or its slot was empty)
    n_new: tf.Tensor  # (k,) int32 tokens emitted so far
    text: tf.Tensor  # (k,) string the row's bytes so far


def scatter(x: tf.Tensor, index: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """x with x[index[j]] = values[j] (x and index 1-D)."""
    return tf.tensor_scatter_nd_update(x, index[:, None], values)


def ends_row(token: tf.Tensor, cfg: ModelConfig) -> tf.Tensor:
    """Whether each token (k,) is one of the model's end-of-sequence tokens (a list in Llama 3's and Qwen2's
    generation_config.json)."""
    ends = tf.equal(token, cfg.eos_ids[0])
    for eos in cfg.eos_ids[1:]:
        ends = ends | tf.equal(token, eos)
    return ends


def choose(run: Run, request: tf.Tensor, step: tf.Tensor, logits: tf.Tensor, n_new: tf.Tensor, text: tf.Tensor,
           active: tf.Tensor, out: Outputs) -> tuple[Chosen, Outputs]:
    """Each row's token of `step` from its logits (k, Vp), then what follows from it: whether the row ends (its
    max_new_tokens, end-of-text, a stop string), its text, the outputs. active (k,): rows that had not ended
    (False for empty slots). request (k,) the rows' requests (R for an empty slot)."""
    R, N = run.R, run.N
    r = tf.minimum(request, R - 1)  # an empty slot reads some row's parameters, and uses none of them
    limit = tf.gather(run.max_new_tokens, r)
    live = active & (n_new < limit)
    token, logprob = choose_tokens(logits, tf.where(live, tf.gather(run.temperature, r), 0.0),
                                   tf.gather(run.top_k, r), tf.gather(run.top_p, r), tf.gather(run.seed, r), step,
                                   run.want_logprobs)
    at_eot = live & ends_row(token, run.cfg) & ~tf.gather(run.ignore_eos, r)
    kept = live & ~at_eot
    n_new = n_new + tf.cast(kept, tf.int32)
    token = tf.where(kept, token, run.eot)

    def append():  # the row's text with this token's bytes, and whether it now holds a stop string
        grown = tf.strings.join([text, tf.where(kept, tf.gather(run.token_bytes, token), "")])
        return grown, tf.strings.regex_full_match(grown, run.stop_pattern) & kept

    text, at_stop = tf.cond(tf.strings.length(run.stop_pattern) > 0, append, lambda: (text, tf.zeros_like(kept)))
    done = ~active | at_eot | at_stop | (n_new >= limit)
    ended = active & done
    at = tf.where(kept, request * N + step, R * N)  # the spare element for rows with no token
    finish = tf.where(at_eot, END_OF_TEXT, tf.where(at_stop, STOP_STRING, LENGTH))
    row = tf.where(ended, request, R)
    out = Outputs(tokens=scatter(out.tokens, at, token),
                  logprobs=scatter(out.logprobs, at, tf.where(kept, logprob, 0.0)),
                  lengths=scatter(out.lengths, row, n_new), finish=scatter(out.finish, row, finish))
    return Chosen(token, done, n_new, text), out


def admit(run: Run, s: LoopState) -> LoopState:
    """The next requests into the free slots, in order, a group at a time (`admit_group`), so that a prefill's
    activations stay those of a few rows whatever S is (all of S's prompts at once were most of a job's peak
    memory): ADMIT_ROWS rows, fewer where the run's longest prompt x n_embd would pass ADMIT_WIDTH. The slots are
    all filled before the next decode step."""
    free = tf.cast(tf.where(s.slots.done)[:, 0], tf.int32)  # (F,) in slot order
    k = tf.minimum(tf.size(free), run.R - s.next_request)
    rows = tf.clip_by_value(ADMIT_WIDTH // run.cfg.n_embd // tf.reduce_max(run.lengths), 1, ADMIT_ROWS)

    def group(i, s):
        j = tf.range(i, tf.minimum(i + rows, k))  # (g,) the group's place among the k
        return i + rows, admit_group(run, s, tf.gather(free, j), s.next_request + j)

    # one group at a time (parallel iterations would prefill several groups at once: their memory with them)
    _, s = tf.while_loop(lambda i, _: i < k, group, (tf.constant(0), s), parallel_iterations=1)
    return s._replace(next_request=s.next_request + k)


def admit_group(run: Run, s: LoopState, slot: tf.Tensor, request: tf.Tensor) -> LoopState:
    """Requests (g,) into free slots (g,): their prompts prefilled together (a prompt repeated among them, a row's
    samples, once), written into the slots' cache rows, their first tokens chosen."""
    g = tf.size(slot)
    prompts, which = tf.unique(tf.gather(run.prompt_index, request))  # (u,), (g,) each prompt prefilled once
    m = tf.reduce_max(tf.gather(run.lengths, prompts))  # prefill pads to the longest of these prompts only
    logits, past = prefill(run.params, run.cfg, tf.gather(run.ids, prompts)[:, :m], tf.gather(run.lengths, prompts),
                           s.past, slot, which)  # (u, Vp); each prompt's keys/values into its slots
    zero = tf.zeros([g], tf.int32)
    c, out = choose(run, request, zero, tf.gather(logits, which), zero, tf.fill([g], ""), tf.ones([g], tf.bool),
                    s.out)
    sl = s.slots
    slots = Slots(request=scatter(sl.request, slot, request), step=scatter(sl.step, slot, zero),
                  token=scatter(sl.token, slot, c.token), done=scatter(sl.done, slot, c.done),
                  n_new=scatter(sl.n_new, slot, c.n_new), text=scatter(sl.text, slot, c.text))
    return LoopState(slots, past, s.next_request, out)


def decode(run: Run, s: LoopState) -> LoopState:
    """One token for every slot: each row feeds its last token at its own column and position."""
    sl = s.slots
    length = tf.gather(run.row_length, tf.minimum(sl.request, run.R - 1))  # (S,)
    column = tf.minimum(length + sl.step, run.L - 1)  # (S,) an empty slot's count runs on: clamped, and unused
    pos = tf.minimum(column, run.cfg.n_ctx - 1)  # (S,)
    visible = tf.range(run.L)[None, :] <= column[:, None]  # (S, L) its prompt and its tokens so far
    key_bias = tf.where(visible, 0.0, NEG_INF)[:, None, None, :]  # (S, 1, 1, L)
    logits, past = decode_step(run.params, run.cfg, sl.token, pos, column, s.past, key_bias)
    step = sl.step + 1
    c, out = choose(run, sl.request, step, logits, sl.n_new, sl.text, ~sl.done, s.out)
    return LoopState(Slots(sl.request, step, c.token, c.done, c.n_new, c.text), past, s.next_request, out)


def loop_body(run: Run, s: LoopState) -> LoopState:
    """Admit requests while slots are free, then decode a token in every occupied slot."""
    s = tf.cond(tf.reduce_any(s.slots.done) & (s.next_request < run.R), lambda: admit(run, s), lambda: s)
    return tf.cond(tf.reduce_all(s.slots.done), lambda: s, lambda: decode(run, s))


def generate(params: Params, cfg: ModelConfig, ids: tf.Tensor, lengths: tf.Tensor, prompt_index: tf.Tensor,
             want_logprobs: tf.Tensor, deadline: tf.Tensor, stop_pattern: tf.Tensor, max_new_tokens: tf.Tensor,
             temperature: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor, seed: tf.Tensor, ignore_eos: tf.Tensor,
             token_bytes: tf.Tensor, cache: tf.Tensor, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """A part of the completion of R requests, decoded S at a time (continuous batching), all inside the graph.

    ids (B, T) int32 distinct right-padded prompts, lengths (B,) int32 >= 1; prompt_index (R,) int32: the prompt
    each request continues; want_logprobs () bool: compute the log-probabilities (zeros otherwise); deadline ()
    float64: the part ends after the first loop iteration that ends at or past it (seconds since the epoch, as
    tf.timestamp; inf: when every request has ended); stop_pattern () string: an RE2 pattern that a row's text so
    far fully matches once it holds a stop string ("" = none); token_bytes (V,) string: each token's bytes (needed
    for stop strings); and per request: max_new_tokens int32, temperature float32 (0 = greedy), top_k int32 (0 =
    off), top_p float32 (1 = off), seed int64, ignore_eos bool (go on past end-of-text).
    cache (>= n_layer x 2 x nkv x S x L, hs) in the weights' dtype: the buffer the KV cache is written into, in
    place; zeros at a run's start. It is an input, not made here: TensorFlow's CPU pool (BFC) never hands memory
    back, and a cache it allocated stayed resident beside the next, larger one (at 1.5B, +0.4 GiB by a job's
    second run); the loader keeps one buffer for its runs instead.
    state: the loop's state where the last part left it (lmgraph.manifest.STATE; at a run's start empty slots,
    next_request 0 and outputs of UNFINISHED rows: lmgraph.loader.Run); its S is the run's slots.

    Each iteration decodes one token for every occupied slot (`decode`); a row that ends frees its slot, and the
    next requests are admitted into the free slots in order (`admit`). A row's cache is laid out as it would be
    alone (prompt in columns [0, length), its step k's token in column length + k), its sampling noise keyed by
    its own seed and step: its tokens are those it gets alone, whatever its neighbours and arrival order (and in
    bfloat16 too, see the module docstring). A part goes on from its state and the cache exactly as the loop
    would have, so where a run is cut into parts changes nothing in it.

    Returns the state after the part (`<name>_out`): a request's tokens are out_tokens[r*N : r*N + n], n its
    out_lengths, once its out_finish is LENGTH, END_OF_TEXT or STOP_STRING; N = max(max_new_tokens).
    """
    eot = cfg.eos_ids[0]  # what a row's unused steps hold
    R = tf.shape(prompt_index)[0]
    N = tf.maximum(tf.reduce_max(max_new_tokens), 1)
    S = tf.shape(state["slot_request"])[0]
    row_length = tf.gather(lengths, prompt_index)  # (R,) prompt length per request
    L = tf.reduce_max(row_length + tf.maximum(max_new_tokens, 1))  # cache columns: the longest row's end
    run = Run(params, cfg, ids, lengths, prompt_index, row_length, max_new_tokens, temperature, top_k, top_p, seed,
              ignore_eos, want_logprobs, stop_pattern, token_bytes, eot, R, N, L)

    rows = cfg.n_layer * 2 * S * cfg.kv_heads * L
    past = tf.reshape(cache[:rows], [cfg.n_layer, 2, S, cfg.kv_heads, L, cfg.head_size])  # its first rows: no copy
    slots = Slots(*(state[f"slot_{name}"] for name in Slots._fields))
    out = Outputs(*(state[f"out_{name}"] for name in Outputs._fields))
    s = LoopState(slots, past, state["next_request"], out)

    def more(s, i):  # requests left, and the part's first iteration or time left
        return ((~tf.reduce_all(s.slots.done) | (s.next_request < R))
                & (tf.equal(i, 0) | (tf.timestamp() < deadline)))

    s, _ = tf.while_loop(more, lambda s, i: (loop_body(run, s), i + 1), (s, tf.constant(0)))
    return {**{f"slot_{name}_out": v for name, v in s.slots._asdict().items()}, "next_request_out": s.next_request,
            **{f"out_{name}_out": v for name, v in s.out._asdict().items()}}
