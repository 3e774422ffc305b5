"""Incremental detokenization for byte-level BPE, and stop strings.

A byte-level BPE token is a run of bytes, and a character of several UTF-8 bytes can be split across tokens: text
is only emitted once it decodes without a trailing incomplete character (which decodes to U+FFFD). Everything
before `clean`, the token index after the last emission, decoded completely, so decode(all) is decode(emitted
tokens) + decode(the rest), and the deltas concatenate to the full decode: no U+FFFD in a stream whose full
decode has none, and nothing lost at the end (finish() flushes).

Stop strings are matched on the text: text that could be the start of a stop string is held back until it cannot
be, and a match ends the text before the stop string, which is never shown.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.clean = 0
        self.text = ""
        """Text emitted so far."""
        self._pending = ""
        """Decoded text not yet emitted: it could begin a stop string."""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; the text to emit now (empty while a character or a possible stop string is incomplete)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        piece = self.tokenizer.decode(self.ids[self.clean:])
        if piece.endswith("\ufffd"):
            return ""
        self.clean = len(self.ids)
        return self._emit(self._pending + piece, final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the completion."""
        if self.stopped:
            return ""
        rest = self.tokenizer.decode(self.ids[self.clean:]) if self.clean < len(self.ids) else ""
        self.clean = len(self.ids)
        return self._emit(self._pending + rest, final=True)

    def _emit(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:  # the earliest match ends the text
            text = text[: min(hits)]
            self.stopped = True
        if self.stopped or final:
            out, self._pending = text, ""
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            out, self._pending = text[: len(text) - hold], text[len(text) - hold:]
        self.text += out
        return out
