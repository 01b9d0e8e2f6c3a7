"""``hf-cb``: the requests through transformers' own continuous batching (paged KV cache).

This is the strongest pure-Python peer on CPU (REFERENCE.md section 5) and the one a user might
reach for first. It drives the manager behind ``model.generate_batch`` directly, so each
request can have its own output length (``generate_batch`` takes one ``max_new_tokens`` for
all) and arrive on the shared schedule. EOS is disabled (``eos_token_id=-1``) so output lengths
are exact; the manager's per-token timestamps (``record_timestamps``) give TTFT, ITL and E2E.
The manager is a young transformers API: failures surface as a ``RuntimeError`` naming it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from transformers import ContinuousBatchingConfig, GenerationConfig

from pdserve.bench.baselines import HfModel
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import RunTiming, progress_bar
from pdserve.bench.metrics import RequestOutcome

DESCRIPTION = "transformers continuous batching (generate_batch's manager, paged KV cache)"
POLL_S = 0.05
PAGE_SIZE = 256  # transformers' default page size (tokens per layer page)
WARMUP_ID = "bench-warmup"


def _cache_config(requests: Sequence[BenchRequest]) -> ContinuousBatchingConfig:
    """A pool that holds every request at once. Left to itself the manager sizes its cache from
    free memory, which on a CPU machine means gigabytes zeroed before the first token."""
    pages = sum(-(-(r.prompt_len + r.output_len) // PAGE_SIZE) for r in requests)
    return ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=pages + len(requests) + 8)


def _wait_for(manager: Any, request_id: str) -> None:
    while True:
        result = manager.get_result(timeout=POLL_S)
        if result is not None and result.request_id == request_id and result.is_finished():
            return
        if result is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching thread stopped")


def _outcome(request: BenchRequest, result: Any, sent: float, due_s: float) -> RequestOutcome:
    if result is None or getattr(result, "error", None) is not None:
        error = "missing result" if result is None else str(result.error)
        return RequestOutcome(False, request.prompt_len, start_s=due_s, error=error)
    stamps: list[float] = list(result.timestamps or [])
    if not stamps:
        return RequestOutcome(False, request.prompt_len, start_s=due_s, error="no timestamps")
    return RequestOutcome(
        success=True,
        prompt_len=request.prompt_len,
        output_tokens=len(result.generated_tokens),
        ttft_s=stamps[0] - sent,
        itl_s=tuple(b - a for a, b in itertools.pairwise(stamps)),
        latency_s=stamps[-1] - sent,
        start_s=due_s,
    )


def run_continuous(
    hf: HfModel,
    requests: Sequence[BenchRequest],
    due_s: Sequence[float],
    *,
    disable_progress: bool = False,
) -> RunTiming:
    """Submit each request when it is due; collect every result with its token timestamps."""
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.output_len for r in requests),
        eos_token_id=-1,
        pad_token_id=hf.pad_id,
    )
    model: Any = hf.model
    results: dict[str, Any] = {}
    bar = progress_bar(len(requests), "hf-cb", disable_progress)
    try:
        with model.continuous_batching_context_manager(
            generation_config=config,
            continuous_batching_config=_cache_config(requests),
            block=True,
            timeout=10,
        ) as manager:
            first = requests[0]
            manager.add_request(  # untimed: first-step allocations and kernel choices
                list(first.prompt_token_ids[::-1]), request_id=WARMUP_ID, max_new_tokens=4
            )
            _wait_for(manager, WARMUP_ID)
            start = time.perf_counter()
            submitted = 0
            while len(results) < len(requests):
                now = time.perf_counter() - start
                while submitted < len(requests) and due_s[submitted] <= now:
                    r = requests[submitted]
                    manager.add_request(
                        list(r.prompt_token_ids),
                        request_id=f"bench-{submitted}",
                        max_new_tokens=r.output_len,
                        record_timestamps=True,
                        eos_token_id=-1,
                    )
                    submitted += 1
                result = manager.get_result(timeout=POLL_S)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
                    bar.update(1)
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
            end = time.perf_counter()
    finally:
        bar.close()
    outcomes = [
        _outcome(r, results.get(f"bench-{k}"), start + at, at)
        for k, (r, at) in enumerate(zip(requests, due_s, strict=True))
    ]
    return RunTiming(outcomes, end - start)
