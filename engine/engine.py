"""The engine: one step is schedule -> run -> update, looped on a dedicated thread.

Threads: the step loop runs on its own thread so torch work never blocks the gRPC event loop.
Every other thread (gRPC handlers, the KV receiver) talks to the engine through the public
methods below, which take ``self._lock``; the forward pass runs *outside* the lock, and touches
only blocks of sequences in the batch, which nobody else may free until ``update`` has run (aborts
of in-flight sequences are deferred to then). KV export and import go through the connectors of
``engine.kv_connector``: finished imports are taken before ``schedule``, layers saved during run.
Structured output: a constrained sequence gets its grammar state on arrival (``add``,
``reserve_import``); the runner masks its rows (see :mod:`engine.structured`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import structlog
import torch

from core.errors import EngineStoppedError
from core.pool_stats import PoolStats
from core.sampling import FinishReason, TokenLogprob
from engine.attention import register_paged_attention
from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.draft_model import build_draft_proposer, load_draft_model
from engine.engine_thread import StepMonitor
from engine.kv_cache import KVCache
from engine.kv_connector import (
    ExportConnector,
    ExportMode,
    ImportConnector,
    ImportResult,
    ImportStatus,
    LayerSink,
    LayerSinkExport,
    Reservation,
    layer_saver,
)
from engine.kv_memory import plan_kv_pool
from engine.model_files import ModelSpec
from engine.runner_setup import build_runner
from engine.scheduler import Finished, ScheduledBatch, Scheduler
from engine.sequence import RequestOutput, Sequence, output_for
from engine.speculative import Speculator
from engine.structured import GrammarManager

__all__ = ["Engine", "LayerSink", "OutputSink", "RequestOutput"]

log = structlog.get_logger(__name__)

_IDLE_WAIT_S = 0.5

OutputSink = Callable[[list[RequestOutput]], None]


class Engine:
    """Owns the KV cache, block pool, scheduler and model runner of one worker."""

    def __init__(
        self,
        config: EngineConfig,
        model: torch.nn.Module,
        spec: ModelSpec,
        sink: OutputSink,
        layer_sink: LayerSink | None = None,
    ) -> None:
        """With ``layer_sink``, exporting sequences stream their prompt's KV layer by layer as
        each layer finishes; without, their output carries all pages at the end."""
        self.config = config
        self.spec = spec
        self._sink = sink
        self._exporter: ExportConnector | None = None
        self._importer: ImportConnector | None = None
        weights = next(model.parameters())  # the KV cache matches the weights' device and dtype
        model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
        draft = load_draft_model(config, spec)  # None unless --speculative draft
        specs = [spec] if draft is None else [spec, draft[1]]  # (a block holds both's KV)
        per_token = sum(KVCache.token_bytes(s, weights.dtype) for s in specs)
        plan = plan_kv_pool(config, model, spec, per_token, weights)  # logs kv_pool_sized
        self.config = config = replace(config, cache=plan.cache)  # block size, blocks resolved
        num_blocks = plan.cache.num_blocks
        self.kv_cache = KVCache.for_model(spec, plan.kv_blocks, plan.cache.block_size, weights)
        self.pool = BlockPool(num_blocks)
        self.grammars = GrammarManager.for_model(spec.path, spec.vocab_size, spec.eos_token_ids)
        proposer = draft and build_draft_proposer(config, *draft, num_blocks, self.grammars)
        speculator = Speculator(config.speculative, proposer)
        self.scheduler = Scheduler(config.scheduler, self.pool, config.cache.block_size, speculator)
        self.runner = build_runner(config, model, self.kv_cache, self.grammars)
        self.spec = replace(spec, weights=self.runner.weights.label)
        self.runner.install_layer_hooks()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending_aborts: dict[str, tuple[FinishReason, str | None]] = {}
        self._in_flight: ScheduledBatch | None = None
        self._idle_step = False  # the last step found work it could not schedule
        self._stopping = False
        self._parking = False  # draining: park decoding sequences (see :meth:`park_all`)
        self.monitor = StepMonitor(lambda: self._in_flight, self.scheduler.has_work)
        self.set_layer_sink(layer_sink)

    # -- requests (any thread) --------------------------------------------------------------

    def add(self, seq: Sequence, *, export_kv: bool = False) -> None:
        """Queue a sequence to compute here. With ``export_kv`` it stops after its first token
        and its output carries a copy of the prompt's KV pages."""
        with self._lock:
            self._intake(seq, export_kv)
            self.scheduler.add(seq)
            self._wakeup.notify()

    def reserve_import(self, seq: Sequence) -> Reservation:
        """Reserve blocks for a prompt whose pages an importer writes (only ``writable`` ones);
        its end comes through the import connector (or :meth:`kv_ready`). Raises
        OutOfBlocksError."""
        with self._lock:
            self._intake(seq, export_kv=False)
            block_ids = self.scheduler.reserve(seq)
            cached = seq.num_cached_tokens // self.kv_cache.block_size
            return Reservation(seq.request_id, tuple(block_ids), cached)

    def kv_ready(self, request_id: str, first_token_id: int) -> None:
        """All pages of a reserved prompt arrived: the sequence joins the running batch (the
        direct form of an import connector's READY result)."""
        result = ImportResult(request_id, ImportStatus.READY, first_token_id)
        with self._lock:
            outputs = self._finish_import(result)
            self._wakeup.notify()
        if outputs:
            self._emit(outputs)

    def set_export_connector(self, connector: ExportConnector | None) -> None:
        """Where exporting prompts' pages go (set before :meth:`start`); None: AFTER_PREFILL."""
        self._exporter = connector

    def set_import_connector(self, connector: ImportConnector | None) -> None:
        """Where finished imports are taken from before each schedule (set before :meth:`start`)."""
        self._importer = connector
        if connector is not None:
            connector.bind(self._notify)

    def abort(
        self,
        request_id: str,
        reason: FinishReason = FinishReason.CANCELLED,
        error: str | None = None,
    ) -> None:
        """Stop a request wherever it is and free its blocks (deferred while its step runs).

        Unless the reason is CANCELLED (the owner went away), an output with the reason and
        ``error`` is emitted so the owner learns why."""
        with self._lock:
            if self._in_flight is not None and any(
                item.seq.request_id == request_id for item in self._in_flight.items
            ):
                self._pending_aborts[request_id] = (reason, error)
                return
            seq = self.scheduler.abort(request_id, reason)
        if seq is not None and reason is not FinishReason.CANCELLED:
            self._emit([output_for(seq, (), reason, error=error)])

    # -- migration (a draining worker's sequences leave with their KV) ----------------------

    def park_all(self) -> None:
        """From the next step on, decoding sequences stop (an output with ``parked`` says so)
        and wait, blocks kept, for :meth:`parked_pages` and :meth:`abort`; prompts once out."""
        self._parking = True  # never blocks (a watchdog's drain may call it on a stuck step)
        if self._lock.acquire(blocking=False):
            self._wakeup.notify()
            self._lock.release()

    def parked_pages(self, request_id: str, skip: int = 0) -> tuple[torch.Tensor, int, int]:
        """A parked sequence's KV for a target that reserved its tokens but the last: a copy
        of the pages of every position computed past its first ``skip`` blocks (the target's
        cached prefix), ``(L, 2, n, bs, KVH, D)``, its last token (the target's first, already
        emitted) and the positions computed. KeyError when the sequence is not parked here."""
        with self._lock:
            seq = self.scheduler.parking.parked[request_id]
            computed = seq.num_computed_tokens
            blocks = seq.block_table[skip : self.scheduler.blocks_for(computed)]
            return self.kv_cache.gather_pages(blocks), seq.last_token_id, computed

    def unpark(self, request_id: str) -> bool:
        """A parked sequence decodes here after all; False when it is not parked."""
        with self._lock:
            ok = self.scheduler.unpark(request_id)
            self._wakeup.notify()
            return ok

    def set_layer_sink(self, sink: LayerSink | None) -> None:
        """Stream exporting prompts' KV layer by layer into ``sink`` (set before :meth:`start`)."""
        self.set_export_connector(LayerSinkExport(sink) if sink is not None else None)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                total_blocks=self.pool.num_blocks,
                free_blocks=self.pool.num_free,
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                awaiting_kv=len(self.scheduler.awaiting_kv),
                pool_ok=self.pool.intact(),
                num_preemptions=self.scheduler.num_preemptions,
                prefix_query_tokens=self.scheduler.prefix_query_tokens,
                prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
                spec=self.scheduler.speculator.counters.snapshot(),
            )

    def held_prefix_blocks(self, chains: list[list[bytes]]) -> list[int]:
        """For each chain of prefix hashes, how many leading blocks the prefix cache holds
        (read-only; feeds the worker's prefix-cache summary, see core.prefix_summary)."""
        with self._lock:
            return [self.pool.held_prefix(chain) for chain in chains]

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> run -> update. Returns what it produced."""
        with self._lock:
            imported = self._take_imports()
            if self._parking:  # draining: decoding sequences stop here, to be migrated
                parked = self.scheduler.park_decoding()
                imported += [output_for(s, (), None, parked=True) for s in parked]
            batch = self.scheduler.schedule()
            self._in_flight = batch
            self._idle_step = batch is None
        if batch is None:
            return imported
        self.runner.layer_listener = self.monitor.listening(self._layer_listener(batch))
        try:
            batch = self.scheduler.speculator.fill(batch)  # drafts (may run the draft model)
            sampled, logprobs = self.runner.execute_step(batch)
        except Exception as exc:  # fail the batch's requests, keep serving
            log.exception("engine_step_failed", batch_size=len(batch.items))
            return self._fail_batch(batch, f"engine step failed: {exc}")
        finally:
            self.runner.layer_listener = None
        with self._lock:
            self._in_flight = None
            before = [item.seq.num_tokens for item in batch.items]
            finished = self.scheduler.update(batch, sampled)
            outputs = self._collect(batch, before, finished, logprobs)
            outputs.extend(self._apply_pending_aborts())
        return imported + outputs

    def start(self) -> None:
        """Start the step loop on its named, watched thread (:mod:`engine.engine_thread`); the
        grammar tokenizer builds meanwhile, so the first constrained request does not wait."""
        self.grammars.prefetch()
        self.monitor.start_thread(self._loop)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        if self.monitor.thread is not None:
            self.monitor.thread.join(timeout=10)

    def _loop(self) -> None:
        # per thread in OpenMP: the forward pass is this thread's team (the worker's other
        # threads keep one thread each, see server_runtime.worker_runtime)
        torch.set_num_threads(self.config.num_threads or len(os.sched_getaffinity(0)))
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._wakeup.wait(_IDLE_WAIT_S)
                if self._stopping:
                    return
            with self.monitor.step():
                outputs = self.step()
            if outputs:
                self._emit(outputs)
            elif self._in_flight is None and self._idle_step:
                with self._lock:  # work exists but cannot be scheduled yet: do not spin
                    self._wakeup.wait(0.01)

    # -- helpers (lock held unless noted) ---------------------------------------------------

    def _notify(self) -> None:
        """Wake the loop (any thread, without the lock): an import finished."""
        with self._lock:
            self._wakeup.notify()

    def _has_work(self) -> bool:
        importer = self._importer
        return self.scheduler.has_work() or (importer is not None and importer.has_finished())

    def _take_imports(self) -> list[RequestOutput]:
        """Connector point before schedule: admit the imports that are READY, free the FAILED."""
        if self._importer is None:
            return []
        outputs: list[RequestOutput] = []
        for result in self._importer.take_finished():
            outputs.extend(self._finish_import(result))
        return outputs

    def _finish_import(self, result: ImportResult) -> list[RequestOutput]:
        rid = result.request_id
        if result.status is ImportStatus.FAILED:
            seq = self.scheduler.abort(rid, FinishReason.ERROR)
            return (
                [] if seq is None else [output_for(seq, (), FinishReason.ERROR, error=result.error)]
            )
        if not self.scheduler.is_awaiting_kv(rid):
            return []  # aborted meanwhile
        finished = self.scheduler.kv_ready(rid, result.first_token_id)
        return [] if finished is None else [output_for(finished.seq, (), finished.reason)]

    def _exports_layerwise(self) -> bool:
        return self._exporter is not None and self._exporter.mode is ExportMode.LAYERWISE

    def _layer_listener(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """Connector point during run: saves each layer of the exporting prompts whose prefill
        completes in this step."""
        exporter = self._exporter
        if exporter is None or exporter.mode is not ExportMode.LAYERWISE:
            return None
        exporting = [
            (item.seq.request_id, self._prompt_blocks(item.seq))
            for item in batch.items
            if item.sample and item.seq.export_kv
        ]
        if not exporting:
            return None

        return layer_saver(exporter, self.kv_cache, exporting)

    def _prompt_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: self.scheduler.blocks_for(seq.num_prompt_tokens)]

    def _collect(
        self,
        batch: ScheduledBatch,
        before: list[int],
        finished: list[Finished],
        logprobs: list[tuple[TokenLogprob, ...]],
    ) -> list[RequestOutput]:
        """The step's outputs: each sampled item's tokens appended by ``update`` (``before``:
        each item's token count before it), with their logprobs."""
        reasons = {f.seq.request_id: f.reason for f in finished}
        outputs: list[RequestOutput] = []
        for item, start, lp in zip(batch.items, before, logprobs, strict=True):
            seq = item.seq
            if not item.sample or seq.is_finished:
                continue
            reason = reasons.get(seq.request_id)
            tokens = tuple(seq.token_ids[start:])  # a failed sampling appended nothing
            if reason is FinishReason.ERROR and seq.grammar is not None:
                tokens = ()  # its grammar rejected the token appended last (one per step)
            lps = lp[: len(tokens)]
            if seq.export_kv:  # its work here ends with its first token, whatever comes next
                streamed = self._exports_layerwise()
                pages = None if streamed else self.kv_cache.gather_pages(self._prompt_blocks(seq))
                outputs.append(output_for(seq, tokens, reason, pages, last=True, logprobs=lps))
                self.scheduler.retire(seq, reason or FinishReason.STOP)
                continue
            outputs.append(output_for(seq, tokens, reason, logprobs=lps))
            if reason is not None:
                self.scheduler.release(seq, reason)
        return outputs

    def _apply_pending_aborts(self) -> list[RequestOutput]:
        outputs = []
        for rid, (reason, error) in self._pending_aborts.items():
            seq = self.scheduler.abort(rid, reason)
            if seq is not None and reason is not FinishReason.CANCELLED:
                outputs.append(output_for(seq, (), reason, error=error))
        self._pending_aborts.clear()
        return outputs

    def _fail_batch(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            self._in_flight = None
            for item in batch.items:
                seq = self.scheduler.abort(item.seq.request_id, FinishReason.ERROR)
                if seq is not None:
                    outputs.append(output_for(seq, (), FinishReason.ERROR, error=message))
            self._pending_aborts.clear()
        return outputs

    def _emit(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to the owner (called without the lock)."""
        try:
            self._sink(outputs)
        except Exception:
            log.exception("engine_sink_failed")

    def _intake(self, seq: Sequence, export_kv: bool) -> None:
        """Checks and marks of a sequence arriving (lock held)."""
        if self._stopping:
            raise EngineStoppedError("engine is shutting down")
        self.scheduler.check_fits(seq, export_kv)
        seq.arrival_time = time.monotonic()
        seq.export_kv = export_kv
        self.grammars.attach(seq)
