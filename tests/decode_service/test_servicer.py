"""DecodeServicer in LOCAL mode on a tiny in-code model, called directly: the first chunk
carries the prompt's prefix-cache hit, and a request whose grammar fails on the worker ends in
InvalidRequestError (INVALID_ARGUMENT, never retried elsewhere), not a worker failure."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from decode_service.servicer import DecodeServicer
from decode_service.worker import DecodeConfig, DecodeWorker
from engine.async_engine import AsyncEngine
from kvtransfer.config import TransferConfig
from protos.pdserve.v1 import worker_pb2
from server_runtime.proto_convert import sampling_to_proto
from tests.engine.tiny_engine import engine_config, tiny_model

PROMPT = list(range(10, 31))  # 21 tokens: 5 full blocks of 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_model(tmp_path_factory.mktemp("llama"))


def _request(rid: str, sampling: SamplingParams) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=rid,
        prompt_token_ids=PROMPT,
        sampling=sampling_to_proto(sampling),
        mode=worker_pb2.PREFILL_MODE_LOCAL,
    )


def _serve(tiny, requests: list[worker_pb2.DecodeRequest]) -> list[list[worker_pb2.TokenChunk]]:
    model, spec = tiny
    config = DecodeConfig(engine_config(spec), TransferConfig(insecure=True))
    worker = DecodeWorker(config, AsyncEngine(config.engine, model, spec))
    servicer = DecodeServicer(worker, "tiny")

    async def go() -> list[list[worker_pb2.TokenChunk]]:
        worker.start()
        try:
            replies = []
            for request in requests:  # one after another: the second may hit the first's blocks
                stream = servicer.Generate(request, None)  # type: ignore[arg-type]
                replies.append([reply.tokens async for reply in stream])
            return replies
        finally:
            worker.stop()

    return asyncio.run(go())


def test_first_chunk_reports_the_prefix_cache_hit(tiny) -> None:
    sampling = SamplingParams(max_tokens=3, temperature=0)
    miss, hit = _serve(tiny, [_request("a", sampling), _request("b", sampling)])
    assert [c.cached_tokens for c in miss] == [0] * len(miss)
    assert hit[0].cached_tokens == 20 and all(c.cached_tokens == 0 for c in hit[1:])
    assert [t for c in hit for t in c.token_ids] == [t for c in miss for t in c.token_ids]


def test_a_grammar_that_fails_on_the_worker_is_invalid_argument(tiny) -> None:
    bad = StructuredOutput(GrammarKind.REGEX, "(unclosed")
    with pytest.raises(InvalidRequestError, match="structured output failed"):
        _serve(tiny, [_request("a", SamplingParams(max_tokens=3, structured=bad))])
