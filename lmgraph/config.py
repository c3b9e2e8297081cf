"""GPT-2 hyperparameters."""
from __future__ import annotations

import dataclasses

EOT_TOKEN = 50256  # <|endoftext|>


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


# The published sizes, plus a tiny one for tests and demos.
SIZES = {
    "tiny": GPT2Config(n_ctx=256, n_embd=64, n_head=4, n_layer=2),
    "124M": GPT2Config(n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(n_embd=1600, n_head=25, n_layer=48),
}
