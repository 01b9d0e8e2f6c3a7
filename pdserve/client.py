"""Python client for the pdserve Generation API (sync and asyncio).

    from pdserve.client import Client
    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("The capital of France is", max_tokens=8):
            print(chunk.text, end="", flush=True)

``n=`` asks for several samples of the prompt (sample ``i`` drawn from ``seed + i``): their
chunks interleave on one stream, told apart by :attr:`Chunk.index`, and each sample ends with
its own chunk carrying ``finish_reason``.

``timeout=`` (seconds) bounds the whole call, retries included; every tier gets what is left of
it. Without one, the channel's keepalive pings (``keepalive_s``, default 20 s, answered within
10 s) still end a call whose gateway hung or was cut off, with UNAVAILABLE. Leaving the loop
(``break``, closing the generator, cancelling the asyncio task) cancels the call, which stops
the work and frees its KV blocks on every tier. Only calls refused before
their first message are retried (:class:`RetryPolicy`), so a stream never repeats itself.
Errors surface as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import grpc

from core.keepalive import keepalive_options
from core.rich_errors import retry_after_of
from core.sampling import TokenLogprob
from core.structured_output import GrammarKind, StructuredOutput
from core.tls import TLSConfig, secure_channel, sync_channel
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

_FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Chunk:
    """One streamed message: new tokens and their text; the last one has ``finish_reason``."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seed: int | None = None
    """On a sampled request's first chunk: the seed it was drawn with (send it back to get the
    same output); None otherwise."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """With ``logprobs=N``: per token, its log-probability and the N likeliest alternatives
    ``(token id, logprob)``."""
    index: int = 0
    """Which of the request's ``n`` samples this chunk belongs to (0 .. n-1); the counts and
    ``seed`` above are that sample's."""
    cached_tokens: int = 0
    """Prompt tokens whose KV a worker found in its prefix cache (not computed again)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls refused before their first message (RESOURCE_EXHAUSTED by default),
    after the delay the server's ``google.rpc.RetryInfo`` gives, within the call's deadline.
    Nothing is retried once a message arrived (the stream would repeat itself)."""

    max_attempts: int = 4
    """Calls in all, the first included (1: never retry)."""
    default_delay_s: float = 0.5
    """Delay before the first retry when the server sent no RetryInfo; doubles per retry."""
    max_delay_s: float = 10.0
    """No single wait is longer."""
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

    def delay(self, attempt: int, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None: give up."""
        if attempt >= self.max_attempts or exc.code() not in self.codes:
            return None
        hint = retry_after_of(exc)
        base = hint if hint is not None else self.default_delay_s * 2 ** (attempt - 1)
        return min(self.max_delay_s, base * random.uniform(1.0, 1.25))  # jitter spreads retries


NO_RETRY = RetryPolicy(max_attempts=1)
KEEPALIVE_TIMEOUT_S = 10.0  # a ping not answered this long ends the channel's calls


class RequestOptions(TypedDict, total=False):
    """Everything but the text prompt; unset sampling fields take the server's defaults."""

    messages: Sequence[tuple[str, str]] | None  # (role, content) pairs
    prompt_token_ids: Sequence[int] | None
    request_id: str
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    min_p: float | None
    min_tokens: int | None
    logit_bias: Mapping[int, float] | None
    include_stop_str_in_output: bool
    logprobs: int | None
    n: int | None  # samples of the prompt (server default 1, at most 16)
    structured_output: StructuredOutput | None  # constrain the output to a grammar


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[tuple[str, str]] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    request_id: str = "",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    min_p: float | None = None,
    min_tokens: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
    include_stop_str_in_output: bool = False,
    logprobs: int | None = None,
    n: int | None = None,
    structured_output: StructuredOutput | None = None,
) -> generation_pb2.GenerateRequest:
    """The request; unset (None) sampling fields take the server's defaults (see
    ``common.proto`` SamplingParams for each field's meaning and range)."""
    sampling = common_pb2.SamplingParams(
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logit_bias=dict(logit_bias or {}),
        include_stop_str_in_output=include_stop_str_in_output,
    )
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
        ("repetition_penalty", repetition_penalty),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
        ("min_p", min_p),
        ("min_tokens", min_tokens),
        ("logprobs", logprobs),
    ):
        if value is not None:
            setattr(sampling, name, value)
    if structured_output is not None:
        _set_structured(sampling.structured_output, structured_output)
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if n is not None:
        request.n = n
    if prompt is not None:
        request.prompt = prompt
    if messages:
        request.messages.extend(generation_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    if prompt_token_ids:
        request.prompt_token_ids.extend(prompt_token_ids)
    return request


def _set_structured(msg: common_pb2.StructuredOutput, constraint: StructuredOutput) -> None:
    """``constraint`` into ``msg`` (the proto's oneof field named as ``GrammarKind.value``)."""
    if constraint.kind is GrammarKind.JSON_OBJECT:
        msg.json_object = True
    elif constraint.kind is GrammarKind.CHOICE:
        msg.choice.choices.extend(constraint.choices)
    else:
        setattr(msg, constraint.kind.value, constraint.spec)


def chunk_from_proto(msg: generation_pb2.GenerateResponse) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=_FINISH_NAMES.get(msg.finish_reason),
        prompt_tokens=msg.usage.prompt_tokens,
        completion_tokens=msg.usage.completion_tokens,
        seed=msg.seed if msg.HasField("seed") else None,
        logprobs=tuple(
            TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
            for lp in msg.logprobs
        ),
        index=msg.index,
        cached_tokens=msg.usage.cached_tokens,
    )


def _tls(tls: TLSConfig | bool | None) -> TLSConfig | None:
    if tls is True:
        return TLSConfig()
    return tls or None


class _Base:
    def __init__(
        self,
        address: str,
        tls: TLSConfig | bool | None,
        token: str | None,
        retry: RetryPolicy | None,
        keepalive_s: float,
    ) -> None:
        self.address = address
        self._options: list[tuple[str, object]] = list(
            keepalive_options(
                keepalive_s, min(keepalive_s, KEEPALIVE_TIMEOUT_S), reads_streams=True
            )
        )
        self.tls = _tls(tls)
        self.retry = retry or NO_RETRY
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()

    def _attempts(
        self, prompt: str | None, timeout: float | None, options: RequestOptions
    ) -> _Attempts:
        return _Attempts(self, build_request(prompt, **options), timeout)


class _Attempts:
    """One ``generate`` call across its attempts: the request, the deadline every attempt
    shares, and the retry decision (the same for the blocking and asyncio clients)."""

    def __init__(
        self, client: _Base, request: generation_pb2.GenerateRequest, timeout: float | None
    ) -> None:
        self.request = request
        self._retry = client.retry
        self._deadline = None if timeout is None else time.monotonic() + timeout
        rid = (("x-request-id", request.request_id),) if request.request_id else ()
        self._metadata = (*client._auth, *rid)
        self._attempt = 0

    def next(self) -> dict[str, object]:
        """Keyword arguments of the next attempt's ``Generate`` call (what is left of the
        deadline, auth and request-id metadata)."""
        self._attempt += 1
        return {"timeout": _left(self._deadline), "metadata": self._metadata}

    def retry_delay(self, exc: grpc.RpcError, received: bool) -> float | None:
        """Seconds to wait before trying again, or None to give up: only before the first
        message (nothing was streamed yet), as the retry policy allows, and within the deadline."""
        delay = None if received else self._retry.delay(self._attempt, exc)
        left = _left(self._deadline)
        if delay is None or (left is not None and delay >= left):
            return None
        return delay


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Client(_Base):
    """Blocking client; one channel, reused across calls (and threads).

    ``tls``: a :class:`TLSConfig` (``ca=...``; add ``cert``/``key`` when the gateway wants a
    client certificate), or True for the system's roots. ``token`` sends ``authorization:
    Bearer <token>``. ``retry``: see :class:`RetryPolicy` (None: never retry). ``keepalive_s``:
    seconds between the channel's pings (the gateway accepts one every 5 s at most; 0: none).
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        tls: TLSConfig | bool | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = RetryPolicy(),
        keepalive_s: float = 20.0,
    ) -> None:
        super().__init__(address, tls, token, retry, keepalive_s)
        self._channel = sync_channel(address, self.tls, self._options)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> Iterator[Chunk]:
        attempts = self._attempts(prompt, timeout, options)
        while True:
            call = self._stub.Generate(attempts.request, **attempts.next())
            received = False
            try:
                for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = attempts.retry_delay(exc, received)
                if delay is None:
                    raise
            finally:
                call.cancel()  # no-op after a normal end; stops the server's work if we left
            time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client; cancelling the consuming task cancels the request on every tier.

    Arguments as :class:`Client`'s."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        tls: TLSConfig | bool | None = None,
        token: str | None = None,
        retry: RetryPolicy | None = RetryPolicy(),
        keepalive_s: float = 20.0,
    ) -> None:
        super().__init__(address, tls, token, retry, keepalive_s)
        self._channel = secure_channel(address, self.tls, self._options)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncIterator[Chunk]:
        attempts = self._attempts(prompt, timeout, options)
        while True:
            call = self._stub.Generate(attempts.request, **attempts.next())
            received = False
            try:
                async for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = attempts.retry_delay(exc, received)
                if delay is None:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
