"""One request's life across the tiers, as a stream of :class:`Delta`, with failover.

Disaggregated, the decode worker reserves blocks and answers with a ticket, the prefill worker
computes the first token and pushes the KV pages to it, and the decode worker streams the rest;
local prefill is one decode call (one attempt: :mod:`gateway.attempt`). Across failover the client's
stream has no duplicated and no missing tokens and equals an undisturbed run's
(:meth:`GenerationCore._events`). Leaving the generator early (client cancel, deadline, stop
string) cancels every open worker call, which aborts the work and frees its blocks on each tier.
A request with ``n`` samples runs this once per sample (:mod:`gateway.fanout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import grpc
import structlog
from transformers import PreTrainedTokenizerBase

from core.errors import InvalidRequestError
from core.sampling import FinishReason, SamplingParams, TokenLogprob
from gateway.attempt import Deadline, run_attempt
from gateway.detokenizer import IncrementalDetokenizer
from gateway.errors import NoWorkersError, UpstreamError
from gateway.grammar import GrammarValidator
from gateway.prompts import PromptInput, PromptTokenizer
from gateway.router import Route, Router
from gateway.seeds import with_seed
from gateway.stop_strings import StopStringMatcher
from gateway.validation import validate_sampling
from gateway.worker_calls import TokenEvent
from server_runtime.metrics import GatewayMetrics

log = structlog.get_logger(__name__)

RETRY_PAUSE_S = 0.05  # before attempt n+1: n x this (lets the registry see a death)


@dataclass(frozen=True)
class Delta:
    """What the client receives next."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    seed: int | None = None
    """On the first delta of a sampled request (of each sample): the seed it is drawn with (the
    caller's or the one :func:`with_seed` chose; sample i's is that + i); None otherwise."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per ``token_ids`` entry when the request asked for logprobs."""
    index: int = 0
    """Which of the request's samples this delta belongs to (``n`` > 1: :mod:`gateway.fanout`)."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a worker's prefix cache (the first attempt's report)."""


@dataclass(frozen=True)
class FailoverConfig:
    max_attempts: int = 4
    """Routes tried per request, the first included (1: no failover)."""
    kv_arrival_timeout_s: float = 5.0
    """A prefill's pages not at the decode worker this long after its answer fail the attempt
    (retried elsewhere); 0: wait for them as long as the deadline allows."""


class GenerationCore:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptTokenizer,
        max_model_len: int,
        router: Router,
        metrics: GatewayMetrics | None = None,
        *,
        max_prompt_tokens: int = 0,
        failover: FailoverConfig | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.max_model_len = max_model_len
        self.router = router
        self.metrics = metrics
        self.max_prompt_tokens = max_prompt_tokens
        self.failover = failover or FailoverConfig()
        self.grammars = GrammarValidator(tokenizer)

    def prepare(self, inp: PromptInput, sampling: SamplingParams) -> list[int]:
        """Tokenize and validate; raises InvalidRequestError before any worker is involved."""
        prompt = self.prompts.encode(inp)
        if self.max_prompt_tokens and len(prompt) > self.max_prompt_tokens:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens; this gateway accepts at most "
                f"{self.max_prompt_tokens} (--max-prompt-tokens)"
            )
        validate_sampling(sampling, len(prompt), self.max_model_len, self.prompts.vocab_size)
        if sampling.structured is not None:
            self.grammars.check(sampling.structured)
        return prompt

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        timeout: float | None,
        *,
        index: int = 0,
        pin: Route | None = None,
        on_cached: Callable[[Route], None] | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """One sample's deltas (``index``: which of the request's samples, for the deltas).
        ``pin``: try this route first (see :meth:`Router.pinned`); ``on_cached``: called with
        the route once the prompt's KV is in its workers' prefix caches (see :func:`run_attempt`).
        """
        deadline = Deadline(timeout)
        if sampling.seed is None and not sampling.greedy:
            sampling = with_seed(sampling)
            log.info("seed_assigned", seed=sampling.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt)
        stops = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output)
        seed = None if sampling.greedy else sampling.seed  # reported on the first delta
        completion = 0
        cached: int | None = None  # the first event's: the prompt as the request sent it
        events = self._events(request_id, prompt, sampling, deadline, pin, on_cached)
        try:
            async for event in events:
                if cached is None:
                    cached = min(event.cached_tokens, len(prompt))
                completion += len(event.token_ids)
                text = detok.add(event.token_ids)
                if event.finish_reason is not None:
                    text += detok.flush()
                match = stops.feed(text)
                first_seed, seed = seed, None
                finish = FinishReason.STOP if match.stopped else event.finish_reason
                if finish is not None and not match.stopped:
                    text = match.text + stops.flush()
                else:
                    text = match.text
                yield Delta(
                    event.token_ids,
                    text,
                    finish,
                    len(prompt),
                    completion,
                    first_seed,
                    event.logprobs,
                    index,
                    cached,
                )
                if finish is not None:
                    return
        finally:
            await events.aclose()

    async def _events(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        deadline: Deadline,
        pin: Route | None = None,
        on_cached: Callable[[Route], None] | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Every token of the request, across as many attempts as failures need.

        An attempt that failed where another worker may succeed (the worker died, drains, is
        full, or broke the transfer: ``UpstreamError.retryable``, see
        :func:`~gateway.errors.worker_failure`) is retried on another route, avoiding the
        workers that failed, with the tokens received so far appended to the prompt; any other
        failure ends the request at once with its own status (it is the same everywhere)::

            attempt 1:  prompt                  -> t1 t2 t3  x (decode worker died)
            attempt 2:  prompt + [t1 t2 t3]     -> t4 t5 ... (prefilled again, on other workers)

        A resume asks for ``max_tokens`` and ``min_tokens`` less the tokens received and tells
        the workers how many trailing prompt tokens are output (``resumed_tokens``), so the
        penalties and the min_tokens mask continue as in an undisturbed run.

        Tokens already received are never asked for again, so the stream has no duplicated and
        no missing tokens. Output equals an undisturbed run's: greedy trivially; sampled because
        the sampler draws position ``p`` of a seeded request from ``(seed, p)`` wherever it runs
        (:mod:`engine.sampler`) and every sampled request carries a seed (:func:`with_seed`) on
        every hop, resumes included. Before the first token this is a plain retry. After
        ``FailoverConfig.max_attempts`` the request fails (:func:`_final_error`): UNAVAILABLE
        saying how many tokens arrived if any did, else the last error's code. ``pin`` is the
        first attempt's route while its workers are routable; retries route afresh.
        """
        generated: list[int] = []
        avoid_decode: set[str] = set()
        avoid_prefill: set[str] = set()
        attempt = 0
        resuming = False  # a stream broke after its first token; no new token arrived since
        while True:
            attempt += 1
            left = sampling.max_tokens - len(generated)
            if left <= 0:  # every token arrived; only the finish was lost
                self._resumed(resuming)
                yield TokenEvent((), FinishReason.LENGTH)
                return
            try:
                route = (self.router.pinned(pin) if pin is not None and attempt == 1 else None) or (
                    self.router.route(prompt + generated, avoid_decode, avoid_prefill)
                )
            except NoWorkersError as exc:
                if not generated:
                    raise
                self._resume_failed()
                raise UpstreamError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the stream failed after {len(generated)} tokens and could not be "
                    f"resumed: {exc}",
                ) from exc
            self._log_route(route, attempt, len(generated))
            attempt_events = run_attempt(
                self.router,
                request_id,
                prompt + generated,
                dataclasses.replace(
                    sampling,
                    max_tokens=left,
                    min_tokens=max(0, sampling.min_tokens - len(generated)),
                ),
                route,
                deadline,
                kv_arrival_timeout_s=self.failover.kv_arrival_timeout_s,
                resumed_tokens=len(generated),
                on_cached=on_cached,
                metrics=self.metrics,
            )
            try:
                async with contextlib.aclosing(attempt_events):  # ends worker calls at once
                    async for event in attempt_events:
                        resuming = self._resumed(resuming)
                        generated.extend(event.token_ids)
                        yield event
                        if event.finish_reason is not None:
                            return
            except UpstreamError as exc:
                if not exc.retryable or attempt >= self.failover.max_attempts:
                    if exc.retryable and generated:
                        self._resume_failed()
                    raise _final_error(exc, len(generated), attempt) from exc
                (avoid_decode if exc.tier == "decode" else avoid_prefill).add(exc.address)
                if generated:
                    resuming = True
                elif self.metrics is not None:
                    self.metrics.prefill_retry(exc.tier, exc.code.name)
                log.warning(
                    "request_retrying" if not generated else "stream_resuming",
                    attempt=attempt,
                    failed_tier=exc.tier,
                    failed_worker=exc.address,
                    code=exc.code.name,
                    error=str(exc),
                    tokens_so_far=len(generated),
                )
                await asyncio.sleep(RETRY_PAUSE_S * attempt)

    def _resumed(self, resuming: bool) -> bool:
        """Count a broken stream that continued (once); returns the new ``resuming``."""
        if resuming and self.metrics is not None:
            self.metrics.decode_resume("resumed")
        return False

    def _resume_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.decode_resume("failed")

    def _log_route(self, route: Route, attempt: int, resumed_after: int) -> None:
        if self.metrics is not None:
            self.metrics.routed(route.decision, route.prefill_reason, route.fallbacks)
        log.info(
            "request_routed",
            decision=route.decision,
            decode=route.decode.address,
            prefill=route.prefill.address if route.prefill is not None else None,
            attempt=attempt,
            **({"prefill_reason": route.prefill_reason} if route.prefill_reason else {}),
            **({"fallbacks": list(route.fallbacks)} if route.fallbacks else {}),
            **({"resumed_after_tokens": resumed_after} if resumed_after else {}),
        )


def _final_error(exc: UpstreamError, tokens: int, attempts: int) -> UpstreamError:
    """The error the client sees once failover gives up."""
    if not exc.retryable:
        return exc
    if tokens:
        message = (
            f"the stream failed after {tokens} tokens and could not be resumed "
            f"({attempts} attempts): {exc}"
        )
        code = grpc.StatusCode.UNAVAILABLE
    else:
        message = f"no worker could serve the request ({attempts} attempts): {exc}"
        code = exc.code
    return UpstreamError(
        code,
        message,
        tier=exc.tier,
        address=exc.address,
        retry_after_s=exc.retry_after_s,
    )
