"""Chat rows (`messages` instead of `prompt`) through the job (JSON Lines and Parquet), GenerateText's transform and
the RunInference handler, with their dead letters; and the tokenizer-dependent parts of generation and scoring
(a BOS kept by left truncation, scoring after a BOS or none, stop strings under a SentencePiece decoder).

The model is the tiny GPT-2 export of conftest.py, in a copy of its directory that also holds a tokenizer.json of
GPT-2's own vocabulary with a ChatML template (bench.hf_tokenizers, specials=False: the template's markers are plain
text, so every id stays within GPT-2's 50257), listed in the manifest as the exporter lists a model's files."""
from __future__ import annotations

import json
import shutil

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import RunInference
from transformers import AutoTokenizer

from bench.hf_tokenizers import CHATML, write_byte_level_tokenizer, write_sentencepiece_tokenizer
from lmgraph.manifest import MANIFEST, sha256_file
from lmgraph.sampling import SamplingParams
from lmgraph.tokenizer import HFTokenizer, load_tokenizer
from pipeline.run import run
from transforms import GPT2ModelHandler
from transforms.detokenize import apply_stop
from transforms.score_text import Scoring
from transforms.validate import fit_context

HELLO = [{"role": "user", "content": "Say hello."}]
TALK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, caf\u00e9?"}]
GOOD = {"c1": HELLO, "c2": TALK}
# id -> (row's other keys, reason in its dead letter)
BAD = {
    "neither": ({"prompt": None, "messages": None}, "prompt is null (a row needs a prompt, or messages)"),
    "both": ({"prompt": "hi", "messages": HELLO}, "the row has both a prompt and messages: give one"),
    "not-a-list": ({"messages": "hello"}, "messages must be a list of {role, content} objects, not str"),
    "empty": ({"messages": []}, "messages is an empty list"),
    "no-content": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content is null"),
}
NEW = 4


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("chat_model") / "tiny"
    shutil.copytree(model_dir, d)
    write_byte_level_tokenizer(d, bos=False, chat_template=CHATML, specials=False)
    manifest = json.loads((d / MANIFEST).read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        manifest["files"][name] = sha256_file(d / name)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return d


@pytest.fixture(scope="module")
def ref(chat_model_dir):
    return AutoTokenizer.from_pretrained(str(chat_model_dir))


def rendered(ref, messages) -> str:
    return ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def read_rows(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    return pq.read_table(path).to_pylist()


def job(inputs: str, out, model, fmt: str = "jsonl", *extra: str) -> dict:
    return run(["--input", inputs, "--output", str(out), "--model_dir", str(model), "--max_new_tokens", str(NEW),
                "--output_format", fmt, "--precision", "float32", *extra])


def check_outputs(out, shard: str, fmt: str, ref, model, bad: dict) -> None:
    """The chat rows' completions equal the same text given as a prompt; the bad rows' reasons."""
    done = {r["id"]: r for r in read_rows(out / "completions" / f"{shard}.{fmt}")}
    assert sorted(done) == sorted([*GOOD, *(f"p-{i}" for i in GOOD)])
    for rid, messages in GOOD.items():
        chat, plain = done[rid], done[f"p-{rid}"]
        assert chat["prompt"] == plain["prompt"] == rendered(ref, messages)
        assert chat["prompt_tokens"] == len(ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        e = model.generate([ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]],
                           SamplingParams(max_new_tokens=NEW))[0]
        assert chat["completion_token_ids"] == plain["completion_token_ids"] == e.token_ids
    errors = {e["id"]: e for e in read_rows(out / "errors" / f"{shard}.{fmt}")}
    assert sorted(errors) == sorted(bad)
    for rid, (_, reason) in bad.items():
        assert errors[rid]["error"].endswith(reason), errors[rid]
    assert errors["both"]["prompt"] == "hi" and errors["empty"]["prompt"] == "[]"  # a chat row's: its messages' JSON


def input_rows(ref) -> list[dict]:
    rows = [{"id": rid, "messages": m} for rid, m in GOOD.items()]
    rows += [{"id": f"p-{rid}", "prompt": rendered(ref, m)} for rid, m in GOOD.items()]
    return rows + [{"id": rid, **keys} for rid, (keys, _) in BAD.items()]


def test_chat_rows_in_json_lines(tmp_path, chat_model_dir, ref, model):
    src = tmp_path / "in" / "chat.jsonl"
    src.parent.mkdir()
    lines = [json.dumps(r) for r in input_rows(ref)] + ['{"id": "no-keys", "text": "x"}']
    src.write_text("\n".join(lines) + "\n")
    report = job(str(src), tmp_path / "out", chat_model_dir)
    assert report["accounted"] and report["rows_read"] == len(lines)
    check_outputs(tmp_path / "out", "chat", "jsonl", ref, model, {**BAD, "no-keys": ({}, (
        "no 'prompt' key (keys: ['id', 'text']; see --prompt_column) nor 'messages' key (see --messages_column)"))})
    [e] = [e for e in read_rows(tmp_path / "out" / "errors" / "chat.jsonl") if e["id"] == "not-a-list"]
    assert e["prompt"] == '"hello"'


def test_chat_rows_in_parquet(tmp_path, chat_model_dir, ref, model):
    d = tmp_path / "in"
    d.mkdir()
    rows = input_rows(ref)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    pq.write_table(pa.table({
        "id": [r["id"] for r in rows], "prompt": pa.array([r.get("prompt") for r in rows], pa.string()),
        "turns": pa.array([r.get("messages") if isinstance(r.get("messages"), list) else None for r in rows],
                          pa.list_(message))}), d / "chat.parquet")
    # a shard of chat rows alone (no prompt column), and one with neither column
    pq.write_table(pa.table({"id": ["only"], "turns": pa.array([HELLO], pa.list_(message))}), d / "only.parquet")
    pq.write_table(pa.table({"id": ["x"], "text": ["neither"]}), d / "neither.parquet")
    report = job(str(d / "*.parquet"), tmp_path / "out", chat_model_dir, "parquet", "--messages_column", "turns")
    assert report["unreadable_shards"] == [str(d / "neither.parquet")]
    [e] = read_rows(tmp_path / "out" / "errors" / "neither.parquet")
    assert "no prompt column 'prompt' (columns: ['id', 'text']; see --prompt_column) and no messages column " \
           "'turns' (see --messages_column)" in e["error"]
    [only] = read_rows(tmp_path / "out" / "completions" / "only.parquet")
    assert only["prompt"] == rendered(ref, HELLO)
    # a list column cannot hold the string "hello": that row's messages are null there, so it has neither
    check_outputs(tmp_path / "out", "chat", "parquet", ref, model, {**BAD, "not-a-list": ({}, BAD["neither"][1])})


def test_messages_for_a_model_without_a_template(tmp_path, model_dir):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"id": "c", "messages": HELLO}) + "\n" + json.dumps({"id": "p", "prompt": "hi"}) + "\n")
    report = job(str(src), tmp_path / "out", model_dir)
    assert report["accounted"] and report["rows_completed"] == 1
    [e] = read_rows(tmp_path / "out" / "errors" / "chat.jsonl")
    assert e["id"] == "c" and e["error"].endswith("model has no chat template (no chat_template.jinja, no "
                                                  "chat_template in tokenizer_config.json): give the row a prompt "
                                                  "instead of messages")


OUT: list[dict] = []  # filled by the in-process runner's Map


def collect(result) -> None:  # a module's function, pickled by name: it fills this module's OUT
    OUT.append(result.inference)


def test_handler_takes_conversations(chat_model_dir, ref, model):
    OUT.clear()
    p = beam.Pipeline(runner="FnApiRunner")
    _ = (p | beam.Create([TALK, {"id": "d", "messages": HELLO}])
         | RunInference(GPT2ModelHandler(str(chat_model_dir), precision="float32", intra_op_threads=2,
                                         max_new_tokens=NEW))
         | beam.Map(collect))
    p.run().wait_until_finish()
    by_prompt = {r["prompt"]: r for r in OUT}
    for messages in (TALK, HELLO):
        ids = ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        e = model.generate([ids], SamplingParams(max_new_tokens=NEW))[0]
        assert by_prompt[rendered(ref, messages)]["completion_token_ids"] == e.token_ids


def test_left_truncation_keeps_the_bos(tmp_path):
    write_byte_level_tokenizer(tmp_path, bos=True, chat_template=CHATML)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("one two three four five six")
    assert ids[0] == 50259
    assert fit_context(ids, 2, 6, "left", keep=1) == [50259] + ids[-3:]
    assert fit_context(ids, 2, 6, "left") == ids[-4:]


def test_scoring_follows_the_tokenizer(tmp_path):
    scoring = Scoring(n_ctx=64, stride=32)
    write_byte_level_tokenizer(tmp_path / "bos", bos=True, chat_template=CHATML)
    write_byte_level_tokenizer(tmp_path / "none", bos=False, chat_template=CHATML)
    bos, none = load_tokenizer(tmp_path / "bos"), load_tokenizer(tmp_path / "none")
    [r] = scoring.prepare(bos, {"id": "a", "text": "the cat sat"})
    assert r.windows == [bos.encode("the cat sat")] and r.token_ids == bos.encode("the cat sat")[1:]
    [r] = scoring.prepare(none, {"id": "a", "text": "the cat sat"})  # no BOS: the first token is context only
    assert r.windows == [none.encode("the cat sat")] and r.token_ids == none.encode("the cat sat")[1:]
    assert scoring.prepare(none, {"id": "b", "text": "cat"})["error"].startswith("nothing to score")
    prompted = Scoring(n_ctx=64, stride=32, completion_key="completion")
    [r] = prompted.prepare(none, {"id": "c", "prompt": "the cat", "completion": " sat down"})
    assert r.token_ids == none.encode(" sat down")  # every completion token, given the prompt's


def test_stop_strings_under_a_sentencepiece_decoder(tmp_path):
    """The graph matched stop strings on the tokens' bytes, with the space the decoder drops from the first
    token: " The" at the start leaves an empty completion."""
    write_sentencepiece_tokenizer(tmp_path, None)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.strips_leading_space
    ids = tok.encode_plain("The cat. The dog.")
    assert tok.decode(ids) == "The cat. The dog."
    text, kept, stopped = apply_stop(tok, ids, [" The"])
    assert (text, stopped, tok.decode(kept)) == ("", True, "")
    text, kept, stopped = apply_stop(tok, ids, [". The"])
    assert (text, stopped) == ("The cat", True) and tok.decode(kept) == "The cat"
    assert apply_stop(tok, ids, ["zebra"]) == ("The cat. The dog.", ids, False)
