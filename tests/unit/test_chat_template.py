"""Chat templates render exactly as `transformers`' `apply_chat_template` does (text and token ids), for the
shipped model's template, a Mistral-instruct template and one using every sandbox helper; where templates come
from (tokenizer_config.json string or named list, chat_template.jinja, --chat-template); typed errors naming
the field; and templates that reach for Python internals are refused."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from cluster.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateLoadError,
    require_chat_template,
    validate_messages,
)
from cluster.errors import InvalidRequest
from cluster.tokenizer import TextTokenizer

MODEL = Path(__file__).resolve().parents[2] / "models" / "mixserve-tiny"
BOS_ID, EOS_ID = 1, 2

# mistralai/Mistral-7B-Instruct-v0.1's template (the Mixtral-8x7B-Instruct one differs only in the EOS spacing).
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Every helper transformers gives templates: strftime_now, raise_exception, namespace, dict, tojson with
# options, loop controls, {% generation %}; plus trim_blocks/lstrip_blocks on un-dashed, indented blocks.
FEATURES = """\
{% set ns = namespace(system='', turns=0) %}
{% set meta = dict(date=strftime_now("%d %b %Y"), model="tiny") %}
{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% set ns.system = message.content %}
        {% continue %}
    {% endif %}
    {% if message.role not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message.role) }}
    {% endif %}
    {% if message.content == 'STOP' %}
        {% break %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ message.role }}|>
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content | trim }}{{ eos_token }}{% endgeneration %}
    {% else %}
{{ message.content }}
    {% endif %}
{% endfor %}
{{ {"system": ns.system, "turns": ns.turns, "meta": meta, "quote": "<b>&'é"} | tojson(indent=1, sort_keys=True) }}
{{ messages | tojson }}
{% if tools is not none or documents is not none %}{{ raise_exception('tools and documents are None') }}{% endif %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""

CHATS = [
    [{"role": "user", "content": "Write a function that adds two numbers."}],
    [{"role": "system", "content": "Answer in Python only."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "  print('hello')  "}, {"role": "user", "content": "and </s> again <s>"}],
    [{"role": "user", "content": "é ü 日本 \n\n tabs\there"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def hf() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(MODEL)


def _with_template(tmp_path: Path, text: str) -> TextTokenizer:
    path = tmp_path / "template.jinja"
    path.write_text(text, encoding="utf-8")
    tokenizer = TextTokenizer.from_model_dir(MODEL, BOS_ID, eos_token_id=EOS_ID, chat_template_path=path)
    assert tokenizer is not None
    return tokenizer


def _assert_same_as_transformers(ours: TextTokenizer, hf: PreTrainedTokenizerFast, template: str | None,
                                 chat: list[dict], add_generation_prompt: bool) -> None:
    expected_text = hf.apply_chat_template(chat, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    expected_ids = hf.apply_chat_template(chat, chat_template=template, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt)
    prompt = ours.encode_chat(chat, add_generation_prompt=add_generation_prompt)
    assert prompt.text == expected_text
    assert list(prompt.token_ids) == list(expected_ids)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", CHATS[:2], ids=["one-turn", "system-multi-turn"])
def test_shipped_template_matches_transformers(hf, chat, add_generation_prompt):
    ours = TextTokenizer.from_model_dir(MODEL, BOS_ID)
    assert ours is not None and ours.chat_template is not None, "the shipped model must carry a chat template"
    _assert_same_as_transformers(ours, hf, None, chat, add_generation_prompt)


def test_shipped_template_is_mistral_instruct_with_its_special_tokens():
    ours = TextTokenizer.from_model_dir(MODEL, BOS_ID)
    prompt = ours.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                               {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert prompt.text == "<s>[INST] S\n\nU [/INST] A</s>[INST] V [/INST]"
    assert prompt.token_ids[0] == BOS_ID and prompt.token_ids.count(BOS_ID) == 1
    assert prompt.token_ids.count(EOS_ID) == 1
    assert ours.encode("x") == [BOS_ID, *ours.encode("x", add_bos=False)], "plain prompts still get BOS"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", [CHATS[0], CHATS[2]], ids=["one-turn", "two-turns"])
def test_mistral_template_matches_transformers(tmp_path, hf, chat, add_generation_prompt):
    _assert_same_as_transformers(_with_template(tmp_path, MISTRAL), hf, MISTRAL, chat, add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", [*CHATS, [{"role": "user", "content": "a"}, {"role": "user", "content": "STOP"},
                                           {"role": "user", "content": "never"}]])
def test_sandbox_helpers_match_transformers(tmp_path, hf, chat, add_generation_prompt):
    _assert_same_as_transformers(_with_template(tmp_path, FEATURES), hf, FEATURES, chat, add_generation_prompt)


@pytest.mark.parametrize(("template", "chat"), [
    (MISTRAL, [{"role": "assistant", "content": "first"}]),
    (MISTRAL, [{"role": "system", "content": "no system role"}]),
    (FEATURES, [{"role": "tool", "content": "x"}]),
])
def test_raise_exception_gives_the_same_message_as_transformers(tmp_path, hf, template, chat):
    with pytest.raises(Exception) as theirs:
        hf.apply_chat_template(chat, chat_template=template, tokenize=False)
    with pytest.raises(ChatTemplateError) as ours:
        _with_template(tmp_path, template).encode_chat(chat)
    assert ours.value.field == "messages"
    assert str(theirs.value) in str(ours.value)
    assert "rejected the conversation" in str(ours.value)


# ---- where the template comes from ---------------------------------------------------------------------


def _model_copy(tmp_path: Path, config: dict | None) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(MODEL / "tokenizer.json", model_dir / "tokenizer.json")
    if config is not None:
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return model_dir


def test_named_templates_use_default_as_transformers_does(tmp_path):
    config = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}DEFAULT"}]}
    model_dir = _model_copy(tmp_path, config)
    assert TextTokenizer.from_model_dir(model_dir, None).encode_chat(CHATS[0]).text == "<s>DEFAULT"
    hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
    assert hf.apply_chat_template(CHATS[0], tokenize=False) == "<s>DEFAULT"


def test_named_templates_without_default_fail_at_load(tmp_path):
    model_dir = _model_copy(tmp_path, {"chat_template": [{"name": "tool_use", "template": "T"}]})
    with pytest.raises(ChatTemplateLoadError, match=r"none named 'default'.*--chat-template"):
        TextTokenizer.from_model_dir(model_dir, None)


def test_template_file_wins_over_config_and_flag_wins_over_both(tmp_path):
    model_dir = _model_copy(tmp_path, {"eos_token": "</s>", "chat_template": "CONFIG"})
    assert TextTokenizer.from_model_dir(model_dir, None).encode_chat(CHATS[0]).text == "CONFIG"
    (model_dir / "chat_template.jinja").write_text("JINJA{{ eos_token }}", encoding="utf-8")
    assert TextTokenizer.from_model_dir(model_dir, None).encode_chat(CHATS[0]).text == "JINJA</s>"
    flag = tmp_path / "flag.jinja"
    flag.write_text("FLAG{{ bos_token }}", encoding="utf-8")
    tokenizer = TextTokenizer.from_model_dir(model_dir, BOS_ID, chat_template_path=flag)
    assert tokenizer.encode_chat(CHATS[0]).text == "FLAG<s>", "bos_token falls back to the config's bos id"


def test_no_template_is_a_typed_error_naming_the_flag(tmp_path):
    tokenizer = TextTokenizer.from_model_dir(_model_copy(tmp_path, None), BOS_ID)
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match=r"--chat-template PATH") as exc:
        tokenizer.encode_chat(CHATS[0])
    assert isinstance(exc.value, InvalidRequest) and exc.value.field == "messages"
    with pytest.raises(ChatTemplateError):
        require_chat_template(None)


def test_bad_template_files_fail_at_load(tmp_path):
    with pytest.raises(ChatTemplateLoadError, match=r"line 1"):
        _with_template(tmp_path, "{% for m in messages %}never closed")
    with pytest.raises(ChatTemplateLoadError, match=r"--chat-template .*cannot read"):
        TextTokenizer.from_model_dir(MODEL, BOS_ID, chat_template_path=tmp_path / "missing.jinja")
    with pytest.raises(ChatTemplateLoadError, match=r"no tokenizer.json"):
        TextTokenizer.from_model_dir(tmp_path, BOS_ID, chat_template_path=tmp_path / "missing.jinja")
    broken = _model_copy(tmp_path, None)
    (broken / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ChatTemplateLoadError, match=r"not valid JSON"):
        TextTokenizer.from_model_dir(broken, BOS_ID)


# ---- messages ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "field"), [
    ("hello", "messages"),
    ([], "messages"),
    ([{"role": "user", "content": "ok"}, "hi"], "messages[1]"),
    ([{"content": "no role"}], "messages[0].role"),
    ([{"role": 3, "content": "x"}], "messages[0].role"),
    ([{"role": "", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant"}], "messages[1].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "x", "name": object()}], "messages[0].name"),
])
def test_bad_messages_name_the_field(messages, field):
    template = ChatTemplate("{{ messages | length }}")
    with pytest.raises(ChatTemplateError) as exc:
        template.render(messages, add_generation_prompt=True)
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value).startswith(f"{field}: ")


def test_messages_are_plain_copies_with_text_parts_joined():
    original = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                 "name": None, "meta": ("x", {"k": 1})}]
    assert validate_messages(original) == [{"role": "user", "content": "a\nb", "meta": ["x", {"k": 1}]}]
    assert original[0]["content"][0] == {"type": "text", "text": "a"}, "the caller's messages are not changed"


def test_a_template_that_fails_at_render_is_a_typed_error():
    template = ChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(ChatTemplateError, match=r"failed on this conversation: TypeError"):
        template.render(CHATS[0], add_generation_prompt=False)


def test_chat_template_error_crosses_process_boundaries():
    error = pickle.loads(pickle.dumps(ChatTemplateError("messages[2].role", "is required")))
    assert isinstance(error, ChatTemplateError) and error.field == "messages[2].role"


# ---- the sandbox ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ (messages | attr('__class__')).__base__ }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ messages[0].update(role='system') }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
])
def test_sandbox_escapes_are_refused(text):
    with pytest.raises(ChatTemplateError, match=r"sandbox forbids"):
        ChatTemplate(text).render(CHATS[0], add_generation_prompt=True)


def test_unsafe_attributes_render_as_nothing():
    assert ChatTemplate("[{{ ''.__class__ }}{{ messages.__len__ }}]").render(CHATS[0], add_generation_prompt=False) \
        == "[]"
