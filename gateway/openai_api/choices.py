"""The ``choices`` of one response, built from the interleaved deltas of its samples.

Choice ``i`` is sample ``i`` (:attr:`Delta.index`). Streamed, each delta becomes one chunk
choice carrying that index (each choice gets its own finish chunk); whole, each choice holds its
sample's text and logprobs. ``echo`` (completions) puts the prompt's text before each choice's:
on the first chunk of each choice when streamed. Usage counts the prompt once and sums the
samples' completion tokens, as OpenAI and vLLM do; ``cached_tokens`` is sample 0's (the prompt
as the request first met it; its siblings reuse the KV sample 0 left in the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from core.sampling import FinishReason, TokenLogprob
from gateway.generation import Delta
from gateway.openai_api import protocol as p
from gateway.openai_api.logprobs import LogprobFormatter


@dataclass
class _Choice:
    formatter: LogprobFormatter | None
    prefix: str  # echoed before the first text, then ""
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: Delta | None = None


class Choices:
    """One response's ``n`` choices (``chat``: chat shapes, else completions')."""

    def __init__(
        self,
        n: int,
        chat: bool,
        tokenizer: PreTrainedTokenizerBase,
        logprobs: bool,
        echo: str = "",
    ) -> None:
        self.chat = chat
        self._choices = [
            _Choice(LogprobFormatter(tokenizer) if logprobs else None, echo) for _ in range(n)
        ]

    def stream(self, delta: Delta) -> BaseModel | None:
        """The chunk choice for ``delta``; None when there is nothing to send yet (the
        detokenizer holds back an incomplete character)."""
        choice = self._add(delta)
        text, choice.prefix = choice.prefix + delta.text, ""
        finish = _finish(delta.finish_reason)
        lp = choice.formatter
        if not text and finish is None and not (lp and delta.logprobs):
            return None
        if self.chat:
            chat_lp = lp.chat(delta.logprobs) if lp else None
            return p.ChatChunkChoice(
                index=delta.index,
                delta=p.ChatDelta(content=text),
                logprobs=chat_lp,
                finish_reason=finish,
            )
        text_lp = lp.completion(delta.logprobs) if lp else None
        return p.CompletionChoice(
            index=delta.index, text=text, logprobs=text_lp, finish_reason=finish
        )

    def collect(self, delta: Delta) -> None:
        """Keep ``delta`` for :meth:`whole`."""
        choice = self._add(delta)
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs)

    def whole(self) -> list[BaseModel]:
        """Every choice of a response that is not streamed, in index order."""
        out: list[BaseModel] = []
        for index, choice in enumerate(self._choices):
            text = choice.prefix + "".join(choice.text)
            finish = _finish(choice.last.finish_reason if choice.last else None)
            lp = choice.formatter
            if self.chat:
                chat_lp = None if lp is None else lp.chat(choice.logprobs) or p.ChatLogprobs()
                message = p.ChatMessageOut(content=text)
                out.append(
                    p.ChatChoice(
                        index=index, message=message, logprobs=chat_lp, finish_reason=finish
                    )
                )
            else:
                text_lp = (
                    None if lp is None else lp.completion(choice.logprobs) or p.CompletionLogprobs()
                )
                out.append(
                    p.CompletionChoice(
                        index=index, text=text, logprobs=text_lp, finish_reason=finish
                    )
                )
        return out

    def usage(self) -> p.Usage:
        """The prompt once, every sample's completion tokens, sample 0's cached tokens."""
        lasts = [c.last for c in self._choices if c.last is not None]
        prompt = lasts[0].prompt_tokens if lasts else 0
        completion = sum(d.completion_tokens for d in lasts)
        first = self._choices[0].last
        cached = first.cached_tokens if first is not None else 0
        return p.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached),
        )

    def _add(self, delta: Delta) -> _Choice:
        choice = self._choices[delta.index]
        choice.last = delta
        return choice


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value
