"""The pause a client sees when its decode worker leaves: live KV migration vs re-prefill resume.

    flock /tmp/pdserve-bench.lock .venv/bin/python benchmarks/migration.py \\
        --json /tmp/migration.json | tee /tmp/migration.md
    .venv/bin/python benchmarks/migration.py --contexts 512 --max-tokens 32   # quicker
    .venv/bin/python benchmarks/migration.py --repeats 3   # median of 3 events per cell

Two ``pdserve up`` clusters on loopback, one after the other, each colocated (``--prefill 0``)
with two decode workers, on the default model (SmolLM2-135M-Instruct, 8k positions; ``--model``
for another), ``/metrics`` on, and a supervisor that restarts a worker that leaves:

- *migration*: the default configuration; the worker holding the stream gets SIGTERM, parks
  its decoding sequence, and the gateway moves it, KV and all, to the other decode worker;
- *re-prefill*: every decode worker runs with ``--no-migration`` (``PDSERVE_NO_MIGRATION=1``).
  A SIGTERM there would only let the stream finish on the draining worker within
  ``--shutdown-grace``: no pause to measure. So the worker holding the stream gets **SIGKILL**
  instead, and the gateway resumes the stream on the other worker by re-prefilling the prompt
  plus the tokens so far (the path a crash takes, and the only resume ``--no-migration``
  leaves). The two rows differ in the signal as well as the mechanism, by construction.

Per context (prompt length: ``--contexts``, default 512, 2048, 4096 seeded random token ids,
the same prompts in both clusters) and per mode, one stream at a time: a greedy ``ignore_eos``
request of ``--max-tokens`` (64) tokens is started through ``pdserve.client.AsyncClient``; once
``--before`` (4) tokens have arrived, the decode worker whose ``GetStatus`` says ``running ==
1`` is the victim and gets its signal. Measured client-side (``time.perf_counter`` at each
streamed message carrying tokens):

- *pause*: the largest gap between two consecutive token messages whose later one arrived
  after the signal (the gap the event opened; normal inter-token gaps count too, so it is
  never below them);
- *undisturbed max gap*: the largest gap of the same prompt streamed again afterwards with
  nothing killed (the jitter floor the pause stands on). Its tokens must equal the disturbed
  stream's, and the re-prefill cluster's the migration cluster's (a mismatch is printed in
  capitals and the run exits 1).

From the gateway: the ``stream_migrated`` log line (KV bytes moved, its own pause from the
offer to the target's first token) and the deltas of ``pdserve_migration_pause_seconds``
(sum / count), ``pdserve_migrations_total`` and ``pdserve_decode_resumes_total``, which also
check that each event took the path its mode says (a migration that fell back to re-prefill is
reported as an anomaly). Before each case both workers are serving again (a killed or drained
worker restarted by the supervisor) and each has served a short warm-up request. The supervisor
restarts the SIGKILLed worker 0.5 s after its death, while the other one is re-prefilling: on a
machine with few cores that start (loading the model) competes for CPU and can lengthen the
re-prefill pause a little (the drained worker of a migration exits only after the move).

Prints a markdown table (per context: both pauses, their ratio, KV moved) and the issue's
targets (at 2,048 tokens the migration pause at most a quarter of the re-prefill pause, and
under 0.5 s); ``--json`` writes every case. Exits 1 on a token mismatch or a wrong path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster

CONTEXTS = (512, 2048, 4096)
MODES = ("migration", "re-prefill")
SIGNALS = {"migration": signal.SIGTERM, "re-prefill": signal.SIGKILL}
TARGET_CONTEXT = 2048
TARGET_RATIO = 0.25
TARGET_PAUSE_S = 0.5
TOKEN_RANGE = (1000, 40000)  # ordinary vocabulary ids of the default model (49,152 tokens)
SUPERVISION = ("--restart-delay", "0.5", "--restart-limit", "100", "--restart-window", "60")
REQUEST_TIMEOUT_S = 900.0
RESTART_TIMEOUT_S = 240.0
WARMUP_TRIES = 10
METRICS = (
    "pdserve_migrations_total",
    "pdserve_decode_resumes_total",
    "pdserve_migration_pause_seconds_sum",
    "pdserve_migration_pause_seconds_count",
)


# ---- pure helpers (tested without a model in tests/benchmarks/test_migration_helpers.py) ----


def prompt_ids(context: int, seed: int) -> list[int]:
    """``context`` seeded random ordinary token ids (the same for a context in every run)."""
    rng = random.Random(seed * 100_003 + context)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(context)]


def largest_gap(arrivals: Sequence[float], after: float | None = None) -> float | None:
    """Largest gap between consecutive arrivals; with ``after``, only gaps ending after it
    (the one spanning the event and those that follow). None without such a gap."""
    gaps = [b - a for a, b in pairwise(arrivals) if after is None or b > after]
    return max(gaps) if gaps else None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if
    equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def metric_values(text: str) -> dict[str, float]:
    """Samples of ``METRICS`` in a /metrics exposition, summed over every label but
    ``outcome`` (kept as ``name{outcome}``)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in METRICS:
                continue
            key = f"{s.name}{{{s.labels['outcome']}}}" if "outcome" in s.labels else s.name
            values[key] = values.get(key, 0.0) + s.value
    return values


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` for every key of either (a key absent counts 0), moved ones only."""
    keys = sorted(set(before) | set(after))
    moved = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in moved.items() if v}


def path_problem(mode: str, moved: dict[str, float]) -> str | None:
    """Why the metric deltas of one event say it did not take ``mode``'s path, or None."""
    migrated = moved.get("pdserve_migrations_total{migrated}", 0.0)
    resumed = moved.get("pdserve_decode_resumes_total{resumed}", 0.0)
    others = {
        k: v for k, v in moved.items() if "{" in k and not k.endswith(("{migrated}", "{resumed}"))
    }
    if mode == "migration" and (migrated != 1 or resumed != 0 or others):
        return f"expected one migration and no resume, gateway counted {moved}"
    if mode == "re-prefill" and (resumed != 1 or migrated != 0 or others):
        return f"expected one re-prefill resume and no migration, gateway counted {moved}"
    return None


def logged_number(lines: Sequence[dict[str, object]], field: str) -> float | None:
    """``field`` of the last log line that has it as a number, or None."""
    for line in reversed(lines):
        value = line.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per context: each mode's median pause, their ratio, the KV moved."""
    rows = []
    for context in sorted({c["context"] for c in cases}):
        of = {m: [c for c in cases if c["context"] == context and c["mode"] == m] for m in MODES}
        mig = median([c["pause_s"] for c in of["migration"]])
        rep = median([c["pause_s"] for c in of["re-prefill"]])
        here = [*of["migration"], *of["re-prefill"]]
        rows.append(
            {
                "context": context,
                "migration_pause_s": mig,
                "reprefill_pause_s": rep,
                "ratio": mig / rep if mig is not None and rep else None,
                "kv_bytes": median([c["kv_bytes"] for c in of["migration"]]),
                "gateway_pause_ms": median([c["gateway_pause_ms"] for c in of["migration"]]),
                "histogram_pause_s": median([c["histogram_pause_s"] for c in of["migration"]]),
                "undisturbed_gap_s": median([c["undisturbed_gap_s"] for c in here]),
                "ttft_s": median([c.get("ttft_s") for c in here]),
                "events": {m: len(v) for m, v in of.items()},
                "identical": all(c["identical"] for c in here),
                "path_ok": all(c["path_problem"] is None for c in here),
            }
        )
    return rows


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| context (tokens) | migration pause (s) | re-prefill pause (s) | ratio "
        "| KV moved (MiB) | gateway pause, log (ms) | histogram (s) "
        "| undisturbed max gap (s) | first token (s) | tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tokens = "identical" if r["identical"] else "**MISMATCH**"
        if not r["path_ok"]:
            tokens += ", **wrong path**"
        lines.append(
            f"| {r['context']} | {_fmt(r['migration_pause_s'], '.3f')} "
            f"| {_fmt(r['reprefill_pause_s'], '.3f')} | {_fmt(r['ratio'], '.3f')} "
            f"| {_fmt(r['kv_bytes'], '.1f', 1 / 2**20)} | {_fmt(r['gateway_pause_ms'], '.1f')} "
            f"| {_fmt(r['histogram_pause_s'], '.3f')} | {_fmt(r['undisturbed_gap_s'], '.3f')} "
            f"| {_fmt(r['ttft_s'], '.2f')} | {tokens} |"
        )
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at ``TARGET_CONTEXT`` tokens (None where that context did not run)."""
    row = next((r for r in rows if r["context"] == TARGET_CONTEXT), None)
    if row is None or row["ratio"] is None or row["migration_pause_s"] is None:
        return {"context": TARGET_CONTEXT, "ratio_ok": None, "pause_ok": None}
    return {
        "context": TARGET_CONTEXT,
        "ratio": row["ratio"],
        "ratio_ok": row["ratio"] <= TARGET_RATIO,
        "migration_pause_s": row["migration_pause_s"],
        "pause_ok": row["migration_pause_s"] < TARGET_PAUSE_S,
    }


def parse_contexts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive comma-separated lengths, got {text!r}")
    return values


# ---- the cluster side ----


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return metric_values(reply.read().decode())


async def stream(
    client: AsyncClient,
    prompt: list[int],
    max_tokens: int,
    tokens: list[int],
    arrivals: list[float],
    reached: asyncio.Event | None = None,
    before: int = 0,
) -> None:
    async for chunk in client.generate(
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        timeout=REQUEST_TIMEOUT_S,
    ):
        if chunk.token_ids:
            arrivals.append(time.perf_counter())
            tokens.extend(chunk.token_ids)
            if reached is not None and len(tokens) >= before:
                reached.set()


async def find_victim(cluster: Cluster) -> int | None:
    """Index of the one decode worker running a sequence, or None (none, or both)."""
    statuses = await asyncio.gather(
        *[asyncio.to_thread(cluster.status_of, address) for address in cluster.decode]
    )
    busy = [i for i, s in enumerate(statuses) if s.running == 1]
    if len(busy) == 1 and sum(s.running for s in statuses) == 1:
        return busy[0]
    return None


async def disturbed(
    cluster: Cluster, prompt: list[int], mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    tokens: list[int] = []
    arrivals: list[float] = []
    reached = asyncio.Event()
    async with AsyncClient(cluster.gateway) as client:
        sent = time.perf_counter()
        task = asyncio.create_task(
            stream(client, prompt, args.max_tokens, tokens, arrivals, reached, args.before)
        )
        waiter = asyncio.create_task(reached.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
            raise RuntimeError(f"the stream ended before {args.before} tokens")
        victim = await find_victim(cluster)
        if victim is None:
            task.cancel()
            raise RuntimeError("no single decode worker with running == 1")
        name = f"decode-{victim}"
        pid = cluster.children()[name].pid
        signalled = time.perf_counter()
        os.kill(pid, SIGNALS[mode])
        before_signal = len(tokens)
        await task
    after = [t for t in arrivals if t > signalled]
    return {
        "victim": name,
        "victim_pid": pid,
        "signal": SIGNALS[mode].name,
        "tokens_at_signal": before_signal,
        "ttft_s": arrivals[0] - sent,
        "pause_s": largest_gap(arrivals, after=signalled),
        "signal_to_next_token_s": after[0] - signalled if after else None,
        "undisturbed_part_gap_s": largest_gap([t for t in arrivals if t <= signalled]),
        "tokens": tokens,
    }


async def undisturbed(cluster: Cluster, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    tokens: list[int] = []
    arrivals: list[float] = []
    async with AsyncClient(cluster.gateway) as client:
        await stream(client, prompt, max_tokens, tokens, arrivals)
    return {"tokens": tokens, "gap_s": largest_gap(arrivals)}


def routed_to(cluster: Cluster) -> list[str]:
    return [str(e.get("decode")) for e in cluster.events("request_routed")]


def warm_up(cluster: Cluster) -> None:
    """Until each decode worker has served a short request routed to it from now on."""
    seen = len(routed_to(cluster))
    rng = random.Random(7)

    async def pair() -> None:
        async with AsyncClient(cluster.gateway) as client:
            prompts = [[rng.randrange(*TOKEN_RANGE) for _ in range(64)] for _ in range(2)]
            await asyncio.gather(*[stream(client, p, 8, [], []) for p in prompts])

    for _ in range(WARMUP_TRIES):
        asyncio.run(pair())
        if set(cluster.decode) <= set(routed_to(cluster)[seen:]):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the gateway did not route to every decode worker: {cluster.decode}")


def wait_back(cluster: Cluster, name: str, old_pid: int) -> float:
    """Seconds until worker ``name`` is serving again as a new process (the supervisor's)."""
    started = time.monotonic()
    cluster.wait_child(
        name,
        lambda c: c.pid not in (0, old_pid) and c.state == "serving",
        timeout_s=RESTART_TIMEOUT_S,
    )
    for address in cluster.decode:
        cluster.wait_serving(address)
    return time.monotonic() - started


def migrated_events(cluster: Cluster) -> list[dict[str, object]]:
    return cluster.events("stream_migrated")


def run_mode(
    mode: str,
    model: str,
    args: argparse.Namespace,
    logs: Path,
    reference: dict[tuple[int, int], list[int]],
) -> list[dict[str, Any]]:
    metrics_base = free_port_range(4)  # gateway, two decode workers, the launcher
    extra = (*SUPERVISION, "--metrics-base-port", str(metrics_base), *args.cluster_args)
    env = dict(os.environ)
    if mode == "re-prefill":
        env["PDSERVE_NO_MIGRATION"] = "1"
    print(f"[{mode}] starting the cluster ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    cluster = start_cluster(model, prefill=0, decode=2, log_dir=logs, extra=extra, env=env)
    print(
        f"[{mode}] up in {time.monotonic() - began:.0f} s; log {cluster.log_path}",
        file=sys.stderr,
        flush=True,
    )
    cases = []
    try:
        warm_up(cluster)
        for repeat in range(args.repeats):
            for context in args.contexts:
                prompt = prompt_ids(context, args.seed + repeat)
                before = scrape(metrics_base)
                logged = len(migrated_events(cluster))
                event = asyncio.run(disturbed(cluster, prompt, mode, args))
                back_s = wait_back(cluster, event["victim"], event["victim_pid"])
                moved = deltas(before, scrape(metrics_base))
                lines = migrated_events(cluster)[logged:]
                warm_up(cluster)
                quiet = asyncio.run(undisturbed(cluster, prompt, args.max_tokens))
                ref = reference.setdefault((context, repeat), quiet["tokens"])
                diff = first_difference(event["tokens"], quiet["tokens"])
                cross = first_difference(quiet["tokens"], ref)
                hist_n = moved.get("pdserve_migration_pause_seconds_count", 0.0)
                hist_sum = moved.get("pdserve_migration_pause_seconds_sum", 0.0)
                case = {
                    "mode": mode,
                    "context": context,
                    "repeat": repeat,
                    **{k: v for k, v in event.items() if k != "tokens"},
                    "tokens_out": len(event["tokens"]),
                    "undisturbed_gap_s": quiet["gap_s"],
                    "identical": diff is None and cross is None,
                    "first_difference": diff,
                    "first_difference_vs_other_cluster": cross,
                    "kv_bytes": logged_number(lines, "bytes"),
                    "gateway_pause_ms": logged_number(lines, "pause_ms"),
                    "stream_migrated": lines,
                    "histogram_pause_s": hist_sum / hist_n if hist_n else None,
                    "metric_deltas": moved,
                    "path_problem": path_problem(mode, moved),
                    "victim_back_s": back_s,
                }
                cases.append(case)
                print(
                    f"[{mode}] context {context}: pause {_fmt(case['pause_s'], '.3f')} s "
                    f"(victim {case['victim']}, {case['signal']} after "
                    f"{case['tokens_at_signal']} tokens, undisturbed max gap "
                    f"{_fmt(quiet['gap_s'], '.3f')} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if not case["identical"]:
                    print(
                        f"TOKEN MISMATCH [{mode}] context {context}: first difference at "
                        f"{diff} (vs undisturbed), {cross} (vs the other cluster)",
                        file=sys.stderr,
                        flush=True,
                    )
                if case["path_problem"]:
                    print(
                        f"WRONG PATH [{mode}] context {context}: {case['path_problem']}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        cluster.stop()
    return cases


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=parse_contexts, default=list(CONTEXTS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--before", type=int, default=4, help="tokens streamed before the event")
    parser.add_argument("--repeats", type=int, default=1, help="events per context and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default", help="a model folder, or default")
    parser.add_argument(
        "--cluster-arg",
        dest="cluster_args",
        action="append",
        default=[],
        help="passed on to pdserve up (both clusters), e.g. --cluster-arg=--shutdown-grace=30",
    )
    parser.add_argument("--logs", type=Path, default=None, help="cluster logs (a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.before < args.max_tokens:
        parser.error("need 1 <= --before < --max-tokens")
    return args


def resolve_model(name: str) -> str:
    from engine.config import DEFAULT_MODEL, ModelConfig
    from engine.model_files import default_cache_dir, resolve_model_path

    model = DEFAULT_MODEL if name == "default" else name
    return str(resolve_model_path(ModelConfig(model=model, cache_dir=default_cache_dir())))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    model = resolve_model(args.model)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="pdserve-migration-"))
    logs.mkdir(parents=True, exist_ok=True)
    reference: dict[tuple[int, int], list[int]] = {}
    cases = [c for mode in MODES for c in run_mode(mode, model, args, logs, reference)]
    rows = summarize(cases)
    goal = targets(rows)
    wall = time.monotonic() - began
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    print(
        f"## Migration vs re-prefill resume: client-visible pause\n\n"
        f"`{command}`\n\n"
        f"Model {Path(model).name}, colocated (`--prefill 0`), 2 decode workers, one greedy "
        f"`ignore_eos` stream of {args.max_tokens} tokens at a time, event after "
        f"{args.before} tokens, {args.repeats} event(s) per cell (median). Migration: SIGTERM "
        f"to the worker holding the stream (default settings). Re-prefill: workers started "
        f"with `--no-migration` and the worker holding the stream **SIGKILLed** (a SIGTERM "
        f"would let the stream finish there), so the gateway resumes it on the other worker "
        f"by re-prefilling prompt + tokens so far. Pause: largest client-side gap between "
        f"consecutive token messages ending after the signal. Ratio: migration / re-prefill. "
        f"First token: the disturbed streams' time to first token (the prompt's prefill), for "
        f"scale.\n"
    )
    print(table(rows))
    print()
    if goal["ratio_ok"] is None:
        print(f"Targets at {TARGET_CONTEXT} tokens: not measured (context not run).")
    else:
        print(
            f"Targets at {TARGET_CONTEXT} tokens: ratio {goal['ratio']:.3f} "
            f"(<= {TARGET_RATIO}: {'PASS' if goal['ratio_ok'] else 'FAIL'}); migration pause "
            f"{goal['migration_pause_s']:.3f} s (< {TARGET_PAUSE_S} s: "
            f"{'PASS' if goal['pause_ok'] else 'FAIL'})."
        )
    mismatched = [c for c in cases if not c["identical"]]
    wrong = [c for c in cases if c["path_problem"]]
    for c in mismatched:
        print(
            f"\n**TOKEN MISMATCH** {c['mode']} at {c['context']} tokens: first difference at "
            f"{c['first_difference']} vs the undisturbed run, "
            f"{c['first_difference_vs_other_cluster']} vs the other cluster's."
        )
    for c in wrong:
        print(f"\n**WRONG PATH** {c['mode']} at {c['context']} tokens: {c['path_problem']}")
    print(f"\nWall time {wall:.0f} s; cluster logs in {logs}.")
    if args.json is not None:
        report = {
            "command": command,
            "model": model,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
            "targets": goal,
            "cases": cases,
            "wall_s": wall,
            "logs": str(logs),
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if mismatched or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
