"""Chat prompts: a list of {role, content} messages rendered with the model's own chat template.

As transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` renders them: jinja2's
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols extension; the template
sees `messages`, `add_generation_prompt=True`, the tokenizer's named special tokens (bos_token, eos_token, ...),
`raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that does not escape HTML. A model
directory is untrusted input, so the template only ever runs in the sandbox and sees plain data (str, int, float,
bool, None, lists, dicts). The template comes from chat_template.jinja (transformers 5.x) or else
tokenizer_config.json's `chat_template` (4.x: a string, or a list of {name, template} whose "default" is used).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES)
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
NO_TEMPLATE = ("model has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): "
               "give the row a prompt instead of messages")


class ChatError(ValueError):
    """A chat row that cannot be rendered, and why: no template, malformed messages, or the template raised."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json or special_tokens_map.json write it: "<s>" or {"content": "<s>"}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """The named special tokens' text: tokenizer_config.json's, else special_tokens_map.json's."""
    config, legacy = read_json(Path(model_dir) / CONFIG_FILE), read_json(Path(model_dir) / SPECIAL_TOKENS_FILE)
    tokens = {}
    for name in NAMED_TOKENS:
        text = token_text(config.get(name)) or token_text(legacy.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


def read_template(model_dir: str | Path) -> str | None:
    """The model's chat template source, or None when it has none."""
    path = Path(model_dir) / TEMPLATE_FILE
    if path.is_file():  # transformers 5.x writes it; it wins over the config's, as in transformers
        return path.read_text(encoding="utf-8")
    template = read_json(Path(model_dir) / CONFIG_FILE).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def check_messages(messages) -> list[dict]:
    """The messages as plain dicts (keys whose value is None dropped, as transformers does), or ChatError saying
    what is wrong: not a non-empty list, an item not an object with string `role` and `content`."""
    if isinstance(messages, tuple):
        messages = list(messages)
    if not isinstance(messages, list):
        raise ChatError(f"messages must be a list of {{role, content}} objects, not {type(messages).__name__}")
    if not messages:
        raise ChatError("messages is an empty list")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"messages[{i}] is not an object with role and content but {type(message).__name__}")
        for key in ("role", "content"):
            value = message.get(key)
            if value is None:
                raise ChatError(f"messages[{i}] has no {key}" if key not in message else f"messages[{i}].{key} is null")
            if not isinstance(value, str):
                raise ChatError(f"messages[{i}].{key} is not a string but {type(value).__name__}")
        plain.append({k: _plain(v) for k, v in message.items() if v is not None})
    return plain


def _plain(value: Any) -> Any:
    """Only JSON's types reach the sandbox: anything else (a caller's object with methods) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & and ' for HTML; transformers' (and so every template's author) does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        # as transformers': a namespace refuses underscore names, the way into CPython's internals
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with _: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=lambda *a, **k: dict(*a, **k))
    return env


class ChatTemplate:
    """A model's chat template, compiled at its first use (a template that does not compile fails each chat row
    with ChatError, never the prompt rows)."""

    def __init__(self, source: str | None, tokens: dict[str, str]):
        self.source, self.tokens = source, dict(tokens)
        self._compiled = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        return cls(read_template(model_dir), special_tokens(model_dir))

    def render(self, messages) -> str:
        """The conversation as text ending with the generation prompt (the assistant's turn opened)."""
        if self.source is None:
            raise ChatError(NO_TEMPLATE)
        messages = check_messages(messages)
        try:
            if self._compiled is None:
                self._compiled = _environment().from_string(self.source)
            return self._compiled.render(messages=messages, add_generation_prompt=True, **self.tokens)
        except Exception as e:  # noqa: BLE001 - raise_exception, a bad template, the sandbox: all the row's reason
            raise ChatError(f"chat template failed: {type(e).__name__}: {e}") from None
