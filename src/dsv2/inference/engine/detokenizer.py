"""Incremental detokenization for byte-level BPE, and stop strings.

A byte-level BPE token is a run of bytes, and a character of several UTF-8 bytes can be split across tokens: text
is only emitted once it decodes without a trailing incomplete character (which decodes to U+FFFD). Everything
before `clean`, the token index after the last emission, decoded completely, so decode(all) is decode(emitted
tokens) + decode(the rest), and the deltas concatenate to the full decode: no U+FFFD in a stream whose full
decode has none, and nothing lost at the end (finish() flushes).

Stop strings are matched on the text as it grows (stop_strings.py: each new character costs the same however many
stop strings there are): text that could be the start of a stop string is held back until it cannot be, and the
first stop string to be completed ends the text before it; it is never shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from .stop_strings import StopStrings


class Detokenizer:
    def __init__(self, tokenizer, stop: StopStrings | Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = stop if isinstance(stop, StopStrings) else StopStrings(stop)
        self._state = 0
        """The stop-string automaton's state after the text so far."""
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
        """Emit text up to what could begin a stop string (all of it when final); `text` is the pending text then
        the new, of which the automaton has seen only the pending part."""
        if self.stop:
            self._state, end = self.stop.feed(self._state, text[len(self._pending):])
            if end is not None:  # the match ends in the new text and starts after what was emitted
                text = text[: len(self._pending) + end - self.stop.match[self._state]]
                self.stopped = True
        if self.stopped or final:
            out, self._pending = text, ""
        else:
            hold = self.stop.depth[self._state]
            out, self._pending = text[: len(text) - hold], text[len(text) - hold:]
        self.text += out
        return out
