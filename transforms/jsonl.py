"""JSON Lines files: prompt rows in, completions and errors out, one JSON object per line.

Lines are split on "\\n" only (JSON text never holds a raw newline; U+2028 and its like may sit inside a string) and
read one at a time. A blank line is not a row. A row's `row_index` is its line number, from 1 as editors count, and
without an id a row's id is `<shard>:<line number>`. A line that is not UTF-8, not a JSON object, or has neither a
prompt key nor (a chat row) a messages key is a dead letter naming the file and line.
"""
from __future__ import annotations

import json
import re
from typing import IO, Iterable, Iterator

from transforms.records import ROW_OPTIONS, PromptRow, dead_letter, position

_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON \\u escape can put in a string that UTF-8 cannot hold
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def numbered_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) for each line of a binary file that is not blank."""
    for number, line in enumerate(f, 1):
        if line.strip():
            yield number, line


def count_rows(f: IO[bytes]) -> int:
    return sum(1 for _ in numbered_lines(f))


def _excerpt(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def parse_row(line: bytes, number: int, path: str, shard: str, prompt_column: str, id_column: str,
              extra_columns: tuple[str, ...] = (), overrides: tuple[str, ...] = ROW_OPTIONS,
              options: dict[str, str] | None = None, messages_column: str | None = None) -> PromptRow | dict:
    """One line as a PromptRow, or its dead letter (a dict) saying what is wrong with it. The prompt key's value is
    the row's `prompt`, the messages key's (a chat row: a line needs one of the two) its `messages`; `extra_columns`
    are keys it must also have, kept in `extra` under their names; `overrides` the optional per-row keys. options:
    the command-line option naming each required key, for the messages."""
    where, rid = position(path, number), f"{shard}:{number}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return dead_letter(rid, None, f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})", path, number)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return dead_letter(rid, None, f"{where}: not a JSON object: {e}: {_excerpt(text)}", path, number)
    if not isinstance(obj, dict):
        return dead_letter(rid, None, f"{where}: not a JSON object but {_JSON_TYPES.get(type(obj), 'a value')}: "
                                      f"{_excerpt(text)}", path, number)
    if obj.get(id_column) is not None:
        rid = str(obj[id_column])
    prompt, messages = obj.get(prompt_column), obj.get(messages_column) if messages_column else None
    options = options or {prompt_column: "--prompt_column"}
    missing = [c for c in (prompt_column, *extra_columns) if c not in obj]
    if missing and missing[0] == prompt_column and messages_column in obj:  # a chat row needs no prompt
        missing.pop(0)
    if missing:
        column = missing[0]
        chat = f" nor {messages_column!r} key (see --messages_column)" if column == prompt_column and \
            messages_column else ""
        return dead_letter(rid, None, f"{where}: no {column!r} key (keys: {sorted(obj)}; see "
                                      f"{options.get(column, '--prompt_column')}){chat}", path, number)
    extra = {c: obj[c] for c in extra_columns}
    given = prompt if messages is None else json.dumps(messages, ensure_ascii=False)  # what a dead letter shows
    for name, value in ((id_column, rid), (prompt_column, prompt), (messages_column, given), *extra.items()):
        if isinstance(value, str) and _SURROGATE.search(value):  # no UTF-8 file, Parquet or JSONL, can hold it
            safe = lambda s: s.encode("utf-8", "backslashreplace").decode() if isinstance(s, str) else s  # noqa
            return dead_letter(safe(rid), safe(given), f"{where}: {name} is not valid Unicode text (a lone "
                                                       f"surrogate escape)", path, number)
    return PromptRow(rid, prompt, {c: obj[c] for c in overrides if c in obj}, path, number, extra, messages)


def read_rows(f: IO[bytes], path: str, shard: str, prompt_column: str, id_column: str,
              **columns) -> Iterator[PromptRow | dict]:
    """Every row of a file (parse_row; `columns`: its extra_columns, overrides and options)."""
    for number, line in numbered_lines(f):
        yield parse_row(line, number, path, shard, prompt_column, id_column, **columns)


def has_key(f: IO[bytes], key: str) -> bool:
    """Whether some line's object has the top-level key `key` (lines without its quoted name are not parsed)."""
    quoted = json.dumps(key).encode()
    for _, line in numbered_lines(f):
        if quoted in line:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and key in obj:
                return True
    return False


def encode(rows: Iterable[dict], fields: Iterable[str]) -> bytes:
    """Rows as JSON Lines with exactly `fields`, in that order (UTF-8, non-ASCII characters as they are)."""
    fields = list(fields)
    return b"".join((json.dumps({k: r.get(k) for k in fields}, ensure_ascii=False) + "\n").encode()
                    for r in rows)


def read_objects(f: IO[bytes]) -> Iterator[dict]:
    """The objects of a JSON Lines file we wrote."""
    for _, line in numbered_lines(f):
        yield json.loads(line)
