"""Python client for the pdserve Generation API (sync and asyncio).

    from pdserve.client import Client
    for chunk in Client("127.0.0.1:50051").generate("The capital of France is", max_tokens=8):
        print(chunk.text, end="", flush=True)

Errors surface as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import grpc

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
) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos
    )
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if prompt is not None:
        request.prompt = prompt
    if messages:
        request.messages.extend(generation_pb2.ChatMessage(role=r, content=c) for r, c in messages)
    if prompt_token_ids:
        request.prompt_token_ids.extend(prompt_token_ids)
    return request


def chunk_from_proto(msg: generation_pb2.GenerateResponse) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finish_reason=_FINISH_NAMES.get(msg.finish_reason),
        prompt_tokens=msg.usage.prompt_tokens,
        completion_tokens=msg.usage.completion_tokens,
    )


class Client:
    """Blocking client; one channel, reused across calls."""

    def __init__(self, address: str = "127.0.0.1:50051") -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> Iterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, **options), timeout=timeout)
        try:
            for msg in call:
                yield chunk_from_proto(msg)
        finally:
            call.cancel()  # no-op after a normal end; stops the server's work if we left early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; cancelling the consuming task cancels the request on every tier."""

    def __init__(self, address: str = "127.0.0.1:50051") -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, **options), timeout=timeout)
        try:
            async for msg in call:
                yield chunk_from_proto(msg)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
