"""A request's output text for the gateway: detokenized with stop strings, or nothing for models
served without a tokenizer (token ids only)."""

from __future__ import annotations

from cluster.detokenizer import StreamingText
from cluster.tokenizer import TextTokenizer


class TextStream:
    def __init__(self, tokenizer: TextTokenizer | None, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._text = StreamingText(tokenizer.tokenizer, stop, prompt_ids) if tokenizer else None

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        return self._text.push(token_ids) if self._text else ("", False)

    def finish(self) -> str:
        return self._text.finish() if self._text else ""
