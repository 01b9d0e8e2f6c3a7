"""Stop strings checked on streamed text, with the minimum hold-back needed to catch them.

Text is emitted as soon as it cannot be the start of a stop string. The stream stops at the stop
string that *ends* first (ties: the one that starts first), so the result does not depend on how
the text was split into deltas. The matched stop string is cut off, or, with
``include_stop_str_in_output`` (vLLM's option), kept as the end of the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StopMatch(NamedTuple):
    """What one ``feed`` produced."""

    text: str  # text to emit now (contains a stop string only at its end, when included)
    stopped: bool  # a stop string was found: ``text`` is the last text of the stream


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas.

    A stop string may be split across deltas, so the matcher holds back the longest tail of the
    stream that is a proper prefix of some stop string, and nothing more::

        stream so far:  "The answer is 42.\\n\\nUs"       stop = ("\\n\\nUser:",)
        emitted:        "The answer is 42."
        held back:                        "\\n\\nUs"   (a prefix of "\\n\\nUser:")

    Invariants: the held-back buffer is always shorter than the longest stop string; emitted
    text plus held text is the stream so far up to (excluding) a matched stop string; once
    stopped, every later ``feed`` returns ``StopMatch("", True)`` and ``flush`` returns "".
    Stop strings must be non-empty (validated at the gateway's edge).
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop: tuple[str, ...] = tuple(dict.fromkeys(stop))  # deduplicated, in order
        self._include = include_stop_str_in_output
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text_delta: str) -> StopMatch:
        """Add the next piece of text; return what may be emitted and whether to stop."""
        if self._stopped:
            return StopMatch("", True)
        if not self._stop:
            return StopMatch(text_delta, False)
        buffer = self._held + text_delta
        match = self._first_match(buffer)
        if match is not None:
            self._held = ""
            self._stopped = True
            start, end = match
            return StopMatch(buffer[: end if self._include else start], True)
        hold = self._partial_match_len(buffer)
        self._held = buffer[len(buffer) - hold :]
        return StopMatch(buffer[: len(buffer) - hold], False)

    def flush(self) -> str:
        """Return the held-back text at the end of the stream (it matched no stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, int] | None:
        """``(start, end)`` of the stop-string occurrence that ends first in ``buffer``."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stop:
            start = buffer.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else (best[1], best[0])

    def _partial_match_len(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            # Candidate starts: positions in the last len(s) - 1 chars holding s's first char.
            start = max(len(buffer) - len(s) + 1, 0)
            while (start := buffer.find(s[0], start)) >= 0:
                tail = len(buffer) - start
                if tail <= longest:
                    break
                if s.startswith(buffer[start:]):
                    longest = tail
                    break
                start += 1
        return longest
