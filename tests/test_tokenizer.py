"""The tokenizer round-trips any text and matches Hugging Face `tokenizers`' GPT-2 encoding."""
from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from lmgraph.tokenizer import Tokenizer, default_vocab_dir

CORPUS = [
    "Hello world", "", " ", "   leading and trailing   ", "tabs\tand\nnewlines\r\n\n  mixed \t",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇯🇵", "中文字符 日本語のテキスト 한국어", "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352",
    "zero\u200bwidth\u200djoiner", "Ελληνικά Русский עברית العربية हिन्दी", "numbers 1234567890 3.14159 -42",
    "code: def f(x): return x**2  # comment", "it's they're we'll I'd you've", "<|endoftext|> stays text",
    "\x00\x01 control chars \x7f", "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
]


def test_round_trip_and_ids_match_hf_tokenizers():
    ours = Tokenizer(default_vocab_dir())
    vocab = default_vocab_dir()
    ref = HFTokenizer(models.BPE.from_file(str(vocab / "encoder.json"), str(vocab / "vocab.bpe")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's setup in HF tokenizers
    assert ours.n_vocab == 50257
    assert ours.encode("Hello world") == [15496, 995]
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, text
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
    # in user text, <|endoftext|> is plain text, never the control token 50256
    assert 50256 not in ours.encode("<|endoftext|>")
    assert ours.encode_batch(CORPUS) == [ours.encode(t) for t in CORPUS]


def test_reads_hugging_face_file_names(hf_dir):
    assert Tokenizer(hf_dir).encode("Hello world") == [15496, 995]
