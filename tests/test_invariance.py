"""Batch invariance at the real layer widths: a row's values are the same bits alone as among M rows, in bfloat16
and float16 as in float32 tokens. Rounding depends on shapes (oneDNN picks kernels and splits reductions by the
row count and the reduction length), so these run the engine's own ops at GPT-2's widths, 124M to 1.5B, and a
whole 124M model; the tiny model's tests (test_continuous, test_engine) check the same at toy widths."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lmgraph import model as gmodel
from lmgraph.config import ModelConfig, SIZES
from lmgraph.device import INT8_DOT_FLAGS, bf16_units, cpu_flags, session_config
from lmgraph.export import weight_dtype
from lmgraph.model import graph_weight
from lmgraph.sampling import SamplingParams

ROWS = (1, 2, 7, 64, 65, 128, 300)
# float16 is GPU-only in this sense: on CPUs without AVX512-FP16 TensorFlow runs float16 matmuls through Eigen,
# whose blocking changes a row's sums with the row count at any width (docs/precision.md).
# int8 quantizes each row with its own scale and sums integers: exact by construction (lmgraph.model.matmul_int8).
LOW_PRECISIONS = ("bfloat16", "int8")
# The int8 matmuls of decode steps run another oneDNN kernel (on weights it keeps laid out: model.KeepLayout)
MATMUL_FORMS = (*LOW_PRECISIONS, "int8-decode")


def needs_bf16_units(precision: str) -> None:
    """bfloat16 rows are the same bits in any batch on CPUs with bfloat16 units (AVX512-BF16, AMX), where `auto`
    picks bfloat16. Without them oneDNN emulates bfloat16 matmuls with kernels that order a row's sums by the row
    count (an AVX2-only AMD EPYC: 124M's weight matmuls and rows differed), and `auto` runs float32 there."""
    if precision.startswith("bfloat16") and not bf16_units(cpu_flags()):
        pytest.skip("bfloat16 is batch-invariant on CPUs with bfloat16 units only; this one has none")


def alone_vs_together(build, width: int, rows=ROWS, seed: int = 0, scale: float = 1.0) -> dict[int, int]:
    """{M: how many of the first M rows differ in any bit from the same row run alone}, for the graph
    build(x (M, width) float32) in a Session configured as the engine's."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, width])
        y = build(x)
    rng = np.random.default_rng(seed)
    xs = rng.normal(0, scale, (max(rows), width)).astype(np.float32)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        alone = np.stack([sess.run(y, {x: xs[i:i + 1]})[0] for i in range(max(rows))])
        return {m: int((sess.run(y, {x: xs[:m]}) != alone[:m]).reshape(m, -1).any(axis=1).sum()) for m in rows}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each weight matrix of a GPT-2 of this size."""
    C = cfg.n_embd
    return {"attn/c_attn/w": (C, 3 * C), "attn/c_proj/w": (C, C), "mlp/c_fc/w": (C, 4 * C),
            "mlp/c_proj/w": (4 * C, C)}


def engine_weight(name: str, shape: tuple[int, int], cfg: ModelConfig, precision: str, seed: int = 1):
    """A random weight as the exported graph of `precision` holds it (layout, chunks, padding)."""
    return graph_form(name, np.random.default_rng(seed).normal(0, 0.02, shape).astype(np.float32), cfg, precision)


def graph_form(name: str, w: np.ndarray, cfg: ModelConfig, form: str):
    """w as the graph multiplies it in `form`: a precision, or "int8-decode" (int8 as decode steps hold it)."""
    precision = form.split("-")[0]
    stored = graph_weight(name, tf.cast(tf.constant(w), weight_dtype(name, precision)), cfg, precision)
    return gmodel.KeepLayout(stored) if form == "int8-decode" else stored


@pytest.mark.parametrize("precision", MATMUL_FORMS)
@pytest.mark.parametrize("size", ["124M", "355M", "774M", "1558M"])
def test_weight_matmuls_keep_each_rows_bits(size, precision):
    """Every weight matrix of GPT-2 124M to 1.5B (its matmul in the engine's layout and chunks, bias, GELU where
    the model has it): each of 300 rows alone and among 2 to 300 rows, the same bits."""
    needs_bf16_units(precision)
    cfg = SIZES[size]
    for name, (n_in, n_out) in layer_shapes(cfg).items():
        def build(x):
            w = engine_weight(name, (n_in, n_out), cfg, precision)
            b = tf.constant(np.random.default_rng(2).normal(0, 0.02, n_out).astype(np.float32))
            return gmodel.linear(x, w, b, gelu=name == "mlp/c_fc/w")
        differ = alone_vs_together(build, n_in)
        assert not any(differ.values()), (name, n_in, n_out, differ)


@pytest.mark.parametrize("name, shape", [("h0/mlp/c_proj/w", (3072, 768)), ("wte", (50257, 768))])
def test_int8_quantized_on_the_host_is_the_graphs_quantization(name, shape):
    """The loader quantizes int8 weights on the host (numpy, a block of rows at a time); frozen graphs and tests
    quantize in TensorFlow. The same weight must give the same bits either way: int8 values, scales and offsets,
    zero channels (and wte's padding rows) included."""
    cfg = SIZES["124M"]
    w = np.random.default_rng(3).normal(0, 0.02, shape).astype(np.float32)
    w[5], w[:, 7] = 0.0, 0.0
    host = graph_weight(name, w, cfg, "int8", xp=np)
    graph = graph_weight(name, tf.constant(w), cfg, "int8")
    want = (gmodel.padded_vocab(shape[0]), shape[1]) if name == "wte" else (shape[1], shape[0])  # (out, in)
    assert host.q.shape == want
    for h, g in zip(host, graph):
        g = g.numpy()
        assert h.dtype == g.dtype and h.shape == g.shape and h.flags.c_contiguous
        assert h.tobytes() == g.tobytes()


@pytest.mark.parametrize("n_in, n_out", [(768, 2304), (3072, 768), (768, 50304)])
def test_int8_matmul_sums_the_integers_exactly(n_in, n_out):
    """matmul_int8's kernel at the real widths: its output is the integer sum of each quantized row times the
    quantized weight (int64 in numpy), and the result is that sum times the row's and the channel's scales.

    CPUs without int8 dot-product units (VNNI, AMX) run oneDNN's gemm_s8u8s32, whose vpmaddubsw adds each pair of
    neighbouring u8 x s8 products (inputs 2j, 2j + 1) in int16 with saturation before the int32 sum: there the sum
    is exactly that one, and only the outputs where a pair saturated stray further from float32 (docs/precision.md, int8;
    test_int8_is_exact_and_batch_invariant_without_vnni runs this under an AVX2 cap)."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (7, n_in)).astype(np.float32)
    w = rng.normal(0, 0.02, (n_in, n_out)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        qw = gmodel.quantize(tf.constant(w))
        y = gmodel.matmul_int8(tf.constant(x), qw)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        got, q, scale = sess.run([y, qw.q, qw.scale])
    assert q.shape == (n_out, n_in)
    s = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
    u = np.floor(x * (np.float32(127.0) / s) + np.float32(128.5)).astype(np.int64)  # q_x + 128, as the graph rounds
    q = q.astype(np.int64)
    sums = u @ q.T  # (M, out) exact
    saturated = np.zeros(sums.shape, bool)
    if not INT8_DOT_FLAGS & cpu_flags():  # each pair's int16, saturated, then summed, 256 channels at a time
        pairs = [u[:, None, 0::2] * c[None, :, 0::2] + u[:, None, 1::2] * c[None, :, 1::2]  # (M, 256, in / 2)
                 for c in np.split(q, range(256, n_out, 256))]
        sums = np.concatenate([np.clip(p, -2**15, 2**15 - 1).sum(axis=2) for p in pairs], 1)
        saturated = np.concatenate([(np.abs(p) > 2**15 - 1).any(axis=2) for p in pairs], 1)
        assert saturated.mean() < 0.1  # Gaussian activations: ~5% of outputs
    want = (sums - 128 * q.sum(axis=1)) * (s / 127.0) * scale
    # float32 rounding of sums near 2^24, before the 128s come back out: a few units of the largest sum
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # and close to the float32 product: int8 keeps about 2 decimal digits of each input
    exact = x @ w
    assert np.abs(got - exact)[~saturated].max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("keep_layout, reorders", [(True, 1), (False, 0)])
def test_int8_weights_are_reordered_once_not_every_call(tmp_path, keep_layout, reorders):
    """oneDNN runs int8 matmuls fastest on weights in its own blocked layout. TensorFlow's
    QuantizedMatMulWithBias* reordered them on every call (more time than the matmul itself); a decode step's
    matmul_int8 keeps the reordered copy (one reorder of an s8 weight over five calls, in ONEDNN_VERBOSE's log of a
    process of its own), and prefill's multiplies the weight as it is (none)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import numpy as np, tensorflow as tf\n"
        "from lmgraph import model\n"
        "from lmgraph.device import session_config\n"
        "g = tf.Graph()\n"
        "with g.as_default():\n"
        "    x = tf.compat.v1.placeholder(tf.float32, [None, 768])\n"
        "    w = tf.compat.v1.get_variable('w', initializer=np.ones((768, 3072), np.float32), use_resource=True)\n"
        f"    y = model.matmul_int8(x, model.quantize(w.read_value()), keep_layout={keep_layout})\n"
        "    init = w.initializer\n"
        "s = tf.compat.v1.Session(graph=g, config=session_config(2))\n"
        "s.run(init)\n"
        "for m in (1, 64, 7, 64, 128):\n"
        "    s.run(y, {x: np.ones((m, 768), np.float32)})\n")
    root = str(Path(__file__).resolve().parents[1])  # this checkout's lmgraph, whatever is installed
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": root}
    log = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True,
                         cwd=root).stdout
    calls = [line for line in log.splitlines() if ",exec," in line and "inner_product" in line]
    reorder_lines = [line for line in log.splitlines() if ",exec," in line and ",reorder," in line and "src:s8" in line]
    assert len(calls) == 5, log[-2000:]
    # Kernels without VNNI (gemm_s8u8s32, AVX2) read the weight as it is: nothing to lay out, no reorder at all
    blocked = {re.search(r"wei:s8:\S*?:blocked:(\w+)", line).group(1) for line in calls} - {"ab", "ba"}
    assert len(reorder_lines) == (reorders if blocked else 0), (blocked, reorder_lines)


@pytest.mark.parametrize("precision", MATMUL_FORMS)
@pytest.mark.parametrize("size", ["124M", "1558M"])
def test_lm_head_and_logprobs_keep_each_rows_bits(size, precision):
    """The LM head over the padded vocabulary (50304 wide) and the log-probability of a token (its log-sum-exp),
    as logits_of and log_softmax_at compute them, and ln_f before them."""
    needs_bf16_units(precision)
    cfg = SIZES[size]
    C = cfg.n_embd
    rng = np.random.default_rng(3)
    wte = rng.normal(0, 0.02, (cfg.n_vocab, C)).astype(np.float32)
    g = rng.normal(1, 0.1, C).astype(np.float32)

    def build(x):
        stored = graph_form("wte", wte, cfg, precision)
        params = {"wte": stored, "ln_f/g": tf.constant(g), "ln_f/b": tf.zeros([C])}
        logits = gmodel.lm_head(params, cfg, x)  # (M, Vp)
        chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return tf.concat([logits, gmodel.log_softmax_at(logits, chosen)[:, None]], 1)
    differ = alone_vs_together(build, C, rows=(1, 2, 7, 65, 128), scale=3.0)
    assert not any(differ.values()), differ


def test_attention_weights_keep_a_rows_bits_whatever_the_cache_width():
    """A decode step's attention weights (float32, before the cast to the cache's dtype) for a row whose cache
    holds n columns: alone in a cache 3 columns wider, and among 48 rows in a cache 32 wider (the run's longest row
    sets the width), every n from 1 to 140 and a few up to 1000. Before the softmax's width was padded, 1 row in
    a few hundred changed in its last bit (and then, now and then, in bfloat16)."""
    rng = np.random.default_rng(4)
    B, nh = 48, 12
    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.placeholder(tf.float32, [None, nh, 1, None])
        p = gmodel.softmax(w)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        for n in list(range(1, 141)) + [600, 1000]:
            scores = rng.normal(0, 3, (B, nh, 1, n)).astype(np.float32)

            def run(rows, width):
                masked = np.full((rows.stop - rows.start, nh, 1, width - n), gmodel.NEG_INF, np.float32)
                return sess.run(p, {w: np.concatenate([scores[rows], masked], 3)})[..., :n]

            alone = np.concatenate([run(slice(i, i + 1), n + 3) for i in range(B)])
            assert np.array_equal(run(slice(0, B), min(n + 32, 1024)), alone), n


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])  # the cache of bfloat16 and of int8 weights
def test_attention_keeps_a_rows_bits_whatever_the_cache_width(precision):
    """The attention output of a row (q . k, softmax, weighted sum of v in the cache's dtype) alone and among 48
    rows, in caches of different widths after the row's own columns, whose unwritten columns hold other values."""
    needs_bf16_units(precision)
    rng = np.random.default_rng(5)
    B, nh, hs = 48, 12, 64
    graph = tf.Graph()
    with graph.as_default():
        q, k, v = (tf.compat.v1.placeholder(tf.float32, [None, nh, None, hs]) for _ in range(3))
        bias = tf.compat.v1.placeholder(tf.float32, [None, 1, 1, None])
        dtype = getattr(tf, precision)
        out = tf.cast(gmodel.attend(tf.cast(q, dtype), tf.cast(k, dtype), tf.cast(v, dtype), bias), tf.float32)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        for n in (1, 5, 31, 32, 33, 58, 90, 130, 600, 1000):
            q_n = rng.normal(0, 1, (B, nh, 1, hs)).astype(np.float32)
            kv = rng.normal(0, 1, (2, B, nh, n, hs)).astype(np.float32)

            def run(rows, width):
                rest = rng.normal(0, 1, (2, rows.stop - rows.start, nh, width - n, hs)).astype(np.float32)
                mask = np.where(np.arange(width) < n, 0.0, gmodel.NEG_INF).astype(np.float32)
                return sess.run(out, {q: q_n[rows], k: np.concatenate([kv[0][rows], rest[0]], 2),
                                      v: np.concatenate([kv[1][rows], rest[1]], 2),
                                      bias: np.broadcast_to(mask, (rows.stop - rows.start, 1, 1, width))})

            alone = np.concatenate([run(slice(i, i + 1), n + 3) for i in range(B)])
            assert np.array_equal(run(slice(0, B), min(n + 32, 1024)), alone), n


def test_int8_prefill_attention_keeps_a_rows_bits_whatever_the_parts_length():
    """Prefill's attention with a float32 cache (int8 weights on CPUs without bfloat16 units): a prompt of T
    tokens alone, and as one of a part padded to a longer prompt (other values in its padding), gives its T
    positions the same bits (float64 sums: lmgraph.model.attend)."""
    rng = np.random.default_rng(6)
    nh, hs = 12, 64
    graph = tf.Graph()
    with graph.as_default():
        q, k, v = (tf.compat.v1.placeholder(tf.float32, [None, nh, None, hs]) for _ in range(3))
        t = tf.range(tf.shape(q)[2])
        causal = tf.where(t[:, None] >= t[None, :], 0.0, gmodel.NEG_INF)[None, None]
        out = gmodel.attend(q, k, v, causal, float64_sums=True)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        for T, longest, rows in ((1, 64, 16), (5, 40, 8), (27, 40, 24), (33, 66, 24), (64, 128, 4), (200, 300, 2)):
            x = rng.normal(0, 1, (3, rows, nh, longest, hs)).astype(np.float32)
            alone = sess.run(out, {q: x[0, :1, :, :T], k: x[1, :1, :, :T], v: x[2, :1, :, :T]})
            together = sess.run(out, {q: x[0], k: x[1], v: x[2]})
            assert np.array_equal(together[:1, :, :T], alone), (T, longest, rows)


def test_layer_norm_keeps_each_rows_bits():
    for C in (768, 1024, 1280, 1600):
        g = np.random.default_rng(5).normal(1, 0.1, C).astype(np.float32)
        differ = alone_vs_together(lambda x: tf.cast(gmodel.norm(x, tf.constant(g), tf.zeros([C])), tf.bfloat16),
                                   C, scale=4.0)
        assert not any(differ.values()), (C, differ)


def test_reduction_chunks_cover_every_gpt2_width():
    for cfg in SIZES.values():
        for n_in in (cfg.n_embd, 4 * cfg.n_embd):
            c = gmodel.reduction_chunks(n_in)
            assert n_in % c == 0 and n_in // c <= gmodel.MAX_REDUCTION and (n_in // c) % 16 == 0, n_in
            assert math.ceil(n_in / gmodel.MAX_REDUCTION) <= c <= 2 * math.ceil(n_in / gmodel.MAX_REDUCTION)


@pytest.fixture(scope="module")
def dir_124m(tmp_path_factory):
    """GPT-2 124M with random weights (GPT-2's init std), exported."""
    from pipeline.export import main

    out = tmp_path_factory.mktemp("gpt2-124M")
    assert main(["--random", "124M", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=LOW_PRECISIONS)
def model_124m(request, dir_124m):
    """The 124M model in bfloat16 (the default on CPUs with bf16 units) and in int8, run here on any CPU."""
    from lmgraph.loader import GenerationModel

    needs_bf16_units(request.param)
    m = GenerationModel(dir_124m, precision=request.param, intra_threads=2)
    yield m
    m.close()


def test_124m_rows_are_the_same_alone_in_one_run_and_with_refills(model_124m):
    """24 prompts of 1 to 40 tokens, half greedy, half sampled (temperature 0.8, top-k 40), 32 new tokens: each
    row alone, all in one run, and through 7 slots with refills in another order give the same tokens and the
    same log-probabilities, bit for bit."""
    rng = np.random.default_rng(5)
    n = 24
    prompts = [rng.integers(0, 50257, k).tolist() for k in rng.integers(1, 41, n)]
    params = [SamplingParams(max_new_tokens=32, temperature=0.8 * (i % 2), top_k=40 * (i % 2), seed=i)
              for i in range(n)]
    alone = [model_124m.generate([p], [q])[0] for p, q in zip(prompts, params)]
    for slots, order in ((n, range(n)), (7, rng.permutation(n))):
        got = model_124m.generate([prompts[i] for i in order], [params[i] for i in order], slots=slots)
        for i, c in zip(order, got):
            assert c.token_ids == alone[i].token_ids, (slots, i)
            assert c.logprobs == alone[i].logprobs, (slots, i)
    assert len({tuple(c.token_ids) for c in alone}) == n  # real, different completions


def test_124m_rows_are_the_same_in_lanes_side_by_side(model_124m, monkeypatch):
    """On a CPU a run of 64 rows goes as two lanes side by side (one thread an op each): its rows, greedy and
    sampled, are the same bits as in one lane of 31 slots with refills (too few slots to split)."""
    from lmgraph import loader

    rng = np.random.default_rng(11)
    n = 64
    prompts = [rng.integers(0, 50257, k).tolist() for k in rng.integers(1, 21, n)]
    params = [SamplingParams(max_new_tokens=8, temperature=0.8 * (i % 2), top_k=40 * (i % 2), seed=i)
              for i in range(n)]
    lanes = []

    class Lane(loader.Lane):
        def __init__(self, model, rows, *a):
            lanes.append(len(rows))
            super().__init__(model, rows, *a)

    monkeypatch.setattr(loader, "Lane", Lane)
    split = model_124m.generate(prompts, params)
    assert sorted(lanes) == [32, 32]  # two lanes of 32 rows (and 32 slots) each
    one = model_124m.generate(prompts, params, slots=31)
    assert lanes[2:] == [64]
    assert [(c.token_ids, c.logprobs) for c in split] == [(c.token_ids, c.logprobs) for c in one]


def test_124m_a_rows_tokens_prefilled_continue_as_decoding_did(model_124m):
    """A row's prompt with its first k tokens appended, run as a new prompt, continues with the tokens and
    log-probabilities the row had after k, bit for bit: prefill and decode compute a position's values alike.
    (What a run that stops mid-row and resumes by recomputing its cache would rely on.)"""
    if model_124m.graph_key == "int8":
        pytest.skip("int8 with a float32 cache (CPUs without bfloat16 units): attention's prefill (T x T) and "
                    "decode (1 x L) float32 matmuls round apart")
    rng = np.random.default_rng(9)
    n = 16
    prompts = [rng.integers(0, 50257, k).tolist() for k in rng.integers(1, 60, n)]
    full = model_124m.generate(prompts, SamplingParams(max_new_tokens=24))
    cut = [int(k) for k in rng.integers(1, 23, n)]
    resumed = model_124m.generate([p + f.token_ids[:k] for p, f, k in zip(prompts, full, cut)],
                                  [SamplingParams(max_new_tokens=24 - k) for k in cut])
    for f, r, k in zip(full, resumed, cut):
        assert (r.token_ids, r.logprobs) == (f.token_ids[k:], f.logprobs[k:]), k


INT8_TESTS = ("int8 and (sums_the_integers_exactly or keep_each_rows_bits and 124M or prefill_attention or "
              "124m_rows_are_the_same)")


def test_int8_is_exact_and_batch_invariant_without_vnni():
    """CPUs without VNNI (AVX2, early AVX-512) run other oneDNN int8 kernels, which add pairs of products in int16
    (test_int8_matmul_sums_the_integers_exactly), and int8's cache is float32 there (lmgraph.model.attend). int8's
    exactness and row tests again, in a process of their own with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA, read
    once per process)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("this process runs under an ISA cap already")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", INT8_TESTS],
                       env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert p.returncode == 0, p.stdout[-4000:]
    passed = int(re.search(r"(\d+) passed", p.stdout).group(1))
    # sums at 3 widths, 124M matmuls and LM head in 2 forms each, prefill attention, the 124M model's rows (alone
    # and with refills; in parts side by side)
    assert passed == 3 + 2 + 2 + 1 + 2, p.stdout[-2000:]
