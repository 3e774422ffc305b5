"""Tokens as the API shows them: each token id's text and its own bytes, computed once per server (a response's
log-probabilities are then lookups, not a tokenizer call per entry on the event loop), the prompt-size bound they
give, and the log-probabilities of a completion and of a chat in OpenAI's shapes.

A byte-level BPE token is a run of bytes, not always whole characters: the text of a token that holds part of a
character decodes to U+FFFD, so a chat log-probability's `bytes` are the token's own bytes (from its byte-level
spelling in the vocabulary), never the replacement character's; the bytes of a completion's tokens concatenate to
its text's UTF-8. On a checkpoint without a tokenizer a token is shown as vLLM shows it, 'token_id:N'.
"""

from __future__ import annotations

from dataclasses import replace

from tokenizers import decoders

from ..inference.engine import TokenLogprob
from .responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = dict(zip(keep, keep, strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


class TokenTable:
    """Each token id's text (decoded alone, special tokens included) and bytes, for ids below vocab_size."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.texts: list[str] = []
        self.bytes: list[bytes] = []
        if tokenizer is not None:
            self.texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
            self.bytes = self._own_bytes()
        self.max_token_bytes = max((len(b) for b in self.bytes), default=1) or 1

    def _own_bytes(self) -> list[bytes]:
        tok = self.tokenizer
        added = set(tok.get_added_tokens_decoder())
        byte_level = _byte_decoder() if isinstance(tok.decoder, decoders.ByteLevel) else None
        out = []
        for i, text in enumerate(self.texts):
            piece = tok.id_to_token(i)
            if piece is None or i in added:
                out.append(text.encode("utf-8"))
            elif byte_level is not None and all(c in byte_level for c in piece):
                out.append(bytes(byte_level[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece's byte pieces
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(text.encode("utf-8"))
        return out

    def max_prompt_bytes(self, max_model_len: int) -> int | None:
        """A text longer than this (in UTF-8 bytes) has more tokens than the context holds, whatever it says: it
        is refused before it is tokenized. None where no such bound holds (no tokenizer, or one that normalizes
        the text before splitting it, which may shorten it)."""
        if self.tokenizer is None or self.tokenizer.normalizer is not None:
            return None
        return max_model_len * self.max_token_bytes

    def text(self, t: int) -> str:
        if not self.texts:
            return f"token_id:{t}"
        return self.texts[t] if 0 <= t < len(self.texts) else ""

    def own_bytes(self, t: int) -> bytes:
        if not self.bytes:
            return self.text(t).encode("utf-8")
        return self.bytes[t] if 0 <= t < len(self.bytes) else b""

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int | None) -> CompletionLogprobs:
        """OpenAI's completion logprobs; text_offset from `offset` characters (None: no text, no offsets)."""
        tokens = [self.text(lp.token_id) for lp in lps]
        offsets = None
        if offset is not None:
            offsets = []
            for t in tokens:
                offsets.append(offset)
                offset += len(t)
        top = [{self.text(i): v for i, v in [(lp.token_id, lp.logprob), *lp.top]} for lp in lps]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in lps], top_logprobs=top,
                                  text_offset=offsets)

    def echo_logprobs(self, prompt: list[TokenLogprob | None], prompt_ids: list[int], lps: list[TokenLogprob],
                      echo: str | None, top: int) -> CompletionLogprobs:
        """OpenAI's logprobs over prompt + completion (echo): the first prompt token's entries null; text_offset
        into the echoed text + completion (None without text), a BOS the echoed text does not show taking none."""
        head = self.completion_logprobs([replace(p, top=p.top[:top]) for p in prompt if p is not None], None)
        first = self.text(prompt_ids[0]) if prompt_ids else None
        tail = self.completion_logprobs(lps, None)
        tokens = ([first] if prompt_ids else []) + head.tokens + tail.tokens
        offsets = None
        if echo is not None:
            offsets, at = [], 0
            for i, t in enumerate(tokens):
                offsets.append(at)
                at += len(t) if i or echo.startswith(t) else 0
        return CompletionLogprobs(tokens=tokens, token_logprobs=[None] * bool(prompt_ids) + head.token_logprobs
                                  + tail.token_logprobs, text_offset=offsets,
                                  top_logprobs=[None] * bool(prompt_ids) + head.top_logprobs + tail.top_logprobs)

    def prompt_logprobs(self, prompt: list[TokenLogprob | None], top: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token, token id -> {logprob, rank, decoded_token} for it and the top N."""
        out = []
        for p in prompt:
            if p is None:
                out.append(None)
                continue
            entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": self.text(t)} for r, (t, v) in
                     enumerate(p.top[:top])}
            entry.setdefault(str(p.token_id), {"logprob": p.logprob, "rank": p.rank,
                                               "decoded_token": self.text(p.token_id)})
            out.append(entry)
        return out

    def chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        def entry(t: int, v: float) -> dict:
            return {"token": self.text(t), "logprob": v, "bytes": list(self.own_bytes(t))}

        return ChatLogprobs(content=[ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                                                      top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
                                     for lp in lps])
