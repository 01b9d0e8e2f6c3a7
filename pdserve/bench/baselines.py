"""The same requests through plain ``transformers`` in this process: the peers pdserve must beat.

``hf-serial`` runs ``model.generate`` one request at a time, in arrival order; ``hf-static8``
static batches of 8 consecutive requests, left-padded (:class:`Baseline`). Both are greedy,
generate exactly each request's output length, and are timed on the served runs' arrival
schedule, so TTFT, ITL and E2E compare with them (:func:`run_baseline`).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import RunTiming, progress_bar
from pdserve.bench.metrics import RequestOutcome

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATIC_BATCH_SIZE = 8


class Baseline(enum.Enum):
    """A way of running the requests with ``transformers`` alone."""

    SERIAL = "hf-serial"
    STATIC = "hf-static8"

    @property
    def batch_size(self) -> int:
        return 1 if self is Baseline.SERIAL else STATIC_BATCH_SIZE

    @property
    def description(self) -> str:
        if self is Baseline.SERIAL:
            return "transformers generate, one request at a time"
        return f"transformers generate, static batches of {STATIC_BATCH_SIZE} (left-padded)"


class _StepClock(BaseStreamer):
    """Records the time each decoding step's tokens reach the streamer (the prompt, which
    ``generate`` passes first, is skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class HfModel:
    """A loaded model and the pad id used for left padding."""

    model: PreTrainedModel
    pad_id: int

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32) -> HfModel:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        cfg = model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        return cls(model, int(pad) if pad is not None else 0)

    def generate_timed(self, batch: Sequence[BenchRequest]) -> list[float]:
        """Run one left-padded batch greedily for its longest output; the time of every step.

        ``min_new_tokens`` = ``max_new_tokens`` is ``generate``'s ``ignore_eos``."""
        width = max(r.prompt_len for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, r in enumerate(batch):
            ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - r.prompt_len :] = 1
        steps = max(r.output_len for r in batch)
        config = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )
        clock = _StepClock()
        generate: Any = self.model.generate  # nn.Module attribute typing hides the method
        with torch.inference_mode():
            generate(input_ids=ids, attention_mask=mask, generation_config=config, streamer=clock)
        if len(clock.times) < steps:
            raise RuntimeError(f"generate ran {len(clock.times)} steps, expected {steps}")
        return clock.times


def _outcome(
    request: BenchRequest, step_times: Sequence[float], origin: float, due_s: float
) -> RequestOutcome:
    """``request`` sent at ``origin + due_s``, its tokens produced at the first steps."""
    sent = origin + due_s
    mine = step_times[: request.output_len]
    return RequestOutcome(
        success=True,
        prompt_len=request.prompt_len,
        output_tokens=request.output_len,
        ttft_s=mine[0] - sent,
        itl_s=tuple(b - a for a, b in itertools.pairwise(mine)),
        latency_s=mine[-1] - sent,
        start_s=due_s,
    )


def run_baseline(
    hf: HfModel,
    baseline: Baseline,
    requests: Sequence[BenchRequest],
    due_s: Sequence[float],
    *,
    disable_progress: bool = False,
) -> RunTiming:
    """Run ``requests`` (due at ``due_s`` seconds after the start) the ``baseline`` way.

    A request is "sent" when its arrival time comes; it waits while earlier work runs (a batch
    starts once its last request is due), and its tokens count when their decoding step
    completes (:class:`_StepClock`). A static batch generates until its longest request is done;
    tokens a request generates past its own length are waste and are not counted.
    """
    size = baseline.batch_size
    outcomes: list[RequestOutcome] = []
    bar = progress_bar(len(requests), baseline.value, disable_progress)
    start = time.perf_counter()
    try:
        for first in range(0, len(requests), size):
            batch = requests[first : first + size]
            due = due_s[first : first + size]
            wait = start + max(due) - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            times = hf.generate_timed(batch)
            outcomes += [_outcome(r, times, start, at) for r, at in zip(batch, due, strict=True)]
            bar.update(len(batch))
        end = time.perf_counter()
    finally:
        bar.close()
    return RunTiming(outcomes, end - start)


def warm_up(hf: HfModel, request: BenchRequest) -> None:
    """One short untimed generation (first-call allocations and kernel selection)."""
    short = BenchRequest(request.prompt_token_ids[:16], min(4, request.output_len))
    hf.generate_timed([short])
