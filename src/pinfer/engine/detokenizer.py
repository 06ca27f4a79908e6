"""Incremental detokenization, so stop strings can be checked (and text
streamed) as tokens arrive, including characters split across tokens."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._text = ""

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes ('' while a character is still partial)."""
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        # Slow tokenizers: decode everything and return what is new (holding back partial characters).
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self._text = text[len(self._text):], text
        return delta
