"""Random-weight checkpoints in Hugging Face's layout, made by transformers itself (nothing can be downloaded here):
for the parity tests and for bench.whole_job's peers, which convert the same directory with their own tools.

    make_model(out_dir, "smollm2-135m")                 # + tokenizer.json (GPT-2's BPE + chat tokens), ChatML
    make_model(out_dir, "tiny-llama", tokenizer="llama3")
    make_checkpoint(out_dir, "tiny-qwen2", dtype="bfloat16", shards=2)   # weights and configs only

SHAPES holds the real shapes of the checkpoints users run (hidden / MLP / layers / heads / kv heads) and tiny ones of
each family for fast tests. The byte-level tokenizers are GPT-2's vocabulary plus the chat tokens of
bench.hf_tokenizers (50263 ids, where SmolLM2 has 49152 and Qwen2.5 151936: the LM head's width differs from theirs).
"""
from __future__ import annotations

import json
from pathlib import Path

# transformers' random init is near-uniform: greedy tokens barely depend on the context. Scaling the hidden matrices
# makes them do so (REFERENCE.md), which the parity tests need to mean anything.
HIDDEN_SCALE = 6.0

SHAPES: dict[str, dict] = {
    # name: model_type and the config fields that differ from transformers' defaults for it
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                       tie_word_embeddings=False, max_position_embeddings=512,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                       tie_word_embeddings=True, max_position_embeddings=512),
    "tiny-mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                         tie_word_embeddings=False, max_position_embeddings=512, sliding_window=256),
}
GPT2_VOCAB = 50257
TOKENIZERS = ("chatml", "llama3", "sentencepiece")  # Qwen2 / SmolLM2-like, Llama-3-like, Llama-2 / Mistral-like


def make_model(out_dir: str | Path, shape: str, tokenizer: str = "chatml", **kwargs) -> Path:
    """A checkpoint directory as users have it: make_checkpoint's files plus a tokenizer (TOKENIZERS) and its chat
    template, the config's vocabulary, BOS and end-of-sequence ids (a list: a row ends at any) taken from it."""
    from bench import hf_tokenizers as ht

    if tokenizer == "sentencepiece":
        ids = ht.write_sentencepiece_tokenizer(out_dir, chat_template=ht.LLAMA2)
    else:
        ids = ht.write_byte_level_tokenizer(out_dir, bos=tokenizer == "llama3",
                                            chat_template=ht.LLAMA3 if tokenizer == "llama3" else ht.CHATML)
    return make_checkpoint(out_dir, shape, vocab_size=ids.n_vocab, eos_token_id=list(ids.eos_ids),
                           bos_token_id=ids.bos_id, **kwargs)


def make_checkpoint(out_dir: str | Path, shape: str, vocab_size: int = GPT2_VOCAB + 2, dtype: str = "float32",
                    shards: int = 1, eos_token_id: int | list[int] = GPT2_VOCAB + 1, bos_token_id: int | None = None,
                    seed: int = 0, config_style: str = "5", **overrides) -> Path:
    """A random-weight checkpoint of `shape` in out_dir: config.json, model.safetensors (or `shards` shards and
    model.safetensors.index.json), generation_config.json. dtype: the stored tensors' (float32 or bfloat16).
    config_style "4": rope_theta / rope_scaling at the top level, as transformers 4.x wrote them; "5": as 5.x
    writes them (rope_parameters). overrides: config fields that differ from the shape's (fewer layers for a
    test at real widths). No tokenizer: make_model writes one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    fields = {**SHAPES[shape], **overrides}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, eos_token_id=eos_token_id,
                                  bos_token_id=bos_token_id, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(HIDDEN_SCALE)
    model = model.to(getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=max(size // shards + 1, 1) if shards > 1 else "100GB")
    if config_style == "4":
        as_4x(out / "config.json")
    return out


def as_4x(path: Path) -> None:
    """config.json rewritten as transformers 4.x wrote it: rope_theta and rope_scaling at the top level."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.pop("rope_theta", 10000.0)
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    path.write_text(json.dumps(config, indent=2))
