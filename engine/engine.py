"""The engine: one step is schedule -> run -> update, looped on a dedicated thread.

Threads: the step loop runs on its own thread so torch work never blocks the gRPC event loop.
Every other thread (gRPC handlers, the KV receiver) talks to the engine through the public
methods below, which take ``self._lock``; the forward pass runs *outside* the lock, and touches
only blocks of sequences in the batch, which nobody else may free until ``update`` has run (aborts
of in-flight sequences are deferred to then).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from core.errors import EngineStoppedError, OutOfBlocksError
from core.pool_stats import PoolStats
from core.sampling import FinishReason, RequestTimings
from engine.attention import register_paged_attention
from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.kv_memory import blocks_for_memory
from engine.model_loader import ModelSpec
from engine.model_runner import ModelRunner
from engine.native import load_attention_kernel, load_layer_ops, load_linear_kernel
from engine.sampler import Sampler
from engine.scheduler import Finished, ScheduledBatch, Scheduler
from engine.sequence import Sequence

log = structlog.get_logger(__name__)

_IDLE_WAIT_S = 0.5


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request. ``pages`` is set for KV-exporting sequences."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int
    pages: torch.Tensor | None = None  # (L, 2, n, bs, KVH, D) copy of the prompt's blocks,
    # for exporting sequences when the engine has no layer sink
    error: str | None = None
    timings: RequestTimings | None = None  # on the last output of a request


OutputSink = Callable[[list[RequestOutput]], None]
LayerSink = Callable[[str, int, torch.Tensor], None]
"""``(request key, layer, pages (1, 2, n, bs, KVH, D))``: one layer of an exporting prompt's KV,
called on the engine thread while the forward pass continues with the next layer."""


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
        self._layer_sink = layer_sink
        weights = next(model.parameters())  # the KV cache matches the weights' device and dtype
        model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
        num_blocks = blocks_for_memory(
            config.cache,
            spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * weights.element_size(),
            weights.device,
        )
        self.kv_cache = KVCache(
            num_layers=spec.num_layers,
            num_blocks=num_blocks,
            block_size=config.cache.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=weights.dtype,
            device=weights.device,
        )
        self.pool = BlockPool(num_blocks)
        log.info(
            "kv_pool_sized",
            blocks=num_blocks,
            block_size=config.cache.block_size,
            bytes=num_blocks * self.kv_cache.bytes_per_block,
        )
        self.scheduler = Scheduler(config.scheduler, self.pool, config.cache.block_size)
        kernel = load_attention_kernel(config, weights.dtype, weights.device)
        linear = load_linear_kernel(config, weights.dtype, weights.device)
        ops = load_layer_ops(config, weights.dtype, weights.device)
        self.runner = ModelRunner(model, self.kv_cache, Sampler(), kernel, linear, ops)
        self.runner.install_layer_hooks()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending_aborts: dict[str, tuple[FinishReason, str | None]] = {}
        self._in_flight: ScheduledBatch | None = None
        self._idle_step = False  # the last step found work it could not schedule
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._export_kv: set[str] = set()

    # -- requests (any thread) --------------------------------------------------------------

    def add(self, seq: Sequence, *, export_kv: bool = False) -> None:
        """Queue a sequence to compute here. With ``export_kv`` it stops after its first token
        and its output carries a copy of the prompt's KV pages."""
        with self._lock:
            self._check_running()
            self._check_fits(seq, export_kv)
            seq.arrival_time = time.monotonic()
            if export_kv:
                self._export_kv.add(seq.request_id)
            self.scheduler.add(seq)
            self._wakeup.notify()

    def reserve(self, seq: Sequence) -> list[int]:
        """Reserve blocks for a prompt another worker computes; see :meth:`Scheduler.reserve`."""
        with self._lock:
            self._check_running()
            self._check_fits(seq, export_kv=False)
            seq.arrival_time = time.monotonic()
            return self.scheduler.reserve(seq)

    def kv_ready(self, request_id: str, first_token_id: int) -> None:
        """All pages of a reserved prompt arrived: the sequence joins the running batch."""
        with self._lock:
            if request_id not in self.scheduler.awaiting_kv:
                return  # aborted meanwhile
            finished = self.scheduler.kv_ready(request_id, first_token_id)
            self._wakeup.notify()
        if finished is not None:
            self._emit([self._output(finished.seq, (), finished.reason)])

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
            self._export_kv.discard(request_id)
        if seq is not None and reason is not FinishReason.CANCELLED:
            self._emit([self._output(seq, (), reason, error=error)])

    def set_layer_sink(self, sink: LayerSink | None) -> None:
        """Stream exporting prompts' KV layer by layer into ``sink`` (set before :meth:`start`)."""
        self._layer_sink = sink

    def stats(self) -> PoolStats:
        with self._lock:
            try:
                self.pool.check_integrity()
                ok = True
            except Exception:
                ok = False
            return PoolStats(
                total_blocks=self.pool.num_blocks,
                free_blocks=self.pool.num_free,
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                awaiting_kv=len(self.scheduler.awaiting_kv),
                pool_ok=ok,
                num_preemptions=self.scheduler.num_preemptions,
                prefix_query_tokens=self.scheduler.prefix_query_tokens,
                prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
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
            batch = self.scheduler.schedule()
            self._in_flight = batch
            self._idle_step = batch is None
        if batch is None:
            return []
        self.runner.layer_listener = self._layer_listener(batch)
        try:
            sampled = self.runner.execute(batch)
        except Exception as exc:  # fail the batch's requests, keep serving
            log.exception("engine_step_failed", batch_size=len(batch.items))
            return self._fail_batch(batch, f"engine step failed: {exc}")
        finally:
            self.runner.layer_listener = None
        with self._lock:
            self._in_flight = None
            finished = self.scheduler.update(batch, sampled)
            outputs = self._collect(batch, sampled, finished)
            outputs.extend(self._apply_pending_aborts())
        return outputs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        # per thread in OpenMP: the forward pass is this thread's team (the worker's other
        # threads keep one thread each, see server_runtime.worker_runtime)
        torch.set_num_threads(self.config.num_threads or len(os.sched_getaffinity(0)))
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.has_work():
                    self._wakeup.wait(_IDLE_WAIT_S)
                if self._stopping:
                    return
            outputs = self.step()
            if outputs:
                self._emit(outputs)
            elif self._in_flight is None and self._idle_step:
                with self._lock:  # work exists but cannot be scheduled yet: do not spin
                    self._wakeup.wait(0.01)

    # -- helpers (lock held unless noted) ---------------------------------------------------

    def _layer_listener(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """Streams each layer of the prompts whose prefill completes in this step."""
        sink = self._layer_sink
        if sink is None:
            return None
        exporting = [
            (item.seq.request_id, self._prompt_blocks(item.seq))
            for item in batch.items
            if item.sample and item.seq.request_id in self._export_kv
        ]
        if not exporting:
            return None

        def on_layer(layer: int) -> None:
            for key, blocks in exporting:
                pages = self.kv_cache.gather_pages(blocks, slice(layer, layer + 1))
                try:
                    sink(key, layer, pages)
                except Exception:  # the sink's failure is that one transfer's alone
                    log.exception("kv_layer_export_failed", layer=layer)

        return on_layer

    def _prompt_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_table[: self.scheduler.blocks_for(seq.num_prompt_tokens)]

    def _collect(
        self, batch: ScheduledBatch, sampled: list[int], finished: list[Finished]
    ) -> list[RequestOutput]:
        reasons = {f.seq.request_id: f.reason for f in finished}
        outputs: list[RequestOutput] = []
        for item, token in zip(batch.items, sampled, strict=True):
            seq = item.seq
            if not item.sample or seq.is_finished:
                continue
            rid = seq.request_id
            reason = reasons.get(rid)
            if rid in self._export_kv:
                self._export_kv.discard(rid)
                streamed = self._layer_sink is not None
                pages = None if streamed else self.kv_cache.gather_pages(self._prompt_blocks(seq))
                outputs.append(self._output(seq, (token,), reason, pages, last=True))
                self._finish_exported(seq, reason)
                continue
            outputs.append(self._output(seq, (token,), reason))
            if reason is not None:
                self.scheduler.release(seq, reason)
        return outputs

    def _finish_exported(self, seq: Sequence, reason: FinishReason | None) -> None:
        """An exporting sequence's work here ends with its first token, whatever comes next."""
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        self.scheduler.release(seq, reason or FinishReason.STOP)

    def _apply_pending_aborts(self) -> list[RequestOutput]:
        outputs = []
        for rid, (reason, error) in self._pending_aborts.items():
            seq = self.scheduler.abort(rid, reason)
            self._export_kv.discard(rid)
            if seq is not None and reason is not FinishReason.CANCELLED:
                outputs.append(self._output(seq, (), reason, error=error))
        self._pending_aborts.clear()
        return outputs

    def _fail_batch(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        outputs = []
        with self._lock:
            self._in_flight = None
            for item in batch.items:
                seq = self.scheduler.abort(item.seq.request_id, FinishReason.ERROR)
                self._export_kv.discard(item.seq.request_id)
                if seq is not None:
                    outputs.append(self._output(seq, (), FinishReason.ERROR, error=message))
            self._pending_aborts.clear()
        return outputs

    def _output(
        self,
        seq: Sequence,
        tokens: tuple[int, ...],
        reason: FinishReason | None,
        pages: torch.Tensor | None = None,
        error: str | None = None,
        last: bool = False,
    ) -> RequestOutput:
        """``last``: the request's final output here even without a finish reason (export)."""
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_completion_tokens=seq.num_completion_tokens,
            pages=pages,
            error=error,
            timings=seq.timings(time.monotonic()) if last or reason is not None else None,
        )

    def _emit(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to the owner (called without the lock)."""
        try:
            self._sink(outputs)
        except Exception:
            log.exception("engine_sink_failed")

    def _check_fits(self, seq: Sequence, export_kv: bool) -> None:
        """Refuse a sequence that could never fit the pool, even alone (it would wait forever)."""
        remaining = 0 if export_kv else seq.sampling.max_tokens - seq.num_completion_tokens
        needed = self.scheduler.blocks_for(seq.num_tokens + remaining)
        if needed > self.pool.num_blocks:
            raise OutOfBlocksError(
                f"request needs {needed} KV blocks of {self.kv_cache.block_size} tokens; "
                f"this worker's pool has {self.pool.num_blocks}"
            )

    def _check_running(self) -> None:
        if self._stopping:
            raise EngineStoppedError("engine is shutting down")
