"""Chat templates: a conversation (a list of {role, content} messages) → prompt text, rendered the way
`transformers.PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)` renders it.

Where the template comes from, first found wins: a `--chat-template` file, the checkpoint's
`chat_template.jinja`, or `chat_template` in its `tokenizer_config.json` (a string, or the list of
`{"name", "template"}` objects transformers writes, of which "default" is used). Templates are untrusted
code from a model repository, so they run in Jinja2's immutable sandbox with only transformers' helpers
(`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, `namespace`, `dict`, loop controls
and the `{% generation %}` tag) and see the messages as plain JSON data.

This module knows nothing about token ids: `cluster.tokenizer` encodes the text it returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.errors import InvalidRequest

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside tokenizer_config.json; wins over its chat_template entry
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MIN_JINJA2 = (3, 1, 6)  # older releases have known sandbox escapes


class ChatTemplateError(InvalidRequest):
    """A chat request cannot be rendered: no template, malformed messages, or the template refused them."""


class ChatTemplateLoadError(ValueError):
    """The configured chat template cannot be read or compiled (an operator error, found at start)."""


# ---- the sandbox ---------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own filter HTML-escapes <, >, & and '; chat templates want the JSON itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template cannot shadow Python internals on it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: `self` may be one of the keys
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore-prefixed name {name!r}")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _sandbox() -> ImmutableSandboxedEnvironment:
    found = tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3])
    if found < MIN_JINJA2:
        raise ChatTemplateLoadError(
            f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA2))} (older ones have sandbox escapes); "
            f"found {jinja2.__version__}"
        )
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(),
                       namespace=_Namespace)
    return env


# ---- messages ------------------------------------------------------------------------------------------


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Plain-JSON copies of the messages, or ChatTemplateError naming the field (`messages[2].content`).

    Keys whose value is None are dropped, as transformers does. `content` is a string, or a list of OpenAI
    text parts (`{"type": "text", "text": ...}`) that is joined with newlines, as vLLM does for text models.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatTemplateError("messages",
                                f"must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages", "must hold at least one message")
    return [_message(f"messages[{i}]", message) for i, message in enumerate(messages)]


def _message(field: str, message: object) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(field, f"must be an object with role and content, got {type(message).__name__}")
    plain = {key: _plain(f"{field}.{key}", value) for key, value in message.items() if value is not None}
    for key in plain:
        if not isinstance(key, str):
            raise ChatTemplateError(field, f"has a non-string key {key!r}")
    role = plain.get("role")
    if not isinstance(role, str) or not role:
        raise ChatTemplateError(f"{field}.role", "is required and must be a non-empty string")
    if "content" not in plain:
        raise ChatTemplateError(f"{field}.content", "is required")
    plain["content"] = _content(f"{field}.content", plain["content"])
    return plain


def _content(field: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(field, f"must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"{field}[{j}]", 'this model takes only text parts: {"type": "text", "text": ...}')
        texts.append(part["text"])
    return "\n".join(texts)


def _plain(field: str, value: object) -> Any:
    """A copy built of str/int/float/bool/None/list/dict only: nothing with methods the sandbox does not know."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(field, key): _plain(f"{field}.{key}", item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(f"{field}[{i}]", item) for i, item in enumerate(value)]
    raise ChatTemplateError(field, f"must be JSON data (strings, numbers, booleans, lists, objects), "
                                   f"got {type(value).__name__}")


# ---- the template --------------------------------------------------------------------------------------


class ChatTemplate:
    """One compiled template and the special-token variables (`bos_token`, ...) it is rendered with."""

    def __init__(self, text: str, *, special_tokens: Mapping[str, str] | None = None, origin: str = "<string>") -> None:
        self.text = text
        self.origin = origin  # where it came from, for operators' messages (never sent to clients)
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _sandbox().from_string(text)
        except TemplateSyntaxError as exc:
            raise ChatTemplateLoadError(f"chat template {origin}: line {exc.lineno}: {exc.message}") from exc

    def __repr__(self) -> str:
        return f"ChatTemplate(origin={self.origin!r}, special_tokens={self.special_tokens!r})"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, path: str | Path | None = None,
                       fallback_tokens: Mapping[str, str] | None = None) -> ChatTemplate | None:
        """The `--chat-template` file at `path`, else the checkpoint's template; None when there is none.

        Special tokens come from tokenizer_config.json; `fallback_tokens` fills the ones it does not name.
        """
        model_dir = Path(model_dir)
        config = _tokenizer_config(model_dir / TOKENIZER_CONFIG_FILE)
        special_tokens = {**(fallback_tokens or {}), **_special_tokens(config, model_dir / TOKENIZER_CONFIG_FILE)}
        if path is not None:
            return cls(_read(Path(path), "--chat-template"), special_tokens=special_tokens, origin=str(path))
        if (model_dir / CHAT_TEMPLATE_FILE).is_file():
            jinja_path = model_dir / CHAT_TEMPLATE_FILE
            return cls(_read(jinja_path, "chat template"), special_tokens=special_tokens, origin=str(jinja_path))
        text = _default_template(config.get("chat_template"), model_dir / TOKENIZER_CONFIG_FILE)
        if text is None:
            return None
        return cls(text, special_tokens=special_tokens, origin=f"{model_dir / TOKENIZER_CONFIG_FILE}:chat_template")

    def render(self, messages: object, *, add_generation_prompt: bool) -> str:
        """The prompt text for `messages`; ChatTemplateError when they are malformed or the template refuses."""
        chat = validate_messages(messages)
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except SecurityError as exc:
            raise ChatTemplateError("messages",
                                    f"the chat template tried something the sandbox forbids: {exc}") from exc
        except TemplateError as exc:
            raise ChatTemplateError("messages", f"the chat template rejected the conversation: {exc}") from exc
        except Exception as exc:  # the template's own bug, triggered by these messages
            raise ChatTemplateError(
                "messages", f"the chat template failed on this conversation: {type(exc).__name__}: {exc}"
            ) from exc


def require_chat_template(template: ChatTemplate | None) -> ChatTemplate:
    if template is None:
        raise ChatTemplateError(
            "messages",
            f"this model has no chat template (no {CHAT_TEMPLATE_FILE} and no chat_template in "
            f"{TOKENIZER_CONFIG_FILE}); start the server with --chat-template PATH, or send a prompt instead",
        )
    return template


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateLoadError(f"{what} {path}: cannot read it: {exc}") from exc


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(_read(path, "tokenizer config"))
    except json.JSONDecodeError as exc:
        raise ChatTemplateLoadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ChatTemplateLoadError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _special_tokens(config: Mapping[str, Any], path: Path) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, Mapping):  # a serialized AddedToken: {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise ChatTemplateLoadError(f"{path}: {name} must be a string or an AddedToken object, got {value!r}")
        tokens[name] = value
    return tokens


def _default_template(entry: object, path: Path) -> str | None:
    """transformers' choice: a string is the template; of named templates, the one named "default"."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list):
        if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in entry):
            raise ChatTemplateLoadError(f'{path}: chat_template must be a string or a list of {{"name", "template"}}')
        entry = {t["name"]: t["template"] for t in entry}
    if not isinstance(entry, Mapping):
        raise ChatTemplateLoadError(f"{path}: chat_template must be a string or a list, got {type(entry).__name__}")
    if "default" not in entry:
        raise ChatTemplateLoadError(
            f"{path}: chat templates {sorted(entry)} include none named 'default'; pick one with --chat-template PATH"
        )
    if not isinstance(entry["default"], str):
        raise ChatTemplateLoadError(f"{path}: the 'default' chat template must be a string")
    return entry["default"]
