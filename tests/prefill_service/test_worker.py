"""PrefillWorker on a tiny in-code model with a fake KV sender: each prompt's transfer is opened
before compute and ended exactly once (finish, or abort on every other exit), layerwise pages
go out per layer minus the decode worker's cached blocks, after-prefill pages all at once."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from core.errors import InvalidRequestError
from core.sampling import FinishReason, SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from core.ticket import IncompatiblePeerError, TransferTicket
from engine.async_engine import AsyncEngine
from kvtransfer.config import Streaming, TransferConfig
from kvtransfer.sender import TransferSpec
from prefill_service.worker import PrefillConfig, PrefillResult, PrefillWorker
from tests.engine.tiny_engine import engine_config, greedy_reference, tiny_model

PROMPT = list(range(10, 31))  # 21 tokens: 6 blocks of 4


class FakeSender:
    """Records KVSender's public calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, ...]] = []
        self.pages: list[tuple[int, torch.Tensor]] = []

    def open(self, spec: TransferSpec) -> None:
        self.calls.append(("open", spec.transfer_id))

    def send_pages(self, transfer_id: bytes, layer_start: int, pages: torch.Tensor) -> None:
        self.pages.append((layer_start, pages))

    def finish(self, transfer_id: bytes, first_token_id: int) -> None:
        self.calls.append(("finish", transfer_id, first_token_id))

    def abort(self, transfer_id: bytes, reason: str) -> None:
        self.calls.append(("abort", transfer_id, reason))

    def pending(self) -> int:
        return 0

    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    return model, spec, greedy_reference(model, PROMPT, 4)


def _worker(tiny, streaming: Streaming) -> tuple[PrefillWorker, FakeSender]:
    model, spec, _ = tiny
    config = PrefillConfig(engine_config(spec), TransferConfig(insecure=True, streaming=streaming))
    worker = PrefillWorker(config, AsyncEngine(config.engine, model, spec))
    fake = FakeSender()
    worker.sender = worker.export.sender = fake  # type: ignore[assignment]
    return worker, fake


def _ticket(worker: PrefillWorker, cached: int = 0, blocks: int = 6) -> TransferTicket:
    return TransferTicket(
        transfer_id=os.urandom(16),
        kv_endpoint="tcp://127.0.0.1:5999",
        block_ids=tuple(range(100, 100 + blocks)),
        lease_s=30.0,
        fingerprint=worker.fingerprint,
        cached_blocks=cached,
    )


def _prefill(worker: PrefillWorker, ticket: TransferTicket, max_tokens: int = 4):
    async def go():
        worker.start()
        try:
            return await worker.prefill(
                "req", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0), ticket
            )
        finally:
            worker.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("cached", [0, 2])
def test_layerwise_prefill_streams_each_layer_and_finishes(tiny, cached: int) -> None:
    worker, fake = _worker(tiny, Streaming.LAYERWISE)
    ticket = _ticket(worker, cached=cached)
    result = _prefill(worker, ticket)
    assert result.first_token_id == tiny[2][0] and result.finish_reason is None
    assert fake.calls == [
        ("open", ticket.transfer_id),
        ("finish", ticket.transfer_id, result.first_token_id),
    ]
    assert [layer for layer, _ in fake.pages] == list(range(tiny[1].num_layers))
    assert all(pages.shape[:3] == (1, 2, 6 - cached) for _, pages in fake.pages)
    stats = worker.stats()
    assert stats.free_blocks == stats.total_blocks and worker.pending_transfers() == 0


def test_after_prefill_sends_every_layer_at_once(tiny) -> None:
    worker, fake = _worker(tiny, Streaming.AFTER_PREFILL)
    ticket = _ticket(worker, cached=1)
    result = _prefill(worker, ticket)
    assert result.first_token_id == tiny[2][0]
    ((layer, pages),) = fake.pages
    assert layer == 0 and pages.shape[:3] == (tiny[1].num_layers, 2, 5)
    assert fake.calls[-1] == ("finish", ticket.transfer_id, result.first_token_id)


def test_first_token_that_ends_the_request_aborts_the_transfer(tiny) -> None:
    worker, fake = _worker(tiny, Streaming.LAYERWISE)
    ticket = _ticket(worker)
    result = _prefill(worker, ticket, max_tokens=1)
    assert result.finish_reason is FinishReason.LENGTH
    assert fake.calls[-1] == ("abort", ticket.transfer_id, "request finished at its first token")
    assert [c[0] for c in fake.calls] == ["open", "abort"]


def test_a_ticket_for_another_prompt_is_refused_before_anything_is_sent(tiny) -> None:
    worker, fake = _worker(tiny, Streaming.LAYERWISE)
    with pytest.raises(IncompatiblePeerError, match="reserved 5 blocks"):
        _prefill(worker, _ticket(worker, blocks=5))
    assert fake.calls == [] and fake.pages == []


def test_cancelling_the_prefill_aborts_the_transfer_and_frees_the_blocks(tiny) -> None:
    worker, fake = _worker(tiny, Streaming.LAYERWISE)
    ticket = _ticket(worker)

    async def go():
        # not started: the engine never steps, so the prompt stays queued until cancelled
        loop_engine = worker.engine
        loop_engine._loop = asyncio.get_running_loop()  # what start() sets, without the thread
        task = asyncio.create_task(
            worker.prefill("req", PROMPT, SamplingParams(max_tokens=4, temperature=0), ticket)
        )
        await asyncio.sleep(0.05)
        assert worker.stats().waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert [c[0] for c in fake.calls] == ["open", "abort"]
    stats = worker.stats()
    assert stats.waiting == 0 and stats.free_blocks == stats.total_blocks


def test_the_prefix_cache_hit_is_reported_with_the_first_token(tiny) -> None:
    worker, _ = _worker(tiny, Streaming.LAYERWISE)

    async def go() -> list[int]:
        worker.start()
        try:
            sampling = SamplingParams(max_tokens=4, temperature=0)
            results = [await worker.prefill("r", PROMPT, sampling, _ticket(worker)) for _ in "ab"]
            return [r.cached_tokens for r in results]
        finally:
            worker.stop()

    assert asyncio.run(go()) == [0, 20]  # 5 full blocks of 4 the second time


def test_a_first_token_the_grammar_constrains_or_refuses(tiny) -> None:
    worker, fake = _worker(tiny, Streaming.LAYERWISE)
    ticket = _ticket(worker)
    digits = SamplingParams(max_tokens=4, structured=StructuredOutput(GrammarKind.REGEX, "7"))
    bad = SamplingParams(max_tokens=4, structured=StructuredOutput(GrammarKind.REGEX, "(7"))

    async def go() -> PrefillResult:
        worker.start()
        try:
            result = await worker.prefill("r", PROMPT, digits, ticket)
            with pytest.raises(InvalidRequestError, match="structured output failed"):
                await worker.prefill("r", PROMPT, bad, _ticket(worker))
            return result
        finally:
            worker.stop()

    result = asyncio.run(go())
    # "7" is the whole grammar: its one token completes it, so the request ends here
    assert result.finish_reason is FinishReason.STOP
    assert fake.calls[1] == ("abort", ticket.transfer_id, "request finished at its first token")
