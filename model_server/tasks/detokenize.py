"""Token ids to text deltas that are safe to stream, with OpenAI ``stop`` sequences.

Two things make naive streaming wrong: a byte-level BPE token can end in the middle of a UTF-8
character (decoding shows U+FFFD until the next token completes it), and text that might be
the start of a stop sequence must not be sent until we know it is not one, because OpenAI
excludes the stop sequence from the output. So each step decodes the whole completion and
releases only the part that can no longer change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be sent now (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._release(self._decode(self._ids), final=False)

    def finish(self) -> str:
        """Generation ended: release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids), final=True)

    def _release(self, full: str, *, final: bool) -> str:
        end = len(full)
        for stop in self._stop:
            at = full.find(stop, self._sent)
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            while end > self._sent and full[end - 1] == _REPLACEMENT:
                end -= 1
            end -= self._held_for_stop(full[:end])
        end = max(end, self._sent)
        delta = full[self._sent : end]
        self._sent = end
        self.text = full[:end]
        return delta

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that could begin a stop sequence."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
