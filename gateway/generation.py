"""One request's life across the tiers, as domain events.

Disaggregated::

    gateway --Decode.Generate(REMOTE)--> decode worker: reserves blocks, answers with a ticket
    gateway --Prefill.Prefill(ticket)--> prefill worker: computes, answers with the first token,
                                         pushes KV pages to the ticket's endpoint meanwhile
    gateway <--tokens 2..n-------------- decode worker: admits the sequence once pages arrive

Colocated (no prefill worker): one ``Decode.Generate(LOCAL)`` call streams every token.

Leaving the generator early (client cancel, deadline, stop string) cancels every open worker call,
which aborts the work and frees its blocks on each tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from transformers import PreTrainedTokenizerBase

from engine.sequence import FinishReason, SamplingParams
from gateway.detokenizer import IncrementalDetokenizer
from gateway.errors import UpstreamError
from gateway.prompts import PromptInput, PromptTokenizer
from gateway.router import RoundRobinRouter, Route
from gateway.stop_strings import StopStringMatcher
from gateway.validation import validate_sampling
from gateway.worker_clients import TokenEvent
from pdserve.metrics import GatewayMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Delta:
    """What the client receives next."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class Deadline:
    """The caller's deadline, turned into the timeout each hop gets."""

    def __init__(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._at = None if timeout is None else loop.time() + timeout

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - asyncio.get_running_loop().time()
        if left <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left


class GenerationCore:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptTokenizer,
        max_model_len: int,
        router: RoundRobinRouter,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.max_model_len = max_model_len
        self.router = router
        self.metrics = metrics

    def prepare(self, inp: PromptInput, sampling: SamplingParams) -> list[int]:
        """Tokenize and validate; raises InvalidRequestError before any worker is involved."""
        prompt = self.prompts.encode(inp)
        validate_sampling(sampling, len(prompt), self.max_model_len)
        return prompt

    async def generate(
        self, request_id: str, prompt: list[int], sampling: SamplingParams, timeout: float | None
    ) -> AsyncIterator[Delta]:
        deadline = Deadline(timeout)
        route = self.router.route()
        if self.metrics is not None:
            self.metrics.routed("colocated" if route.prefill is None else "disaggregated")
        detok = IncrementalDetokenizer(self.tokenizer, prompt)
        stops = StopStringMatcher(sampling.stop)
        completion = 0
        events = self._events(request_id, prompt, sampling, route, deadline)
        try:
            async for event in events:
                completion += len(event.token_ids)
                text = detok.add(event.token_ids)
                if event.finish_reason is not None:
                    text += detok.flush()
                match = stops.feed(text)
                if match.stopped:
                    yield Delta(
                        event.token_ids, match.text, FinishReason.STOP, len(prompt), completion
                    )
                    return
                finish = event.finish_reason
                if finish is not None:
                    text = match.text + stops.flush()
                    yield Delta(event.token_ids, text, finish, len(prompt), completion)
                    return
                yield Delta(event.token_ids, match.text, None, len(prompt), completion)
        finally:
            await events.aclose()

    async def _events(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        route: Route,
        deadline: Deadline,
    ) -> AsyncGenerator[TokenEvent, None]:
        remote = route.prefill is not None
        stream = route.decode.open(
            request_id, prompt, sampling, remote_prefill=remote, timeout=deadline.remaining()
        )
        try:
            if route.prefill is not None:
                ticket = await stream.ticket()
                first = await route.prefill.prefill(
                    request_id, prompt, sampling, ticket, timeout=deadline.remaining()
                )
                yield TokenEvent((first.first_token_id,), first.finish_reason)
                if first.finish_reason is not None:
                    return
            async for event in stream.events():
                yield event
        finally:
            stream.cancel()
