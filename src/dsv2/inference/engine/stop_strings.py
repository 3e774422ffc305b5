"""Stop strings matched as the text grows, at a cost per new character that does not depend on how many stop
strings a request has: an Aho-Corasick automaton over characters (Aho & Corasick, 1975).

A state is the longest suffix of the text so far that is a prefix of some stop string; its depth is how much text
the detokenizer must hold back (it could still become a stop string), and `match` is the length of the longest
stop string that ends at it (0: none). The automaton is built once per request (it is immutable; each completion
keeps only its state), so its n completions and every step share it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.match, self.fail = [0], [0], [0]
        for s in self.stops:
            state = 0
            for ch in s:
                if ch not in self.goto[state]:
                    self.goto[state][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.match.append(0)
                    self.fail.append(0)
                state = self.goto[state][ch]
            self.match[state] = len(s)
        queue = deque(self.goto[0].values())  # breadth first: a state's failure link is shallower than it
        while queue:
            state = queue.popleft()
            for ch, child in self.goto[state].items():
                queue.append(child)
                self.fail[child] = self._next(self.fail[state], ch)  # the root's children keep 0
                self.match[child] = max(self.match[child], self.match[self.fail[child]])

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _next(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def feed(self, state: int, text: str) -> tuple[int, int | None]:
        """The state after `text`, and where in `text` the first stop string to complete ends (the index after
        its last character), or None."""
        for i, ch in enumerate(text):
            state = self._next(state, ch)
            if self.match[state]:
                return state, i + 1
        return state, None
