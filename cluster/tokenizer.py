"""Text ↔ token ids with a Hugging Face `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from cluster.errors import InvalidRequest


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, bos_token_id: int | None) -> TextTokenizer | None:
        """None when the directory has no tokenizer.json (token-id-only use still works)."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            return None
        return cls(Tokenizer.from_file(str(path)), bos_token_id)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def require_tokenizer(tokenizer: TextTokenizer | None, field: str) -> TextTokenizer:
    if tokenizer is None:
        raise InvalidRequest(field, "this model directory has no tokenizer.json; send token ids instead")
    return tokenizer
