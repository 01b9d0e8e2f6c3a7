"""Server-sent events as the benchmark reads them: :class:`SseParser` splits a byte stream into
events (at any byte boundary, LF, CRLF or CR line ends, multi-line ``data``), and
:class:`StreamTimer` turns one request's events and their arrival times into a
:class:`~pdserve.bench.metrics.RequestOutcome` (the rules are :mod:`pdserve.bench.openai_http`'s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestOutcome

_FAILED_FINISH = frozenset({"error", "cancelled"})


class SseParser:
    """Incremental server-sent events: feed bytes as they arrive, get each event's data.

    Events end at a blank line; ``data:`` lines of one event are joined with newlines (one
    leading space is dropped), comments (``:``) and other fields are ignored; ``\\n``, ``\\r\\n``
    and ``\\r`` all end lines. An event split across reads is returned when its end arrives.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            end, after = cut
            line, self._buffer = self._buffer[:end], self._buffer[after:]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, sep, value = line.partition(b":")
            if name == b"data":
                text = value[1:] if value.startswith(b" ") else value
                self._data.append(text.decode("utf-8") if sep else "")

    def close(self) -> list[str]:
        """The last event of a stream that ended without its blank line."""
        events = self.feed(b"\n\n") if self._buffer else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None while the line is incomplete."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buffer):
        return None  # a \r\n may be split across reads
    return (cr, cr + 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)


@dataclass
class StreamTimer:
    """Turns one request's SSE events, with their arrival times, into a :class:`RequestOutcome`
    (see the module's docstring for the rules)."""

    sent: float
    first: float | None = None
    last: float = 0.0
    gaps: list[float] = field(default_factory=list)
    events: int = 0
    running: int | None = None
    """The last running ``usage.completion_tokens`` seen on a chunk with choices."""
    counted: int = 0
    """The running count at the last token event: the tokens a text chunk brings are its
    count less this, so tokens of textless chunks (held-back bytes) join the next gap."""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish: str | None = None
    error: str | None = None
    done: bool = False

    def on_data(self, data: str, now: float) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            doc = json.loads(data)
        except ValueError:
            self.error = self.error or f"malformed SSE data: {data[:200]!r}"
            return
        if not isinstance(doc, dict):
            return
        if "error" in doc and not doc.get("choices"):
            self.error = self.error or f"error event: {json.dumps(doc['error'])[:300]}"
            return
        usage = doc.get("usage") or {}
        choices = doc.get("choices") or []
        if choices:
            choice = choices[0]
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            new = 1
            if isinstance(usage.get("completion_tokens"), int):
                self.running = usage["completion_tokens"]
                new = self.running - self.counted
            if text:
                self._token_event(now, max(new, 1))
                self.counted = self.running or 0
            self.finish = choice.get("finish_reason") or self.finish
        if isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]

    def _token_event(self, now: float, new_tokens: int) -> None:
        self.events += 1
        if self.first is None:
            self.first = now
        else:
            self.gaps.extend([(now - self.last) / new_tokens] * new_tokens)
        self.last = now

    def outcome(
        self, request: BenchRequest, origin: float, prompt_len: int | None = None
    ) -> RequestOutcome:
        start = self.sent - origin
        if self.error is not None:
            return failed(request, start, self.error)
        if self.first is None or self.finish is None or self.finish in _FAILED_FINISH:
            return failed(request, start, f"stream ended with finish reason {self.finish}")
        return RequestOutcome(
            success=True,
            prompt_len=request.prompt_len if prompt_len is None else prompt_len,
            output_tokens=self.completion_tokens or self.events,
            ttft_s=self.first - self.sent,
            itl_s=tuple(self.gaps),
            latency_s=self.last - self.sent,
            start_s=start,
        )


def failed(request: BenchRequest, start_s: float, error: str) -> RequestOutcome:
    return RequestOutcome(
        success=False, prompt_len=request.prompt_len, start_s=start_s, error=error
    )
