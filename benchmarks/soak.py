"""Soak: mixed load with cancels and deadlines for a long while; memory and pools sampled.

    .venv/bin/python benchmarks/soak.py --minutes 30 --json soak.json
        [--prefill 1 --decode 1] [--model PATH] [--clients 4] [--sample-s 10]
        [--max-drift-mb-per-hour 64] [--min-drift-mb 16] [--seed 0]

Starts a real cluster (``pdserve up`` on loopback with its HTTP API; ``--prefill 0``: colocated)
and runs ``--clients`` closed-loop clients for ``--minutes``, each drawing its next request from
:data:`MIX`: gRPC greedy and sampled streams read to the end, gRPC streams left after a few
tokens or cancelled before the first, gRPC calls whose 50-500 ms deadline expires, OpenAI HTTP
completions and chat completions read to the end, and HTTP streams dropped mid-way. Prompts are
8-512 random tokens, ``max_tokens`` 1-128, always ``ignore_eos``: a stream read to the end
carries exactly ``max_tokens`` tokens.

Every ``--sample-s`` a thread records the RSS (``VmRSS``), threads and open fds of the launcher,
the gateway and every worker (pids from the launcher's state file) and each worker's pool
(``GetStatus``). Per process the report gives the RSS at the end of the warm-up (the first
sample after ``--warmup-fraction`` of the run, once allocator arenas and caches settled; the KV
pool is zero-filled at start, so resident from the first sample), at the end (load stopped,
pools idle), the drift in MB and its least-squares slope in MB/hour over the post-warm-up
samples; and the requests by kind and outcome: completed, cancelled (by the client), expired
(its deadline) or failed with a status.

Findings (exit 1): a request that failed other than by its own cancel or deadline (any status,
RESOURCE_EXHAUSTED included: the clients stay far below the gateway's limits); a stream read to
the end with other than ``max_tokens`` tokens; a pool not idle at the end (leaked blocks, work
running, waiting or pending) or failing its integrity check in any sample; a child restarted;
a process whose RSS grew by more than ``--min-drift-mb`` AND faster than
``--max-drift-mb-per-hour``. Both, because a slope alone turns one allocator step of a few MB
into hundreds of MB/hour on a 3-minute run, and an absolute bound alone ignores the run's
length. At the ~1 request/s this mix runs on two shared cores, 64 MB/hour is a leak of ~20 KB
per request (the report also gives each slope as KB per request), while a settled CPython
process moves by a few MB; 27 minutes after the warm-up at 64 MB/hour is 29 MB, above the
16 MB floor, so on the default run the slope decides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import grpc
import httpx2 as httpx
import numpy as np

from engine.config import DEFAULT_MODEL, ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.bench.datasets import BenchRequest, LengthRange, random_requests, usable_token_ids
from pdserve.bench.openai_http import OpenAITarget, make_client, payload, send_openai
from pdserve.bench.runner import ClientOptions
from pdserve.bench.sse import SseParser
from pdserve.client import NO_RETRY, AsyncClient, Chunk
from pdserve.local_cluster import Cluster, free_port_range, start_cluster

CALL_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 30.0
PROMPT_LEN = LengthRange(8, 512)
OUTPUT_LEN = LengthRange(1, 128)
DEADLINE_S = (0.05, 0.5)
POOL_FIELDS = (
    "free_blocks total_blocks running waiting pending_transfers awaiting_kv in_flight pool_ok"
)
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "stars")


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 30.0
    clients: int = 4
    sample_s: float = 10.0
    warmup_fraction: float = 0.1
    max_drift_mb_per_hour: float = 64.0
    min_drift_mb: float = 16.0
    seed: int = 0


class Load:
    """The clients' requests, one method per family; each counts its outcome in ``counts``
    (by kind and outcome) and says what went wrong in ``problems``."""

    def __init__(self, cluster: Cluster, vocab: list[int], model: str, clients: int) -> None:
        assert cluster.http is not None, "start the cluster with its HTTP API"
        self.client = AsyncClient(cluster.gateway, retry=NO_RETRY)
        self.http = make_client(ClientOptions(), connections=clients)
        self.completions = OpenAITarget(f"{cluster.http}/v1", "completions", model)
        self.chat = OpenAITarget(f"{cluster.http}/v1", "chat", model)
        self.model = model
        self.vocab = vocab
        self.counts: Counter[tuple[str, str]] = Counter()
        self.problems: list[str] = []

    def add(self, kind: str, outcome: str, problem: str = "") -> None:
        self.counts[(kind, outcome)] += 1
        if problem and len(self.problems) < 50:
            self.problems.append(f"{kind}: {problem}")

    def request(self, rng: random.Random, max_tokens: int | None = None) -> BenchRequest:
        drawn = random_requests(self.vocab, 1, PROMPT_LEN, OUTPUT_LEN, rng.randrange(2**32))[0]
        return BenchRequest(drawn.prompt_token_ids, max_tokens or drawn.output_len)

    async def _stream(
        self, req: BenchRequest, rng: random.Random, sampled: bool, stop_after: int, timeout: float
    ) -> tuple[int, str | None]:
        """Stream ``req``, leaving after ``stop_after`` tokens if > 0: (tokens, finish)."""
        tokens, finish = 0, None
        stream = self.client.generate(
            prompt_token_ids=list(req.prompt_token_ids),
            max_tokens=req.output_len,
            ignore_eos=True,
            temperature=0.8 if sampled else 0.0,
            top_p=0.95 if sampled else None,
            seed=rng.randrange(2**31) if sampled else None,
            timeout=timeout,
        )
        async with contextlib.aclosing(cast(AsyncGenerator[Chunk, None], stream)):
            async for chunk in stream:  # leaving the block cancels the call
                tokens += len(chunk.token_ids)
                finish = chunk.finish_reason or finish
                if stop_after and tokens >= stop_after:
                    break
        return tokens, finish

    async def grpc_stream(
        self,
        kind: str,
        rng: random.Random,
        *,
        sampled: bool = False,
        stop_after: int = 0,
        cancel_s: float | None = None,
        deadline_s: float | None = None,
    ) -> None:
        """One gRPC stream: read to the end, left after ``stop_after`` tokens, its task
        cancelled after ``cancel_s``, or under a ``deadline_s`` deadline."""
        req = self.request(rng, 256 if deadline_s else rng.randint(16, 128) if stop_after else None)
        timeout = deadline_s or CALL_TIMEOUT_S
        task = asyncio.ensure_future(self._stream(req, rng, sampled, stop_after, timeout))
        if cancel_s is not None:
            await asyncio.sleep(cancel_s)
            task.cancel()
        try:
            tokens, finish = await task
        except asyncio.CancelledError:
            if cancel_s is None:
                raise
            self.add(kind, "cancelled")
        except grpc.RpcError as exc:
            if deadline_s and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                self.add(kind, "expired")
            else:
                self.add(kind, f"failed:{exc.code().name}", exc.details() or "")
        else:
            if stop_after and finish is None:
                self.add(kind, "cancelled")
            elif tokens == req.output_len and finish == "length":
                self.add(kind, "completed")
            else:
                self.add(kind, "wrong_output", f"{tokens}/{req.output_len} tokens, {finish}")

    async def http_full(self, kind: str, rng: random.Random, *, chat: bool) -> None:
        """One HTTP completion (token-id prompt) or chat completion (words), read to the end."""
        req = self.request(rng)
        text = " ".join(rng.choice(WORDS) for _ in range(req.prompt_len // 2 + 1))
        target = self.chat if chat else self.completions
        outcome = await send_openai(
            self.http,
            target,
            self.model,
            req,
            0.0,
            temperature=rng.choice((0.0, 0.8)),
            timeout_s=CALL_TIMEOUT_S,
            prompt_text=text if chat else None,
        )
        if not outcome.success:
            self.add(kind, f"failed:{outcome.error.split(':')[0]}", outcome.error[:300])
        elif outcome.output_tokens != req.output_len:
            self.add(kind, "wrong_output", f"{outcome.output_tokens}/{req.output_len} tokens")
        else:
            self.add(kind, "completed")

    async def http_cancel(self, kind: str, rng: random.Random) -> None:
        """One HTTP completion stream whose connection is closed after a few events."""
        req = self.request(rng, rng.randint(16, 128))
        body = payload(self.completions, self.model, req, 0.0)
        stop_after, events = rng.randint(1, 8), 0
        try:
            async with self.http.stream("POST", self.completions.url, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")[:300]
                    self.add(kind, f"failed:HTTP {response.status_code}", text)
                    return
                parser = SseParser()
                async for raw in response.aiter_raw():
                    events += len(parser.feed(raw))
                    if events >= stop_after:
                        break  # leaving the block closes the connection mid-stream
        except httpx.HTTPError as exc:
            self.add(kind, f"failed:{type(exc).__name__}", str(exc)[:300])
            return
        self.add(kind, "cancelled" if events >= stop_after else "completed")

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


Kind = Callable[[Load, str, random.Random], Coroutine[Any, Any, None]]
MIX: dict[str, tuple[float, Kind]] = {
    "grpc_greedy": (0.20, lambda load, k, rng: load.grpc_stream(k, rng)),
    "grpc_sampled": (0.15, lambda load, k, rng: load.grpc_stream(k, rng, sampled=True)),
    "grpc_cancel_mid_stream": (
        0.15,
        lambda load, k, rng: load.grpc_stream(
            k, rng, sampled=rng.random() < 0.5, stop_after=rng.randint(1, 8)
        ),
    ),
    "grpc_cancel_before_first": (
        0.05,
        lambda load, k, rng: load.grpc_stream(k, rng, cancel_s=rng.uniform(0.0, 0.05)),
    ),
    "grpc_deadline": (
        0.10,
        lambda load, k, rng: load.grpc_stream(k, rng, deadline_s=rng.uniform(*DEADLINE_S)),
    ),
    "http_completion": (0.15, lambda load, k, rng: load.http_full(k, rng, chat=False)),
    "http_chat": (0.10, lambda load, k, rng: load.http_full(k, rng, chat=True)),
    "http_cancel_mid_stream": (0.10, lambda load, k, rng: load.http_cancel(k, rng)),
}
"""Request kinds: (share of the requests, how to send one)."""


async def run_clients(load: Load, opts: SoakOptions, until: float) -> None:
    """``opts.clients`` closed loops, each drawing kinds from :data:`MIX`, until ``until``."""
    names, weights = list(MIX), [share for share, _ in MIX.values()]

    async def client(index: int) -> None:
        rng = random.Random(opts.seed * 1000 + index)
        while time.monotonic() < until:
            kind = rng.choices(names, weights)[0]
            await MIX[kind][1](load, kind, rng)

    await asyncio.gather(*(client(i) for i in range(opts.clients)))


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB; anonymous and file-backed too), threads and open fds of ``pid`` from /proc;
    empty once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    values = dict(line.split(":", 1) for line in status if ":" in line)
    mb = {k: int(values[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    return {
        "rss_mb": mb["VmRSS"],
        "rss_anon_mb": mb["RssAnon"],
        "rss_file_mb": mb["RssFile"],
        "threads": int(values["Threads"]),
        "fds": fds,
    }


class Sampler(threading.Thread):
    """Every ``interval_s``: each process's /proc figures and each worker's pool."""

    def __init__(self, cluster: Cluster, interval_s: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.cluster = cluster
        self.interval_s = interval_s
        self.start_time = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def take(self, phase: str = "load") -> dict[str, Any]:
        """One sample; ``phase``: ``start`` (before the load), ``load`` or ``idle`` (after)."""
        children = self.cluster.children()
        pids = {"launcher": self.cluster.proc.pid, **{n: c.pid for n, c in children.items()}}
        names = {c.address: n for n, c in children.items()}
        pools = {}
        for address in [*self.cluster.prefill, *self.cluster.decode]:
            s = self.cluster.status_of(address)
            pools[names.get(address, address)] = {
                key: getattr(s, key) for key in POOL_FIELDS.split()
            }
        sample = {
            "t_s": round(time.monotonic() - self.start_time, 2),
            "phase": phase,
            "processes": {n: {"pid": p, **proc_stats(p)} for n, p in pids.items()},
            "pools": pools,
            "restarts": {n: c.restarts for n, c in children.items()},
        }
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self.take()
            except Exception as exc:  # a worker gone: a finding, not the end of sampling
                self.errors.append(f"sample failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._halt.set()
        self.join()


def drift(samples: list[dict[str, Any]], warm_s: float, per_hour: float) -> dict[str, Any]:
    """Per process: RSS at the start, at the warm-up's end, at the last sample under load and
    once idle; the drift under load (MB) and its slope (MB/hour, least squares over the
    samples under load from the warm-up's end), as KB per request at ``per_hour`` requests an
    hour; threads and fds at the warm-up's end and once idle."""
    out: dict[str, dict[str, Any]] = {}
    loaded = [s for s in samples if s["phase"] == "load"]
    start, idle = samples[0]["processes"], samples[-1]["processes"]
    for name in idle:
        rows = [(s["t_s"], s["processes"].get(name, {})) for s in loaded]
        rows = [(t, p) for t, p in rows if "rss_mb" in p]
        after = [(t, p) for t, p in rows if t >= warm_s] or rows[-1:]
        if not after or "rss_mb" not in idle[name]:
            continue
        (t0, warm), (t1, last) = after[0], after[-1]
        hours = np.array([t for t, _ in after]) / 3600
        rss = np.array([p["rss_mb"] for _, p in after])
        slope = float(np.polyfit(hours, rss, 1)[0]) if len(after) > 2 else 0.0
        out[name] = {
            "pid": idle[name]["pid"],
            "rss_start_mb": start.get(name, {}).get("rss_mb"),
            "rss_warm_mb": warm["rss_mb"],
            "rss_last_loaded_mb": last["rss_mb"],
            "rss_idle_end_mb": idle[name]["rss_mb"],
            "rss_max_mb": float(max(p["rss_mb"] for _, p in rows)),
            "rss_anon_file_mb": [idle[name]["rss_anon_mb"], idle[name]["rss_file_mb"]],
            "drift_mb": last["rss_mb"] - warm["rss_mb"],
            "drift_mb_per_hour": slope,
            "drift_kb_per_request": slope * 1024 / per_hour if per_hour else 0.0,
            "window_s": t1 - t0,
            "threads": [warm["threads"], idle[name]["threads"]],
            "fds": [warm["fds"], idle[name]["fds"]],
        }
    return out


def findings(report: dict[str, Any], problems: list[str], opts: SoakOptions) -> list[str]:
    found = list(problems)
    for kind, outcomes in report["requests"]["by_kind"].items():
        for outcome, n in outcomes.items():
            if outcome.startswith("failed:") or outcome == "wrong_output":
                found.append(f"{n} x {kind} {outcome}")
    for name, pool in report["pools_end"].items():
        leaked = pool["total_blocks"] - pool["free_blocks"]
        if leaked or pool["running"] or pool["waiting"] or pool["pending_transfers"]:
            found.append(f"{name} not idle at the end ({leaked} blocks held): {pool}")
    for sample in report["samples"]:
        for name, pool in sample["pools"].items():
            if not pool["pool_ok"]:
                found.append(f"{name}'s pool failed its integrity check at {sample['t_s']} s")
        found += [f"{n} restarted {r} times" for n, r in sample["restarts"].items() if r]
    for name, p in report["processes"].items():
        if (
            p["drift_mb"] > opts.min_drift_mb
            and p["drift_mb_per_hour"] > opts.max_drift_mb_per_hour
        ):
            found.append(
                f"{name} RSS grew {p['drift_mb']:.1f} MB ({p['drift_mb_per_hour']:.0f} MB/hour) "
                f"under load after the warm-up: {p['rss_warm_mb']:.0f} -> "
                f"{p['rss_last_loaded_mb']:.0f} MB ({p['drift_kb_per_request']:.1f} KB/request)"
            )
    return list(dict.fromkeys(found))


def run_soak(cluster: Cluster, vocab: list[int], model: str, opts: SoakOptions) -> dict[str, Any]:
    """The soak against ``cluster`` (started with its HTTP API and a state file): the report,
    samples and findings included."""
    sampler = Sampler(cluster, opts.sample_s)
    sampler.take("start")
    sampler.start()
    run_s = opts.minutes * 60

    async def load_for() -> Load:
        load = Load(cluster, vocab, model, opts.clients)  # its channels: this event loop's
        try:
            await run_clients(load, opts, time.monotonic() + run_s)
        finally:
            await load.close()
        return load

    try:
        load = asyncio.run(load_for())
        cluster.wait_idle(IDLE_TIMEOUT_S)
    finally:
        sampler.stop()
    last = sampler.take("idle")
    outcomes: Counter[str] = Counter()
    for (_, outcome), n in load.counts.items():
        outcomes[outcome] += n
    total = sum(outcomes.values())
    by_kind = {k: {o: n for (kk, o), n in sorted(load.counts.items()) if kk == k} for k in MIX}
    report: dict[str, Any] = {
        "options": asdict(opts),
        "seconds": last["t_s"],
        "requests": {
            "total": total,
            "per_s": total / max(run_s, 1e-9),
            "by_outcome": dict(outcomes),
            "by_kind": by_kind,
        },
        "processes": drift(sampler.samples, opts.warmup_fraction * run_s, total / run_s * 3600),
        "pools_end": last["pools"],
        "samples": sampler.samples,
    }
    report["findings"] = findings(report, load.problems + sampler.errors, opts)
    return report


def print_report(report: dict[str, Any]) -> None:
    req = report["requests"]
    print(f"{report['seconds']:.0f} s, {req['total']} requests ({req['per_s']:.2f}/s)")
    for kind, outcomes in req["by_kind"].items():
        print(f"  {kind:<26}{outcomes}")
    print(
        f"RSS MB: {'start':>8}{'warm':>8}{'last':>8}{'idle':>8}{'max':>8}{'drift':>7}"
        f"{'MB/h':>7}{'KB/req':>7}  threads fds (warm, idle)"
    )
    for name, p in report["processes"].items():
        figures = ("rss_start_mb", "rss_warm_mb", "rss_last_loaded_mb", "rss_idle_end_mb")
        print(
            f"{name:<10}"
            + "".join(f"{p[k]:8.1f}" for k in (*figures, "rss_max_mb"))
            + f"{p['drift_mb']:+7.1f}{p['drift_mb_per_hour']:+7.0f}"
            f"{p['drift_kb_per_request']:+7.1f}  {p['threads']} {p['fds']}"
        )
    for name, pool in report["pools_end"].items():
        print(f"pool {name} at the end: {pool}")
    for finding in report["findings"]:
        print(f"FINDING: {finding}")


def prompt_vocab(model_path: Path) -> list[int]:
    """Token ids random prompts are drawn from (the tokenizer's ordinary tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return usable_token_ids(tokenizer, AutoConfig.from_pretrained(model_path).vocab_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (0: colocated)")
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    for f in fields(SoakOptions):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    parser.add_argument("--json", type=Path, default=None, help="write samples and summary here")
    args = parser.parse_args(argv)
    opts = SoakOptions(**{f.name: getattr(args, f.name) for f in fields(SoakOptions)})
    model = resolve_model_path(
        ModelConfig(model=args.model or DEFAULT_MODEL, cache_dir=default_cache_dir())
    )
    logs = Path(tempfile.mkdtemp(prefix="pdserve-soak-"))
    port = free_port_range(1)
    cluster = start_cluster(
        str(model), prefill=args.prefill, decode=args.decode, log_dir=logs, http_port=port
    )
    try:
        report = run_soak(cluster, prompt_vocab(model), str(model), opts)
    finally:
        cluster.stop()
    report.update(model=str(model), prefill=args.prefill, decode=args.decode, logs=str(logs))
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
