"""GPT-2 generation as one TensorFlow graph: prefill, then a `tf.while_loop` of cached decode steps.

Shapes: B batch, T prompt slots (prompts are left padded), N new-token slots, L = T + N cache slots,
C n_embd, nh heads, hs head size, V vocabulary.

The KV cache is one tensor, `past` (n_layer, 2, B, nh, L, hs): keys [:, 0] and values [:, 1] of every layer, in
the weights' dtype (keys and values come out of a matmul in that dtype, so storing them so loses nothing, and a
bfloat16 cache halves the bytes attention reads each step).
The prompt fills slots [0, T); decode step i writes slot T + i. It is allocated once per run and written in
place through `InplaceUpdate` on a row view (rows of hs values), so a step costs the same whatever L is;
`tensor_scatter_nd_update` or `concat` would copy the whole cache every step. This is safe because each run
allocates its own `past` (a `Fill` whose shape depends on the batch, so never a shared constant), nothing else
holds that buffer, and every read of a slot depends on the write before it.

Sampling is per row and batch-invariant: a row's choice depends only on its own logits, parameters, seed and
step, never on its neighbours (see `choose_tokens`). In bfloat16 that also needs every float32 value that is cast
to bfloat16 to be the same bits whatever the batch: a last-bit difference becomes a whole bf16 step at the cast.
So no op here may round differently with the batch's shape (see `norm`; Grappler's fusions stay off at load on
CPUs for the same reason, gpt2.device.session_config).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import tensorflow as tf

from gpt2.config import EOT_TOKEN, GPT2Config

NEG_INF = -1e9  # additive mask; finite so a fully masked (padding) query row stays finite


class Transposed(NamedTuple):
    """A weight matrix stored (out, in) and multiplied with transpose_b. oneDNN's bfloat16 matmuls read weights
    in that layout about 15% faster on AMX CPUs (BENCHMARKS.md); float32 matmuls are faster with (in, out)."""
    t: tf.Tensor


Params = dict[str, "tf.Tensor | Transposed"]  # canonical weight name -> tensor (a variable read, or a constant)


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


def linear(x: tf.Tensor, w: "tf.Tensor | Transposed", b: tf.Tensor, gelu: bool = False) -> tf.Tensor:
    """x (M, in) @ w + b (then GPT-2's tanh GELU), the matmul and bias in w's dtype (float32, float16 or
    bfloat16), the GELU in float32 (x * x * x, not tf.nn.gelu's Pow, which cost 10-17% of a decode step).
    """
    wt = w.t if isinstance(w, Transposed) else w
    y = tf.matmul(tf.cast(x, wt.dtype), wt, transpose_b=isinstance(w, Transposed))
    y = tf.nn.bias_add(y, tf.cast(b, wt.dtype))
    if not gelu:
        return y
    y = tf.cast(y, tf.float32)
    y = 0.5 * y * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * (y * y * y))))  # x*x*x: no Pow op
    return tf.cast(y, wt.dtype)


def mlp(x: tf.Tensor, p: Callable[[str], tf.Tensor]) -> tf.Tensor:
    h = linear(x, p("mlp/c_fc/w"), p("mlp/c_fc/b"), gelu=True)  # (M, 4C) in the weights' dtype
    return tf.cast(linear(h, p("mlp/c_proj/w"), p("mlp/c_proj/b")), tf.float32)  # (M, C)


def attend(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Scaled dot-product attention. q (B, nh, Tq, hs), k/v (B, nh, Tk, hs) in the weights' dtype, bias
    (B, 1, Tq, Tk) additive mask. The matmuls run in the weights' dtype, the softmax in float32."""
    q = q * tf.constant(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    w = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) + bias  # (B, nh, Tq, Tk)
    return tf.matmul(tf.cast(tf.nn.softmax(w, axis=-1), v.dtype), v)  # (B, nh, Tq, hs)


def embed(params: Params, ids: tf.Tensor, pos: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.gather(params["wte"], ids), tf.float32) + tf.cast(tf.gather(params["wpe"], pos), tf.float32)


def lm_head(params: Params, x: tf.Tensor) -> tf.Tensor:
    """x (B, C) -> logits (B, V), with the output projection tied to wte (V, C).

    Uses params["wte_t"] (C, V) when given: a float32 matmul with a transposed operand runs 1.3-2x slower on CPU
    than one with a contiguous (C, V) matrix (bench/), so `generate` transposes wte once per run for float32;
    bfloat16 reads wte's own (V, C) layout faster (see Transposed).
    """
    return logits_of(params, norm(x, params["ln_f/g"], params["ln_f/b"]))


def logits_of(params: Params, x: tf.Tensor) -> tf.Tensor:
    """Normalised hidden states x (M, C) -> logits (M, V) float32 (see lm_head)."""
    if "wte_t" in params:
        w = params["wte_t"]
        return tf.cast(tf.matmul(tf.cast(x, w.dtype), w), tf.float32)
    w = params["wte"]
    return tf.cast(tf.matmul(tf.cast(x, w.dtype), w, transpose_b=True), tf.float32)


def layer_params(params: Params, i: int) -> Callable[[str], "tf.Tensor | Transposed"]:
    return lambda name: params[f"h{i}/{name}"]


def transposed_layout(params: Params) -> bool:
    return isinstance(params["h0/attn/c_attn/w"], Transposed)


def prefill(params: Params, cfg: GPT2Config, ids: tf.Tensor, lengths: tf.Tensor,
            new_slots: tf.Tensor | int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Run the left-padded prompts ids (B, T) with real lengths (B,).

    Returns the logits of each prompt's last token (B, V) and the cache `past` (n_layer, 2, B, nh, T + new_slots,
    hs) with the prompt's keys/values in slots [0, T).
    """
    B, T = tf.shape(ids)[0], tf.shape(ids)[1]
    x, past = forward(params, cfg, ids, lengths, new_slots)
    last = tf.reshape(x, [B, T, cfg.n_embd])[:, -1]  # (B, C) left padding puts every row's last token at T-1
    return lm_head(params, last), past


def forward(params: Params, cfg: GPT2Config, ids: tf.Tensor, lengths: tf.Tensor,
            cache_slots: tf.Tensor | int | None = None) -> tuple[tf.Tensor, tf.Tensor | None]:
    """The transformer over left-padded ids (B, T) with real lengths (B,): hidden states (B*T, C) before ln_f,
    and with cache_slots, the cache `past` (n_layer, 2, B, nh, T + cache_slots, hs) holding the keys/values in
    slots [0, T): allocated once and filled layer by layer in place (a list of per-layer K/V to concatenate and
    pad held the cache three times over at its peak).
    """
    B, T = tf.shape(ids)[0], tf.shape(ids)[1]
    nh, hs, C = cfg.n_head, cfg.head_size, cfg.n_embd
    t = tf.range(T)
    if cache_slots is not None:
        L = T + cache_slots
        rows = tf.zeros([cfg.n_layer * 2 * B * nh * L, hs], params["wte"].dtype)  # the cache, by rows
        prompt_rows = tf.reshape(tf.range(2 * B * nh)[:, None] * L + t[None, :], [-1])  # (2*B*nh*T,) layer 0
    pad = T - lengths  # (B,) padding slots on the left
    valid = t[None, :] >= pad[:, None]  # (B, T)
    pos = tf.maximum(t[None, :] - pad[:, None], 0)  # (B, T) position ids start at 0 on each row's first real token
    allowed = (t[:, None] >= t[None, :])[None] & valid[:, None, :]  # (B, T, T) causal and not padding
    bias = tf.where(allowed, 0.0, NEG_INF)[:, None]  # (B, 1, T, T)

    x = tf.reshape(embed(params, ids, pos), [B * T, C])  # (B*T, C)
    for i in range(cfg.n_layer):
        p = layer_params(params, i)
        qkv = linear(norm(x, p("ln_1/g"), p("ln_1/b")), p("attn/c_attn/w"), p("attn/c_attn/b"))  # (B*T, 3C)
        qkv = tf.transpose(tf.reshape(qkv, [B, T, 3, nh, hs]), [2, 0, 3, 1, 4])  # (3, B, nh, T, hs)
        if cache_slots is not None:
            rows = tf.raw_ops.InplaceUpdate(x=rows, i=prompt_rows + i * 2 * B * nh * L,
                                            v=tf.reshape(qkv[1:], [-1, hs]))  # keys and values, in place
        a = attend(qkv[0], qkv[1], qkv[2], bias)  # (B, nh, T, hs)
        a = tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [B * T, C])  # (B*T, C)
        x = x + tf.cast(linear(a, p("attn/c_proj/w"), p("attn/c_proj/b")), tf.float32)
        x = x + mlp(norm(x, p("ln_2/g"), p("ln_2/b")), p)
    return x, None if cache_slots is None else tf.reshape(rows, [cfg.n_layer, 2, B, nh, L, hs])


SCORE_CHUNK = 1024  # positions per LM-head chunk when scoring: (1024, V) float32 logits are 200 MB


def score(params: Params, cfg: GPT2Config, ids: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
    """log p(ids[:, t] | ids[:, <t]) under the model, (B, T) float32, for left-padded ids (B, T) with real
    lengths (B,); 0 at padding and at each row's first token, which has no context (prepend <|endoftext|> to
    score it). The LM head runs over SCORE_CHUNK positions at a time: memory holds one chunk's logits, never
    (B*T, V).
    """
    B, T = tf.shape(ids)[0], tf.shape(ids)[1]
    if not transposed_layout(params):
        params = {**params, "wte_t": tf.transpose(params["wte"])}
    x, _ = forward(params, cfg, ids, lengths)
    h = norm(x, params["ln_f/g"], params["ln_f/b"])  # (B*T, C)
    predicted = tf.reshape(tf.concat([ids[:, 1:], ids[:, -1:]], 1), [-1])  # (B*T,) the token after each position
    M = B * T
    chunks = (M + SCORE_CHUNK - 1) // SCORE_CHUNK

    def chunk(i, out):
        span = tf.range(i * SCORE_CHUNK, tf.minimum((i + 1) * SCORE_CHUNK, M))
        logits = logits_of(params, tf.gather(h, span))  # (K, V)
        top = tf.reduce_max(logits, axis=-1)
        lse = top + tf.math.log(tf.reduce_sum(tf.exp(logits - top[:, None]), axis=-1))
        return i + 1, out.write(i, tf.gather(logits, tf.gather(predicted, span), batch_dims=1) - lse)

    _, out = tf.while_loop(lambda i, _: i < chunks, chunk,
                           (tf.constant(0), tf.TensorArray(tf.float32, size=chunks, infer_shape=False)))
    after = tf.reshape(out.concat(), [B, T])  # after[:, t] = log p(ids[:, t + 1] | ids[:, <= t])
    logprobs = tf.concat([tf.zeros([B, 1]), after[:, :-1]], 1)  # (B, T) log p(ids[:, t] | ids[:, < t])
    return tf.where(tf.range(T)[None, :] > (T - lengths)[:, None], logprobs, 0.0)


def decode_step(params: Params, cfg: GPT2Config, token: tf.Tensor, pos: tf.Tensor, slot: tf.Tensor,
                past: tf.Tensor, key_bias: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One new token per row: token (B,), position ids (B,), cache slot (scalar) -> logits (B, V), updated past.

    key_bias (B, 1, 1, L) masks padding and not-yet-written slots.
    """
    n_layer, _, B, nh, L, hs = tf.unstack(tf.shape(past))
    C = cfg.n_embd
    rows = tf.reshape(past, [-1, hs])  # (n_layer*2*B*nh*L, hs) the same buffer, row-addressable
    slot_rows = tf.range(2 * B * nh) * L + slot  # (2*B*nh,) rows of this slot in layer 0, keys then values
    x = embed(params, token, pos)  # (B, C)
    for i in range(cfg.n_layer):
        p = layer_params(params, i)
        qkv = linear(norm(x, p("ln_1/g"), p("ln_1/b")), p("attn/c_attn/w"), p("attn/c_attn/b"))  # (B, 3C)
        qkv = tf.transpose(tf.reshape(qkv, [B, 3, nh, hs]), [1, 0, 2, 3])  # (3, B, nh, hs)
        new_kv = tf.reshape(qkv[1:], [2 * B * nh, hs])
        rows = tf.raw_ops.InplaceUpdate(x=rows, i=slot_rows + i * 2 * B * nh * L, v=new_kv)  # write in place
        layer_kv = tf.reshape(rows, [n_layer, 2, B, nh, L, hs])[i]  # (2, B, nh, L, hs) a view, no copy
        a = attend(qkv[0][:, :, None], layer_kv[0], layer_kv[1], key_bias)  # (B, nh, 1, hs)
        x = x + tf.cast(linear(tf.reshape(a, [B, C]), p("attn/c_proj/w"), p("attn/c_proj/b")), tf.float32)
        x = x + mlp(norm(x, p("ln_2/g"), p("ln_2/b")), p)
    return lm_head(params, x), tf.reshape(rows, tf.shape(past))


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
    it. Tokens tied with the last kept value are all kept.
    """
    V = tf.shape(logits)[1]
    k_row = tf.where(top_k > 0, tf.minimum(top_k, V), V)  # (B,)
    K = tf.reduce_max(tf.where(temperature > 0, k_row, 1))
    scaled = logits / tf.where(temperature > 0, temperature, 1.0)[:, None]  # (B, V)
    vals, idx = tf.math.top_k(scaled, K)  # (B, K) descending
    rank = tf.range(K)[None, :]
    e = tf.where(rank < k_row[:, None], tf.exp(vals - vals[:, :1]), 0.0)  # (B, K) unnormalised, top-k applied
    total = tf.cumsum(e, axis=1)[:, -1:]  # (B, 1) prefix scans, not reductions: the same for any K
    keep = (tf.cumsum(e, axis=1, exclusive=True) < top_p[:, None] * total) & (rank < k_row[:, None])
    n_keep = tf.maximum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1), 1)  # (B,) nucleus size, at least 1
    threshold = tf.gather(vals, n_keep - 1, batch_dims=1)  # (B,) smallest kept value
    gumbel = -tf.math.log(-tf.math.log(token_uniform(seed, step, idx)))  # (B, K)
    score = tf.where(vals >= threshold[:, None], vals + gumbel, -math.inf)  # (B, K)
    return tf.gather(idx, tf.argmax(score, axis=1, output_type=tf.int32), batch_dims=1)  # (B,)


def choose_tokens(logits: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor,
                  seed: tf.Tensor, step: tf.Tensor, want_logprobs: tf.Tensor | bool = True
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Next token per row (greedy where temperature == 0) and, when wanted, its log-probability under the model
    (B,); zeros otherwise (the log-sum-exp over the vocabulary is 6% of a batch-128 step)."""
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)  # (B,)
    token = tf.cond(
        tf.reduce_any(temperature > 0),
        lambda: tf.where(temperature > 0, sample_tokens(logits, temperature, top_k, top_p, seed, step), greedy),
        lambda: greedy)  # skip the sort when the whole batch is greedy
    def logprob():  # log p(token) = logit - logsumexp(logits): two reductions, not a (B, V) LogSoftmax written out
        top = tf.reduce_max(logits, axis=-1)  # (B,)
        lse = top + tf.math.log(tf.reduce_sum(tf.exp(logits - top[:, None]), axis=-1))  # (B,)
        return tf.gather(logits, token, batch_dims=1) - lse

    return token, tf.cond(want_logprobs, logprob, lambda: tf.zeros_like(logits[:, 0]))


class LoopState(NamedTuple):
    """What the decode loop carries from one step to the next (R output rows)."""
    step: tf.Tensor  # () the step whose tokens were chosen last
    token: tf.Tensor  # (R,) int32 those tokens: the next step's input
    past: tf.Tensor  # (n_layer, 2, R, nh, L, hs) the KV cache
    done: tf.Tensor  # (R,) bool: the row has stopped, or has all its tokens
    n_new: tf.Tensor  # (R,) int32 tokens emitted so far
    stopped: tf.Tensor  # (R,) bool: the row ended at end-of-text
    tokens: tf.TensorArray  # step -> (R,) int32 token emitted (eot where none)
    logprobs: tf.TensorArray  # step -> (R,) float32 its log-probability (0 where none)


def generate(params: Params, cfg: GPT2Config, ids: tf.Tensor, lengths: tf.Tensor, prompt_index: tf.Tensor,
             want_logprobs: tf.Tensor, max_new_tokens: tf.Tensor, temperature: tf.Tensor, top_k: tf.Tensor,
             top_p: tf.Tensor, seed: tf.Tensor, ignore_eos: tf.Tensor, eot: int = EOT_TOKEN) -> dict[str, tf.Tensor]:
    """Completions of a batch of left-padded prompts, all inside the graph.

    ids (B, T) int32 distinct prompts, lengths (B,) int32 >= 1; prompt_index (R,) int32: the prompt each output
    row continues (several samples of a prompt share its prefill); want_logprobs () bool: compute the
    log-probabilities (zeros otherwise); and per output row: max_new_tokens int32,
    temperature float32 (0 = greedy), top_k int32 (0 = off), top_p float32 (1 = off), seed int64, ignore_eos
    bool (go on past end-of-text to max_new_tokens: fixed-length benchmarks).
    Returns tokens (R, N) int32 (padded with eot), lengths (R,), finish_reason (R,) int32 (1 = stop at eot,
    0 = length) and logprobs (R, N) float32 of each chosen token; N = max(max_new_tokens). The loop exits as
    soon as every row is done.
    """
    B, T, R = tf.shape(ids)[0], tf.shape(ids)[1], tf.shape(prompt_index)[0]
    N = tf.maximum(tf.reduce_max(max_new_tokens), 1)
    if not transposed_layout(params):
        params = {**params, "wte_t": tf.transpose(params["wte"])}  # (C, V) once per run, outside the loop
    logits, past = prefill(params, cfg, ids, lengths, N)  # (B, V), (n_layer, 2, B, nh, L, hs)
    one_row_each = tf.equal(B, R) & tf.reduce_all(tf.equal(prompt_index, tf.range(R)))
    logits, past = tf.cond(one_row_each, lambda: (logits, past),  # no copy of the cache in the usual case
                           lambda: (tf.gather(logits, prompt_index), tf.gather(past, prompt_index, axis=2)))
    lengths = tf.gather(lengths, prompt_index)  # (R,)
    prompt_valid = tf.range(T)[None, :] >= (T - lengths)[:, None]  # (R, T)

    def emit(s: LoopState, logits: tf.Tensor) -> LoopState:
        """Choose step s.step's tokens from logits and account for them; rows already done emit padding."""
        token, logprob = choose_tokens(logits, temperature, top_k, top_p, seed, s.step, want_logprobs)
        live = ~s.done
        stop = live & tf.equal(token, eot) & ~ignore_eos
        kept = live & ~stop
        n_new = s.n_new + tf.cast(kept, tf.int32)
        token = tf.where(kept, token, eot)
        return s._replace(token=token, done=s.done | stop | (n_new >= max_new_tokens), n_new=n_new,
                          stopped=s.stopped | stop, tokens=s.tokens.write(s.step, token),
                          logprobs=s.logprobs.write(s.step, tf.where(kept, logprob, 0.0)))

    def step(s: LoopState) -> LoopState:
        """Run the last chosen tokens through the model (cache slot T + step) and choose the next ones."""
        pos = tf.minimum(lengths + s.step, cfg.n_ctx - 1)  # (R,) clamped only for rows that are done already
        gen_valid = tf.broadcast_to(tf.range(N)[None, :] <= s.step, [R, N])  # (R, N) slots written so far
        key_bias = tf.where(tf.concat([prompt_valid, gen_valid], 1), 0.0, NEG_INF)[:, None, None, :]  # (R,1,1,L)
        logits, past = decode_step(params, cfg, s.token, pos, T + s.step, s.past, key_bias)
        return emit(s._replace(step=s.step + 1, past=past), logits)

    no = tf.zeros([R], tf.bool)
    s = emit(LoopState(step=tf.constant(0), token=tf.zeros([R], tf.int32), past=past, done=max_new_tokens <= 0,
                       n_new=tf.zeros([R], tf.int32), stopped=no,
                       tokens=tf.TensorArray(tf.int32, size=N, element_shape=[None]),
                       logprobs=tf.TensorArray(tf.float32, size=N, element_shape=[None])), logits)
    [s] = tf.while_loop(lambda s: (s.step + 1 < N) & ~tf.reduce_all(s.done), lambda s: [step(s)], [s],
                        maximum_iterations=cfg.n_ctx)
    steps = s.step + 1
    pad = [[0, 0], [0, N - steps]]  # early exit leaves slots unwritten: pad to a fixed (R, N)
    tokens = tf.pad(tf.transpose(s.tokens.gather(tf.range(steps))), pad, constant_values=eot)
    logprobs = tf.pad(tf.transpose(s.logprobs.gather(tf.range(steps))), pad)
    return {"tokens": tokens, "lengths": s.n_new, "finish_reason": tf.cast(s.stopped, tf.int32), "logprobs": logprobs}
