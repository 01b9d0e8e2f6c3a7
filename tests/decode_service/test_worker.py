"""DecodeWorker on a tiny in-code model: reserve -> ticket -> pages -> READY continues
token-identically; FAILED ends the request with an error; release cancels the transfer before
the blocks are freed. Last, a real prefill worker pushes pages over the zmq backend."""

from __future__ import annotations

import asyncio

import pytest

from core.sampling import FinishReason, SamplingParams
from decode_service.worker import DecodeConfig, DecodeWorker, _host_of
from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.sequence import Sequence
from kvtransfer.config import TransferConfig
from prefill_service.worker import PrefillConfig, PrefillWorker
from tests.engine.tiny_engine import engine_config, greedy_reference, tiny_model

PROMPT = list(range(10, 31))  # 21 tokens: 6 blocks of 4
MAX_TOKENS = 6
SAMPLING = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    return model, spec, greedy_reference(model, PROMPT, MAX_TOKENS)


def _worker(tiny, **kwargs: object) -> DecodeWorker:
    model, spec, _ = tiny
    config = DecodeConfig(engine_config(spec), TransferConfig(insecure=True), **kwargs)  # type: ignore[arg-type]
    return DecodeWorker(config, AsyncEngine(config.engine, model, spec))


def _exported_pages(tiny):
    """The prompt's pages and first token, as a prefill engine computes them."""
    model, spec, _ = tiny
    engine = Engine(engine_config(spec), model, spec, sink=lambda outputs: None)
    engine.add(
        Sequence("p", list(PROMPT), len(PROMPT), SAMPLING, spec.eos_token_ids), export_kv=True
    )
    (out,) = engine.step()
    return out.pages, out.token_ids[0]


def test_imported_pages_continue_token_identically(tiny) -> None:
    pages, first = _exported_pages(tiny)
    worker = _worker(tiny)

    async def go() -> list[int]:
        worker.start()
        try:
            handle, ticket = worker.reserve("req", PROMPT, SAMPLING, lease_s=30.0)
            assert ticket.kv_endpoint == worker.kv_endpoint
            assert len(ticket.block_ids) == 6 and ticket.cached_blocks == 0
            assert worker.pending_transfers() == 1 and worker.stats().awaiting_kv == 1
            # what the receiver does: write the writable blocks, then report READY
            worker.engine.kv_store().scatter_pages(list(ticket.blocks_to_send), pages)
            worker.receiver.cancel(ticket.transfer_id)
            worker.imports.ready(handle.key, first)
            tokens = [first]
            async for out in handle.outputs():
                tokens.extend(out.token_ids)
            worker.release(handle)
            return tokens
        finally:
            worker.stop()

    assert asyncio.run(go()) == tiny[2]
    stats = worker.stats()
    assert stats.free_blocks == stats.total_blocks and stats.awaiting_kv == 0


def test_failed_import_ends_the_request_with_an_error(tiny) -> None:
    worker = _worker(tiny)

    async def go():
        worker.start()
        try:
            handle, _ = worker.reserve("req", PROMPT, SAMPLING, lease_s=30.0)
            worker.imports.failed(handle.key, "KV transfer failed: bad tag")
            out = await handle.next_output()
            worker.release(handle)
            return out
        finally:
            worker.stop()

    out = asyncio.run(go())
    assert out.finish_reason is FinishReason.ERROR and out.error == "KV transfer failed: bad tag"
    assert worker.pending_transfers() == 0  # release cancelled the expectation
    assert worker.stats().free_blocks == worker.stats().total_blocks


def test_release_before_any_page_cancels_the_transfer_and_frees(tiny) -> None:
    worker = _worker(tiny)

    async def go():
        worker.start()
        try:
            handle, _ = worker.reserve("req", PROMPT, SAMPLING, lease_s=30.0)
            assert worker.pending_transfers() == 1
            worker.release(handle)
            worker.release(handle)  # idempotent
        finally:
            worker.stop()

    asyncio.run(go())
    stats = worker.stats()
    assert worker.pending_transfers() == 0 and stats.awaiting_kv == 0
    assert stats.free_blocks == stats.total_blocks


def test_lease_is_capped_by_the_worker(tiny) -> None:
    worker = _worker(tiny, kv_lease_s=2.0)

    async def go():
        worker.start()
        try:
            handle, ticket = worker.reserve("req", PROMPT, SAMPLING, lease_s=99.0)
            worker.release(handle)
            return ticket
        finally:
            worker.stop()

    assert asyncio.run(go()).lease_s == 2.0


def test_local_generation_matches_transformers(tiny) -> None:
    worker = _worker(tiny)

    async def go() -> list[int]:
        worker.start()
        try:
            handle = worker.generate_local("req", PROMPT, SAMPLING)
            tokens = [t async for out in handle.outputs() for t in out.token_ids]
            worker.release(handle)
            return tokens
        finally:
            worker.stop()

    assert asyncio.run(go()) == tiny[2]


def test_host_of_endpoint() -> None:
    assert _host_of("tcp://10.0.0.5:7000") == "10.0.0.5"
    assert _host_of("tcp://0.0.0.0:7000") == "127.0.0.1"
    assert _host_of("tcp://[::1]:7000") == "::1"
    assert _host_of("ipc:///tmp/kv") == "127.0.0.1"


def test_prefill_worker_pushes_pages_to_decode_worker_over_zmq(tiny) -> None:
    """Both workers in one process, real sender and receiver: output is unchanged."""
    model, spec, expected = tiny
    decode = _worker(tiny)
    pconfig = PrefillConfig(engine_config(spec), TransferConfig(insecure=True))
    prefill = PrefillWorker(pconfig, AsyncEngine(pconfig.engine, model, spec))

    async def go() -> list[int]:
        decode.start()
        prefill.start()
        try:
            handle, ticket = decode.reserve("req", PROMPT, SAMPLING, lease_s=30.0)
            result = await prefill.prefill("req", PROMPT, SAMPLING, ticket)
            tokens = [result.first_token_id]
            async for out in handle.outputs():
                assert out.finish_reason is not FinishReason.ERROR, out.error
                tokens.extend(out.token_ids)
            decode.release(handle)
            return tokens
        finally:
            prefill.stop()
            decode.stop()

    assert asyncio.run(asyncio.wait_for(go(), 60)) == expected
    assert decode.stats().free_blocks == decode.stats().total_blocks
    assert prefill.stats().free_blocks == prefill.stats().total_blocks
