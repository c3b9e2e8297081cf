"""The Llama family (llama, qwen2, mistral) on the same engine, against transformers on the same weights: random
checkpoints in Hugging Face's layout made by transformers itself (bench.checkpoints), exported by our exporter,
loaded by our loader. Tiny shapes for parity; the real layer widths of SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B
for batch invariance (rounding depends on shapes)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import torch

from bench.checkpoints import SHAPES, make_checkpoint, make_model
from lmgraph import model as gmodel
from lmgraph.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from lmgraph.config import ModelConfig
from lmgraph.device import session_config
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import load_tokenizer
from tests.test_invariance import alone_vs_together, graph_form, needs_bf16_units

# family -> (tiny shape, tokenizer kind, checkpoint dtype, shards, config.json style): between them every reader path
FAMILIES = {"llama": ("tiny-llama", "llama3", "float32", 1, "4"),
            "qwen2": ("tiny-qwen2", "chatml", "float32", 2, "5"),
            "mistral": ("tiny-mistral", "sentencepiece", "bfloat16", 1, "5")}
TEXTS = ["Hello world, this is", "The capital of France", "a", "Once upon a time there were three bears who"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
LLAMA2_CHAT = [{"role": "user", "content": "Name a colour."}]  # Llama 2's template takes no system turn


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(checkpoint dir, exported model dir, transformers' model, transformers' tokenizer) of one family."""
    from pipeline.export import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape, tokenizer, dtype, shards, style = FAMILIES[request.param]
    ckpt = make_model(tmp_path_factory.mktemp(f"{request.param}-hf"), shape, tokenizer=tokenizer, dtype=dtype,
                      shards=shards, config_style=style)
    out = tmp_path_factory.mktemp(f"{request.param}-model")
    assert main(["--checkpoint", str(ckpt), "--output", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return ckpt, out, hf, AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def engine(family):
    from lmgraph.loader import GenerationModel

    m = GenerationModel(family[1], precision="float32", intra_threads=2)
    yield m
    m.close()


def hf_greedy(hf, prompt: list[int], n: int, eos=None) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_export_stores_the_matrices_in_the_checkpoints_dtype(family, request):
    """By default (--dtype auto) a bfloat16 checkpoint's matrices stay bfloat16 in the model directory (half the
    bytes of float32, nothing lost) and a float32 one's float32; the greedy tests here run on those files."""
    from lmgraph import tensorfile
    from lmgraph.checkpoint import checkpoint_dtype

    ckpt, out, _, _ = family
    want = FAMILIES[request.node.callspec.params["family"]][2]
    assert checkpoint_dtype(ckpt) == want
    with tensorfile.Reader(out / "weights.safetensors") as r:
        assert r.dtype("h0/mlp/c_fc/w") == {"float32": "F32", "bfloat16": "BF16"}[want]
        assert r.dtype("h0/ln_1/g") == "F32"  # norms stay float32


def test_logits_and_cache_match_transformers(family):
    ckpt, _, hf, _ = family
    cfg, weights, _ = load_checkpoint(ckpt)
    prompts = [[15, 99, 11, 314, 716], [464], [40, 588, 257, 149, 286, 824, 11, 290, 340, 318, 523, 922]]
    T = max(map(len, prompts))
    ids = np.zeros((len(prompts), T), np.int32)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
    params = gmodel.graph_params(weights, cfg)
    empty = tf.zeros([cfg.n_layer, 2, len(prompts), cfg.kv_heads, T + 3, cfg.head_size])
    logits, past = gmodel.prefill(params, cfg, tf.constant(ids), tf.constant([len(p) for p in prompts]), empty)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            out = hf(torch.tensor([p]), use_cache=True)
        ref = out.logits[0, -1].numpy()
        assert np.abs(logits[r, :cfg.n_vocab].numpy() - ref).max() < 1e-3
        assert np.all(logits[r, cfg.n_vocab:].numpy() == -np.inf)
        layer = out.past_key_values.layers[cfg.n_layer - 1]  # keys after RoPE, values: HF's, in the prompt's slot
        np.testing.assert_allclose(past[-1, 0, r, :, :len(p)].numpy(), layer.keys[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(past[-1, 1, r, :, :len(p)].numpy(), layer.values[0].numpy(), atol=1e-4)


def test_greedy_rows_equal_transformers(family, engine):
    """Prompt rows tokenized as transformers does (BOS where the tokenizer adds one), greedy tokens, and their
    decoded text, as transformers' generate and decode."""
    ckpt, model_dir, hf, hf_tok = family
    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(t) for t in TEXTS]
    assert prompts == [hf_tok(t)["input_ids"] for t in TEXTS]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for p, c in zip(prompts, got):
        assert c.token_ids == hf_greedy(hf, p, 12)
        assert tok.decode(c.token_ids) == hf_tok.decode(c.token_ids)


def test_chat_rows_equal_transformers(family, engine):
    ckpt, model_dir, hf, hf_tok = family
    messages = LLAMA2_CHAT if FAMILIES[ckpt.name.split("-")[0]][1] == "sentencepiece" else CHAT
    ids = load_tokenizer(model_dir).encode_chat(messages)
    ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(ref)
    [c] = engine.generate([ids], SamplingParams(max_new_tokens=8))
    assert c.token_ids == hf_greedy(hf, ids, 8)


def test_scores_match_transformers(family, engine):
    _, _, hf, _ = family
    ids = [15, 99, 11, 314, 716, 40, 588, 257]
    [got] = engine.score([ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]  # the first token has no context
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rows_end_at_every_eos_id(family, tmp_path):
    """generation_config.json's eos_token_id as a list: a row ends at whichever comes first, as in transformers.
    Two of the tokens greedy decoding produces become the eos ids, so rows end early, at different ids."""
    from lmgraph.loader import GenerationModel
    from pipeline.export import main

    ckpt, model_dir, hf, _ = family
    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(t) for t in TEXTS]
    free = [hf_greedy(hf, p, 10, eos=[]) for p in prompts]
    eos = [free[0][3], free[1][5]]
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    try:
        out = tmp_path / "model"
        assert main(["--checkpoint", str(ckpt), "--output", str(out)]) == 0
    finally:
        (ckpt / "generation_config.json").write_text(json.dumps(gen))
    m = GenerationModel(out, precision="float32", intra_threads=2)
    try:
        got = m.generate(prompts, SamplingParams(max_new_tokens=10))
    finally:
        m.close()
    ended = set()
    for p, f, c in zip(prompts, free, got):
        ref = hf_greedy(hf, p, 10, eos=eos)
        stop = next((k for k, t in enumerate(f) if t in eos), None)
        assert c.token_ids == (f if stop is None else f[:stop]) == [t for t in ref if t not in eos]
        assert c.finish_reason == ("length" if stop is None else "stop")
        ended |= {f[stop]} if stop is not None else set()
    assert ended == set(eos)


def test_config_styles_and_refusals(tmp_path):
    """transformers 4.x's config (rope_theta, rope_scaling) and 5.x's (rope_parameters) read alike; a model type or
    rope type the engine does not compute as transformers does is refused, naming it and the supported ones."""
    from pipeline.export import main

    four, five = (make_checkpoint(tmp_path / s, "tiny-llama", config_style=s) for s in ("4", "5"))
    assert read_checkpoint(four)[0] == read_checkpoint(five)[0]
    assert read_checkpoint(four)[0].rope_llama3 == (8.0, 1.0, 4.0, 64.0)
    config = json.loads((five / "config.json").read_text())
    for change, message in (({"model_type": "gemma"}, "model_type 'gemma' is not supported; supported: gpt2, llama"),
                            ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                             "rope type 'yarn' is not supported; supported: default, llama3"),
                            ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported")):
        (five / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(five)
    assert main(["--checkpoint", str(five), "--output", str(tmp_path / "out")]) == 2  # a message, no traceback


def test_mistral_sliding_window_bounds_the_context():
    shape = SHAPES["tiny-mistral"]
    assert shape["sliding_window"] < shape["max_position_embeddings"]
    from lmgraph.checkpoint import llama_config

    cfg = llama_config({**shape, "vocab_size": 100, "eos_token_id": 2}, {}, "test")
    assert cfg.n_ctx == shape["sliding_window"]  # rows longer than the window are refused, not silently cut


# The real widths: hidden, MLP, heads, key/value heads (head size 64 in all three).
WIDTHS = {"smollm2-135m": (576, 1536, 9, 3), "qwen2.5-0.5b": (896, 4864, 14, 2), "llama-3.2-1b": (2048, 8192, 32, 8)}


def family_config(shape: str) -> ModelConfig:
    C, I, nh, nkv = WIDTHS[shape]
    return ModelConfig(family="qwen2" if "qwen" in shape else "llama", n_vocab=50263, n_ctx=512, n_embd=C,
                       n_head=nh, n_layer=1, n_kv_head=nkv, n_mlp=I, rope_theta=1e4, qkv_bias="qwen" in shape,
                       eos_ids=(2,))


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int8-decode"])
@pytest.mark.parametrize("shape", sorted(WIDTHS))
def test_family_layers_keep_each_rows_bits(shape, precision):
    """Each layer of the family at its real widths (RMSNorm, the fused q/k/v and its biases, o_proj, SwiGLU's
    fused gate/up and down, in the engine's layout and chunks): each of 300 rows alone and among 2 to 300 rows,
    the same bits."""
    needs_bf16_units(precision)
    cfg = family_config(shape)
    C, I, q, kv = cfg.n_embd, cfg.mlp_width, cfg.n_head * cfg.head_size, cfg.kv_width
    rng = np.random.default_rng(1)
    w = {"attn/c_attn/w": (C, q + 2 * kv), "attn/c_proj/w": (q, C), "mlp/c_fc/w": (C, 2 * I), "mlp/c_proj/w": (I, C)}
    weights = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in w.items()}
    g = rng.normal(1, 0.1, C).astype(np.float32)
    bias = rng.normal(0, 0.02, q + 2 * kv).astype(np.float32)

    def build_qkv(x):
        p = {"ln_1/g": tf.constant(g)}
        h = gmodel.normalize(x, p.get, "ln_1", cfg)
        return gmodel.linear(h, graph_form("attn/c_attn/w", weights["attn/c_attn/w"], cfg, precision),
                             tf.constant(bias) if cfg.qkv_bias else None)

    def build_mlp(x):
        p = {n: graph_form(n, weights[n], cfg, precision) for n in ("mlp/c_fc/w", "mlp/c_proj/w")}
        return gmodel.mlp(x, p.get, cfg)

    for name, build, width in (("qkv", build_qkv, C), ("mlp", build_mlp, C),
                               ("o_proj", lambda x: gmodel.matmul(x, graph_form("attn/c_proj/w", weights[
                                   "attn/c_proj/w"], cfg, precision)), q)):
        differ = alone_vs_together(build, width, rows=(1, 2, 7, 65, 128, 300))
        assert not any(differ.values()), (shape, name, differ)


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", sorted(WIDTHS))
def test_grouped_query_attention_keeps_a_rows_bits(shape, precision):
    """A decode step's rotary queries and keys and grouped-query attention over the cache: a row alone in a cache
    a little wider than its own columns and among 48 rows in a wider one, the same bits."""
    needs_bf16_units(precision)
    cfg = family_config(shape)
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_size
    cos, sin = gmodel.rope_tables(cfg)
    rng = np.random.default_rng(5)
    B = 48
    graph = tf.Graph()
    with graph.as_default():
        q = tf.compat.v1.placeholder(tf.float32, [None, nh, 1, hs])
        k, v = (tf.compat.v1.placeholder(tf.float32, [None, nkv, None, hs]) for _ in range(2))
        pos = tf.compat.v1.placeholder(tf.int32, [None])
        bias = tf.compat.v1.placeholder(tf.float32, [None, 1, 1, None])
        rope = [r[:, None, None] for r in gmodel.rope_at({"rope/cos": tf.constant(cos), "rope/sin": tf.constant(sin)},
                                                         pos)]
        dtype = getattr(tf, precision)
        out = tf.cast(gmodel.attend(tf.cast(gmodel.rotate(q, *rope), dtype), tf.cast(k, dtype), tf.cast(v, dtype),
                                    bias), tf.float32)
    with tf.compat.v1.Session(graph=graph, config=session_config(2)) as sess:
        for n in (1, 7, 33, 130, 400):
            q_n = rng.normal(0, 1, (B, nh, 1, hs)).astype(np.float32)
            kv = rng.normal(0, 1, (2, B, nkv, n, hs)).astype(np.float32)

            def run(rows, width):
                m = rows.stop - rows.start
                rest = rng.normal(0, 1, (2, m, nkv, width - n, hs)).astype(np.float32)
                mask = np.where(np.arange(width) < n, 0.0, gmodel.NEG_INF).astype(np.float32)
                return sess.run(out, {q: q_n[rows], k: np.concatenate([kv[0][rows], rest[0]], 2),
                                      v: np.concatenate([kv[1][rows], rest[1]], 2), pos: np.full(m, n - 1),
                                      bias: np.broadcast_to(mask, (m, 1, 1, width))})

            alone = np.concatenate([run(slice(i, i + 1), n + 3) for i in range(B)])
            assert np.array_equal(run(slice(0, B), n + 40), alone), (shape, n)


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def smollm2_width_model(request, tmp_path_factory):
    """A SmolLM2-135M-wide model (576 / 1536, 9 heads, 3 kv heads; 2 of its 30 layers), exported, in bfloat16
    (the default on CPUs with bf16 units) and int8."""
    from lmgraph.loader import GenerationModel
    from pipeline.export import main

    needs_bf16_units(request.param)
    ckpt = make_model(tmp_path_factory.mktemp("smollm2-hf"), "smollm2-135m", num_hidden_layers=2)
    out = tmp_path_factory.mktemp("smollm2-model")
    assert main(["--checkpoint", str(ckpt), "--output", str(out)]) == 0
    m = GenerationModel(out, precision=request.param, intra_threads=2)
    yield m
    m.close()


def test_smollm2_width_rows_are_the_same_alone_and_in_a_run_with_refills(smollm2_width_model):
    """16 prompts, half greedy and half sampled, 16 new tokens: each row alone, all in one run, and through 5 slots
    with refills in another order give the same tokens and log-probabilities, bit for bit."""
    rng = np.random.default_rng(5)
    n = 16
    prompts = [rng.integers(0, 50257, k).tolist() for k in rng.integers(1, 30, n)]
    params = [SamplingParams(max_new_tokens=16, temperature=0.8 * (i % 2), top_k=40 * (i % 2), seed=i)
              for i in range(n)]
    alone = [smollm2_width_model.generate([p], [q])[0] for p, q in zip(prompts, params)]
    for slots, order in ((n, range(n)), (5, rng.permutation(n))):
        got = smollm2_width_model.generate([prompts[i] for i in order], [params[i] for i in order], slots=slots)
        for i, c in zip(order, got):
            assert (c.token_ids, c.logprobs) == (alone[i].token_ids, alone[i].logprobs), (slots, i)
    assert len({tuple(c.token_ids) for c in alone}) == n
