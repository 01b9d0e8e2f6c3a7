"""``pdserve bench --compare``: the same requests through several systems in one run, and ratios.

The systems (:class:`System`; ``--systems`` picks a subset) are transformers baselines in this
process, pdserve clusters and, when asked for, vLLM's CPU build as a peer
(:mod:`pdserve.bench.peer`), run one after the other. Invariants: systems never share the
machine (the baselines' model is released before any cluster starts, each cluster is stopped
before the next one starts, the peer likewise; a peer given by ``--peer-url`` is the user's to
keep idle while the others run), and every system sees the same requests on the same
schedule: the peer gets the same token ids over the OpenAI completions API, streamed and timed
as :mod:`pdserve.bench.openai_http` times pdserve's own HTTP API.
"""

from __future__ import annotations

import enum
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdserve.bench.baselines import Baseline, HfModel, run_baseline, warm_up
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.hf_continuous import DESCRIPTION as CB_DESCRIPTION
from pdserve.bench.hf_continuous import run_continuous
from pdserve.bench.load import LoadSpec, send_times
from pdserve.bench.metrics import compute_metrics
from pdserve.bench.openai_http import OpenAITarget, bench_openai
from pdserve.bench.peer import PeerConfig, running_peer
from pdserve.bench.report import RunResult
from pdserve.bench.runner import RunSettings, bench_gateway
from pdserve.local_cluster import start_cluster


class System(enum.Enum):
    """Everything ``--compare`` can run, in the default order (in-process ones always first):

    - ``hf-serial``: ``transformers`` ``generate`` one request at a time;
    - ``hf-static8``: ``transformers`` static batches of 8;
    - ``hf-cb``: transformers' own continuous batching, the strongest pure-Python peer;
    - ``pdserve-colocated``: a local cluster with ``--prefill 0 --decode 1``;
    - ``pdserve-disaggregated``: a local cluster with ``--prefill 1 --decode 1``;
    - ``vllm-cpu``: vLLM's CPU build over its OpenAI API (not run unless named).
    """

    HF_SERIAL = "hf-serial"
    HF_STATIC = "hf-static8"
    HF_CB = "hf-cb"
    COLOCATED = "pdserve-colocated"
    DISAGGREGATED = "pdserve-disaggregated"
    VLLM_CPU = "vllm-cpu"

    @property
    def baseline(self) -> Baseline | None:
        return {System.HF_SERIAL: Baseline.SERIAL, System.HF_STATIC: Baseline.STATIC}.get(self)

    @property
    def in_process(self) -> bool:
        """Runs in this process with ``transformers`` (a baseline), not on a cluster."""
        return self.baseline is not None or self is System.HF_CB

    @property
    def peer(self) -> bool:
        """Another serving system (:mod:`pdserve.bench.peer`), not transformers or pdserve."""
        return self is System.VLLM_CPU

    @property
    def prefill_workers(self) -> int:
        return 0 if self is System.COLOCATED else 1


DEFAULT_SYSTEMS = tuple(s for s in System if not s.peer)
"""The peer needs its own install (``vllm-cpu.sh install``), so it runs only when named."""


def parse_systems(text: str | None) -> tuple[System, ...]:
    """``--systems``: comma-separated names, in any order, each once; None or empty: the
    defaults."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        return DEFAULT_SYSTEMS
    known = {s.value: s for s in System}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"--systems: unknown {', '.join(unknown)} (choose from {', '.join(known)})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--systems names a system twice: {text}")
    return tuple(known[n] for n in names)


@dataclass(frozen=True)
class CompareConfig:
    """What the comparison runs on, and where the clusters write their logs."""

    model_path: Path
    log_dir: Path
    dtype: str = "float32"
    cache_dir: Path | None = None
    cluster_args: tuple[str, ...] = ()
    systems: tuple[System, ...] = DEFAULT_SYSTEMS
    peer: PeerConfig = field(default_factory=PeerConfig)
    """Where ``vllm-cpu`` comes from (:meth:`PeerConfig.resolve` checks it up front)."""


def cluster_threads(workers: int) -> int:
    """What ``pdserve up`` gives each worker: the machine's cores split between them (the
    in-process baselines use torch's default: all cores)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _baseline_runs(
    requests: Sequence[BenchRequest], load: LoadSpec, settings: RunSettings, cfg: CompareConfig
) -> list[RunResult]:
    wanted = [s for s in cfg.systems if s.in_process]
    if not wanted:
        return []
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    hf = HfModel.load(cfg.model_path, dtype[cfg.dtype])
    warm_up(hf, requests[0])
    due = send_times(len(requests), load)
    runs = []
    try:
        for system in wanted:
            baseline = system.baseline
            quiet = settings.disable_progress
            if baseline is None:
                timing = run_continuous(hf, requests, due, disable_progress=quiet)
                description = CB_DESCRIPTION
            else:
                timing = run_baseline(hf, baseline, requests, due, disable_progress=quiet)
                description = baseline.description
            metrics = compute_metrics(
                timing.outcomes, timing.duration_s, settings.slos_ms, settings.percentiles
            )
            runs.append(RunResult(system.value, description, load, metrics, timing.outcomes))
    finally:
        del hf
        gc.collect()
    return runs


def _served_run(
    system: System,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    cfg: CompareConfig,
) -> RunResult:
    prefill = system.prefill_workers
    threads = cluster_threads(prefill + 1)
    extra = ("--threads", str(threads), "--dtype", cfg.dtype, *cfg.cluster_args)
    cluster = start_cluster(
        str(cfg.model_path),
        prefill=prefill,
        decode=1,
        log_dir=cfg.log_dir,
        cache_dir=cfg.cache_dir,
        extra=extra,
    )
    try:
        description = f"pdserve up --prefill {prefill} --decode 1 --threads {threads} (per worker)"
        return bench_gateway(
            cluster.gateway, requests, load, settings, label=system.value, description=description
        )
    finally:
        cluster.stop()


def _peer_run(
    system: System,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    cfg: CompareConfig,
) -> RunResult:
    """The peer on the same token-id prompts over ``/v1/completions``, every chunk counting its
    tokens (vLLM's running usage), and a request failed unless it did exactly the asked work."""
    with running_peer(cfg.peer, cfg.model_path, cfg.log_dir, cfg.dtype) as peer:
        target = OpenAITarget(
            peer.base_url, model=peer.model, continuous_usage=True, exact_lengths=True
        )
        return bench_openai(
            target, requests, load, settings, label=system.value, description=peer.description
        )


def run_compare(
    requests: Sequence[BenchRequest], load: LoadSpec, settings: RunSettings, cfg: CompareConfig
) -> list[RunResult]:
    """Every system in ``cfg.systems`` on the same requests and arrival schedule, baselines
    first. The concurrency cap (``load.max_concurrency``) applies to the served systems only
    (the baselines never have more than one batch in flight anyway)."""
    runs = _baseline_runs(requests, load, settings, cfg)
    for system in cfg.systems:
        if system.peer:
            runs.append(_peer_run(system, requests, load, settings, cfg))
        elif not system.in_process:
            runs.append(_served_run(system, requests, load, settings, cfg))
    return runs


def throughput_ratios(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """Output tok/s of each pdserve run divided by each baseline's and the peer's (and
    disaggregated by colocated when both ran)."""
    by_label = {r.label: r.metrics.output_throughput for r in runs}
    bases = [s.value for s in System if (s.in_process or s.peer) and s.value in by_label]
    out: dict[str, dict[str, float]] = {}
    for system in (System.COLOCATED, System.DISAGGREGATED):
        if system.value not in by_label:
            continue
        against: dict[str, float] = {
            b: by_label[system.value] / by_label[b] for b in bases if by_label[b] > 0
        }
        if system is System.DISAGGREGATED and by_label.get(System.COLOCATED.value):
            against[System.COLOCATED.value] = (
                by_label[system.value] / by_label[System.COLOCATED.value]
            )
        if against:
            out[system.value] = against
    return out
