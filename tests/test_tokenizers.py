"""The tokenizers behind lmgraph.tokenizer.load_tokenizer against transformers' own, on the same files: encode,
decode, each token's bytes, chat templates and their errors. The Hugging Face directories are built offline by
bench.hf_tokenizers: GPT-2's real vocabulary as a byte-level BPE (Qwen2-like, and Llama-3-like with a BOS) and a
small SentencePiece-style BPE with byte fallback (Llama-2-like)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

from bench.hf_tokenizers import CHATML, LLAMA2, LLAMA3, write_byte_level_tokenizer, write_sentencepiece_tokenizer
from lmgraph.chat import ChatError
from lmgraph.tokenizer import GPT2Tokenizer, HFTokenizer, default_vocab_dir, load_tokenizer
from tests.test_tokenizer import CORPUS

TEXTS = [t for t in CORPUS if t] + ["Hello world", " a leading space", "two  spaces", "it 's , odd .",
                                   "<|im_end|> and <s> in text", "\u2581 a literal lower-one-eighth block"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  caf\u00e9 \U0001F600 \u65e5\u672c  "}],
    [{"role": "user", "content": "a literal <|im_end|> and <s> inside", "name": None}],
]
TOJSON = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ {'x': '<&>\\'\u00e9'} | tojson(indent=2) }}"

# name -> (builder, chat template)
KINDS = {
    "chatml": (lambda d, t: write_byte_level_tokenizer(d, bos=False, chat_template=t), CHATML),
    "llama3": (lambda d, t: write_byte_level_tokenizer(d, bos=True, chat_template=t), LLAMA3),
    "sp-llama3": (write_sentencepiece_tokenizer, LLAMA3),
    "sp-chatml": (write_sentencepiece_tokenizer, CHATML),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    out = {}
    for name, (build, template) in KINDS.items():
        build(root / name, template)
        out[name] = root / name
    return out


def pair(directory):
    return load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))


def test_load_tokenizer_picks_by_files(dirs, tmp_path):
    assert isinstance(load_tokenizer(default_vocab_dir()), GPT2Tokenizer)
    assert isinstance(load_tokenizer(dirs["chatml"]), HFTokenizer)
    both = tmp_path / "both"
    shutil.copytree(dirs["chatml"], both)
    shutil.copyfile(default_vocab_dir() / "encoder.json", both / "encoder.json")
    shutil.copyfile(default_vocab_dir() / "vocab.bpe", both / "vocab.bpe")
    assert isinstance(load_tokenizer(both), HFTokenizer)  # tokenizer.json wins
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_gpt2_stays_encode_ordinary_without_a_template():
    tok = GPT2Tokenizer(default_vocab_dir())
    assert tok.encode("<|endoftext|>") == tok.encode_plain("<|endoftext|>") != [50256]
    assert tok.prefix == [] and tok.score_prefix == [50256] and not tok.strips_leading_space
    with pytest.raises(ChatError, match="model has no chat template"):
        tok.encode_chat(CHATS[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_encode_and_decode_equal_transformers(dirs, kind):
    ours, ref = pair(dirs[kind])
    assert ours.n_vocab == len(ref)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"] == ref.encode(text), text
        assert ours.encode_plain(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
        generated = ids[len(ours.prefix):]  # what the model adds never holds the prompt's BOS
        assert ours.decode(generated) == ref.decode(generated), text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    rng = random.Random(0)  # arbitrary ids, as a random model generates them: broken UTF-8, specials, anything
    for _ in range(200):
        ids = [rng.randrange(ours.n_vocab) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == ref.decode(ids), ids


def test_prefixes(dirs):
    assert load_tokenizer(dirs["chatml"]).prefix == [] == load_tokenizer(dirs["chatml"]).score_prefix
    llama3 = load_tokenizer(dirs["llama3"])
    assert llama3.prefix == llama3.score_prefix == [llama3.encode("")[0]] == [50259]
    assert load_tokenizer(dirs["sp-llama3"]).prefix == [1]  # <s>


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_bytes_spell_the_decoded_text(dirs, kind):
    """The bytes of a text's tokens are its decoded text; under a SentencePiece decoder, which drops the space the
    text begins with, the bytes have that one space more."""
    ours, _ = pair(dirs[kind])
    for text in TEXTS:
        ids = ours.encode_plain(text)
        spelled = b"".join(ours.token_bytes(i) for i in ids)
        decoded = ours.decode(ids).encode()
        if ours.strips_leading_space and spelled.startswith(b" "):
            assert spelled == b" " + decoded, text
        else:
            assert spelled == decoded, text
    assert ours.strips_leading_space == kind.startswith("sp")
    special = "<s>" if kind.startswith("sp") else "<|im_end|>"
    assert ours.token_bytes(ours.encode_plain(special)[0]) == special.encode()  # an added token: its text


def test_token_bytes_of_byte_level_pieces_equal_gpt2s(dirs):
    ours, gpt2 = load_tokenizer(dirs["chatml"]), GPT2Tokenizer(default_vocab_dir())
    assert [ours.token_bytes(i) for i in range(gpt2.n_vocab)] == [gpt2.token_bytes(i) for i in range(gpt2.n_vocab)]


def test_sentencepiece_byte_fallback(dirs):
    tok = load_tokenizer(dirs["sp-chatml"])
    ids = tok.encode_plain("\U0001F600")  # never seen in training: four <0xNN> pieces after the `▁`
    assert [tok.token_bytes(i) for i in ids] == [b" ", *[bytes([b]) for b in "\U0001F600".encode()]]
    assert tok.decode(ids) == "\U0001F600"


@pytest.mark.parametrize("kind", list(KINDS))
def test_chat_equals_apply_chat_template(dirs, kind):
    ours, ref = pair(dirs[kind])
    for messages in CHATS:
        text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render_chat(messages) == text
        assert ours.encode_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    if kind == "llama3":  # the template writes the BOS; tokenizing it adds no second one
        assert ours.encode_chat(CHATS[0])[:2] == [50259, 50260]


def with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_template_from_jinja_file_list_and_tojson(dirs, tmp_path):
    jinja = with_config(dirs["llama3"], tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text(LLAMA2)  # transformers 5.x's file wins over the config's
    listed = with_config(dirs["sp-chatml"], tmp_path / "listed", chat_template=[
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": LLAMA3}])
    tojson = with_config(dirs["chatml"], tmp_path / "tojson", chat_template=TOJSON)
    legacy = with_config(dirs["sp-chatml"], tmp_path / "legacy", bos_token=None, eos_token=None,
                         chat_template="{{ bos_token }}|{{ eos_token }}|{{ messages[0]['content'] }}")
    (legacy / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    chats = {jinja: [CHATS[0], CHATS[0] + [{"role": "assistant", "content": "Paris."}]], listed: CHATS[:2],
             tojson: CHATS, legacy: CHATS[:1]}
    for directory, messages in chats.items():
        ours, ref = pair(directory)
        for m in messages:
            assert ours.render_chat(m) == ref.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            assert ours.encode_chat(m) == ref.apply_chat_template(m, add_generation_prompt=True)["input_ids"]
    assert load_tokenizer(legacy).render_chat(CHATS[0]).startswith("<s>|</s>|")


def test_clean_up_tokenization_spaces_as_transformers_5(dirs, tmp_path):
    """transformers 5 ignores clean_up_tokenization_spaces for BPE models (it would eat " ." of real text)."""
    d = with_config(dirs["chatml"], tmp_path / "clean", clean_up_tokenization_spaces=True)
    ours, ref = pair(d)
    ids = ours.encode("it 's , odd . isn't")
    assert ours.decode(ids) == ref.decode(ids) == "it 's , odd . isn't"


BAD_MESSAGES = [
    ("not a list", "messages must be a list of {role, content} objects, not str"),
    ({"role": "user", "content": "x"}, "messages must be a list of {role, content} objects, not dict"),
    ([], "messages is an empty list"),
    (["hello"], "messages[0] is not an object with role and content but str"),
    ([{"role": "user"}], "messages[0] has no content"),
    ([{"role": "user", "content": "x"}, {"role": None, "content": "y"}], "messages[1].role is null"),
    ([{"role": "user", "content": 5}], "messages[0].content is not a string but int"),
]


@pytest.mark.parametrize("messages, reason", BAD_MESSAGES)
def test_malformed_messages(dirs, messages, reason):
    with pytest.raises(ChatError) as e:
        load_tokenizer(dirs["chatml"]).encode_chat(messages)
    assert str(e.value) == reason


def test_template_errors(dirs, tmp_path):
    with pytest.raises(ChatError, match="^model has no chat template"):
        write_sentencepiece_tokenizer(tmp_path / "none", None)
        load_tokenizer(tmp_path / "none").encode_chat(CHATS[0])
    ours, ref = pair(dirs["llama3"])
    tool = [{"role": "tool", "content": "42"}]
    with pytest.raises(Exception, match="Unknown role: tool"):  # transformers raises too
        ref.apply_chat_template(tool, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ChatError, match="^chat template failed: TemplateError: Unknown role: tool$"):
        ours.render_chat(tool)
    for name, template, error in [
            ("syntax", "{% for m in messages %}", "TemplateSyntaxError"),
            ("mutate", "{{ messages.append(1) }}", "SecurityError"),  # the immutable sandbox
            ("escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
            ("namespace", "{% set ns = namespace(_x=1) %}", "SecurityError")]:
        d = with_config(dirs["chatml"], tmp_path / name, chat_template=template)
        tok = load_tokenizer(d)
        with pytest.raises(ChatError, match=f"^chat template failed: {error}"):
            tok.encode_chat(CHATS[0])
        assert tok.encode("still fine") == ref.encode("still fine")[1:]  # prompts do not need the template
