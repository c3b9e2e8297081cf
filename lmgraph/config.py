"""Model hyperparameters: one config for every decoder family the engine runs (lit-gpt's way: families differ by
fields, not by model files).

- gpt2: LayerNorm with biases, learned positions (wpe), GELU MLP, biases on every projection, tied LM head.
- llama, qwen2, mistral: RMSNorm, rotary positions (RoPE), SwiGLU MLP, grouped-query attention, no biases but
  Qwen2's on q/k/v, tied or untied LM head. lmgraph.checkpoint reads them from a Hugging Face config.json.
"""
from __future__ import annotations

import dataclasses

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
FAMILIES = ("gpt2", "llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    n_vocab: int = 50257
    n_ctx: int = 1024  # positions a row may span (prompt + new tokens)
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    family: str = "gpt2"
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0: n_head
    head_dim: int = 0  # 0: n_embd // n_head
    n_mlp: int = 0  # the MLP's inner width; 0: 4 * n_embd
    norm_eps: float = 1e-5
    rope_theta: float = 0.0  # rotary positions' base; 0: learned positions (wpe)
    # Llama 3's frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, ...] = ()
    qkv_bias: bool = True  # biases on the q/k/v projection (GPT-2 and Qwen2)
    tied_head: bool = True  # the LM head is wte; otherwise its own weight `head`
    eos_ids: tuple[int, ...] = (EOT_TOKEN,)  # a row ends at any of these

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if self.head_dim == 0 and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")

    @property
    def gpt2(self) -> bool:
        """GPT-2's block (LayerNorm, learned positions, GELU, biases); otherwise the Llama family's."""
        return self.family == "gpt2"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_mlp or 4 * self.n_embd

    @property
    def kv_width(self) -> int:
        """Values a layer caches per position for keys, and again for values."""
        return self.kv_heads * self.head_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From to_dict's output (a manifest's config; GPT-2 exports written before the families hold only the
        first five fields, and the defaults are GPT-2's)."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in kinds})


# The published GPT-2 sizes, plus a tiny one for tests and demos.
SIZES = {
    "tiny": ModelConfig(n_ctx=256, n_embd=64, n_head=4, n_layer=2),
    "124M": ModelConfig(n_embd=768, n_head=12, n_layer=12),
    "355M": ModelConfig(n_embd=1024, n_head=16, n_layer=24),
    "774M": ModelConfig(n_embd=1280, n_head=20, n_layer=36),
    "1558M": ModelConfig(n_embd=1600, n_head=25, n_layer=48),
}
