"""The checkpoint's own SentencePiece tokenizer: token counts for usage, token-id prompts decoded."""

from __future__ import annotations

from .errors import invalid


class Tokenizer:
    def __init__(self, path: str) -> None:
        import sentencepiece  # in the job's container (NeMo's has it), where the replica front runs

        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()

    def count(self, text: str) -> int:
        return len(self._sp.encode(text)) if text else 0

    def decode(self, ids: list[int], param: str) -> str:
        """Text of a token-id prompt; an id outside the vocabulary is the client's error (400)."""
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise invalid(
                    param,
                    f"{param}: token id {i!r} is not in this model's vocabulary (0..{self.vocab_size - 1})",
                )
        return self._sp.decode(ids)
