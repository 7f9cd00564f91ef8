"""Text ↔ token ids with a Hugging Face `tokenizer.json` (the `tokenizers` library), and chat messages → ids
through the checkpoint's chat template (`cluster.chat_template`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from cluster.chat_template import ChatTemplate, ChatTemplateLoadError, require_chat_template
from cluster.errors import InvalidRequest


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # the rendered template, special tokens as text (`<s>[INST] hi [/INST]`)
    token_ids: tuple[int, ...]  # its encoding; BOS only where the template writes it


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None,
                 chat_template: ChatTemplate | None = None) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, bos_token_id: int | None, *, eos_token_id: int | None = None,
                       chat_template_path: str | Path | None = None) -> TextTokenizer | None:
        """None when the directory has no tokenizer.json (token-id-only use still works).

        The chat template is `chat_template_path` (the `--chat-template` flag) or the checkpoint's own; a template
        without `bos_token`/`eos_token` in tokenizer_config.json gets the tokens of these ids.
        """
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            if chat_template_path is not None:
                raise ChatTemplateLoadError(f"--chat-template {chat_template_path}: {model_dir} has no tokenizer.json "
                                            "to encode the rendered chat with")
            return None
        tokenizer = Tokenizer.from_file(str(path))
        fallback = {name: token for name, token_id in (("bos_token", bos_token_id), ("eos_token", eos_token_id))
                    if token_id is not None and (token := tokenizer.id_to_token(token_id)) is not None}
        template = ChatTemplate.from_model_dir(model_dir, path=chat_template_path, fallback_tokens=fallback)
        return cls(tokenizer, bos_token_id, template)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def encode_chat(self, messages: object, *, add_generation_prompt: bool = True) -> ChatPrompt:
        """Render `messages` ([{role, content}, ...]) with the chat template and encode the text as
        `transformers`' `apply_chat_template(..., tokenize=True)` does: special tokens in the text become their
        ids, and no BOS is added beyond what the template writes. Raises ChatTemplateError (an InvalidRequest
        naming the field) when there is no template, a message is malformed, or the template refuses."""
        text = require_chat_template(self.chat_template).render(messages, add_generation_prompt=add_generation_prompt)
        return ChatPrompt(text=text, token_ids=tuple(self.encode(text, add_bos=False)))


def require_tokenizer(tokenizer: TextTokenizer | None, field: str) -> TextTokenizer:
    if tokenizer is None:
        raise InvalidRequest(field, "this model directory has no tokenizer.json; send token ids instead")
    return tokenizer
