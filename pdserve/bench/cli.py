"""``pdserve bench``: flags and entry point.

    pdserve bench --gateway 127.0.0.1:50051 --num-prompts 64 --request-rate 2
    pdserve bench --request-rate-sweep 1,2,4 --goodput ttft:500 tpot:100 --plot-dir plots/
    pdserve bench --compare --num-prompts 24 --output-json compare.json
    pdserve bench --compare --systems pdserve-colocated,vllm-cpu --goodput ttft:2000 tpot:200
    pdserve bench --gateway gw:443 --tls-ca ca.pem --auth-token-file token --retries 5
    pdserve bench --backend openai --base-url http://127.0.0.1:8000/v1 --num-prompts 64
    pdserve bench --backend openai --base-url http://vllm:8000/v1 --endpoint chat \
        --served-model-name SmolLM2-135M-Instruct

The client is the SDK's (pdserve.client): ``--tls*`` and ``--auth-token-file`` (or
``PDSERVE_AUTH_TOKEN``) as ``pdserve generate`` takes them, and ``--retries`` of requests
refused with RESOURCE_EXHAUSTED after the server's RetryInfo delay. ``--backend openai`` sends
the same requests to any OpenAI-compatible server instead (:mod:`pdserve.bench.openai_http`:
SSE timed as the gRPC stream is, the token as a bearer header, 429s retried after
``Retry-After``), so pdserve and another server are measured side by side with one command line.

The flags are declared in :mod:`pdserve.bench.settings` (each also reads ``PDSERVE_<FLAG>``);
the benchmark's own modules are imported when it runs.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pdserve.bench.settings import (
    SMOKE_INPUT_LEN,
    SMOKE_NUM_PROMPTS,
    SMOKE_OUTPUT_LEN,
    SMOKE_PREFIX_LEN,
)

if TYPE_CHECKING:
    from pdserve.bench.datasets import BenchRequest
    from pdserve.bench.load import LoadSpec
    from pdserve.bench.peer import PeerConfig
    from pdserve.bench.report import RunResult
    from pdserve.bench.runner import ClientOptions, RunSettings


def _build_requests(args: argparse.Namespace, model_path: Path, seed: int) -> list[BenchRequest]:
    from transformers import AutoConfig, AutoTokenizer

    from pdserve.bench import datasets as ds

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = AutoConfig.from_pretrained(model_path)
    input_len = ds.LengthRange.parse(args.input_len_range)
    output_len = ds.LengthRange.parse(args.output_len_range)
    kind = args.dataset or ("sharegpt" if args.dataset_path else "random")
    if kind == "sharegpt":
        if args.dataset_path is None:
            raise ValueError("--dataset sharegpt needs --dataset-path")
        max_len = getattr(config, "max_position_embeddings", None)
        return ds.sharegpt_requests(
            args.dataset_path,
            tokenizer,
            args.num_prompts,
            seed,
            output_len=args.sharegpt_output_len,
            max_model_len=max_len,
        )
    longest = input_len.high + output_len.high + (args.prefix_len if kind == "shared-prefix" else 0)
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and longest > context:
        raise ValueError(
            f"requests of up to {longest} tokens do not fit the {context}-token context"
        )
    vocab = ds.usable_token_ids(tokenizer, config.vocab_size)
    if kind == "shared-prefix":
        return ds.shared_prefix_requests(
            vocab,
            args.num_prompts,
            args.num_prefixes,
            args.prefix_len,
            input_len,
            output_len,
            seed,
        )
    return ds.random_requests(vocab, args.num_prompts, input_len, output_len, seed)


def _apply_smoke(args: argparse.Namespace) -> None:
    args.num_prompts = SMOKE_NUM_PROMPTS
    args.input_len_range = SMOKE_INPUT_LEN
    args.output_len_range = SMOKE_OUTPUT_LEN
    args.prefix_len = min(args.prefix_len, SMOKE_PREFIX_LEN)
    args.num_prefixes = min(args.num_prefixes, 2)


def _json_config(args: argparse.Namespace, model_path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key == "command":
            continue
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        elif isinstance(value, list):
            value = ["inf" if isinstance(v, float) and math.isinf(v) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        config[key] = value
    config["model_path"] = str(model_path)
    config["argv"] = sys.argv[1:]
    return config


def _split_cluster_args(values: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        flag, sep, value = v.partition("=")
        out += [flag, value] if sep else [flag]
    return tuple(out)


def _run(args: argparse.Namespace, model_path: Path) -> tuple[list[RunResult], dict[str, Any]]:
    from pdserve.bench.compare import (
        CompareConfig,
        System,
        parse_systems,
        run_compare,
        throughput_ratios,
    )
    from pdserve.bench.load import LoadSpec
    from pdserve.bench.metrics import parse_goodput
    from pdserve.bench.runner import RunSettings, bench_gateway

    client = _client_options(args)
    settings = RunSettings(
        slos_ms=parse_goodput(args.goodput),
        percentiles=tuple(float(p) for p in args.percentiles.split(",") if p.strip()),
        temperature=args.temperature,
        timeout_s=args.request_timeout,
        num_warmups=args.num_warmups,
        disable_progress=args.disable_tqdm,
    )
    rates = args.request_rate_sweep or [args.request_rate]
    loads = [LoadSpec(r, args.burstiness, args.max_concurrency, args.seed) for r in rates]
    if args.backend == "openai":
        if args.compare:
            raise ValueError("--compare starts its own clusters: --backend openai loads one server")
        return [
            _bench_openai(args, model_path, args.seed + i, load, settings, client)
            for i, load in enumerate(loads)
        ], {}
    if not args.compare:
        # Each rate of a sweep gets its own prompts (seed, seed + 1, ...): a server's prefix
        # cache must not serve a later rate from an earlier one.
        return [
            bench_gateway(
                args.gateway,
                _build_requests(args, model_path, args.seed + i),
                load,
                settings,
                client_options=client,
            )
            for i, load in enumerate(loads)
        ], {}
    if client.tls is not None or client.token is not None:
        raise ValueError(
            "--compare benchmarks plaintext clusters it starts itself: TLS and token options "
            "apply to --gateway runs"
        )
    if len(loads) != 1:
        raise ValueError("--compare runs one load: give --request-rate, not a sweep")
    systems = parse_systems(args.systems)
    peer = _peer_config(args, System.VLLM_CPU in systems)
    requests = _build_requests(args, model_path, args.seed)
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        cfg = CompareConfig(
            model_path=model_path,
            log_dir=args.log_dir or Path(tmp),
            dtype=args.dtype,
            cache_dir=args.cache_dir,
            cluster_args=_split_cluster_args(args.cluster_arg),
            systems=systems,
            peer=peer,
        )
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        runs = run_compare(requests, loads[0], settings, cfg)
    return runs, throughput_ratios(runs)


def _peer_config(args: argparse.Namespace, wanted: bool) -> PeerConfig:
    """``--peer-script``/``--peer-url``, checked before any system runs."""
    from pdserve.bench.peer import PeerConfig

    if wanted:
        return PeerConfig.resolve(args.peer_script, args.peer_url)
    if args.peer_url or args.peer_script:
        raise ValueError("--peer-url and --peer-script are for --systems ...,vllm-cpu")
    return PeerConfig()


def _bench_openai(
    args: argparse.Namespace,
    model_path: Path,
    seed: int,
    load: LoadSpec,
    settings: RunSettings,
    client: ClientOptions,
) -> RunResult:
    """One run against ``--base-url`` (the same prompts a ``--gateway`` run with this seed
    sends; chat sends their decoded text)."""
    from pdserve.bench.openai_http import OpenAITarget, bench_openai

    target = OpenAITarget(args.base_url, args.endpoint, args.served_model_name)
    requests = _build_requests(args, model_path, seed)
    texts = None
    if args.endpoint == "chat":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        texts = [str(tokenizer.decode(list(r.prompt_token_ids))) for r in requests]
    return bench_openai(target, requests, load, settings, client_options=client, prompt_texts=texts)


def _client_options(args: argparse.Namespace) -> ClientOptions:
    """TLS, token and retries for the benchmark's client, as ``pdserve generate`` builds them."""
    from pdserve.bench.runner import ClientOptions
    from pdserve.client import RetryPolicy
    from server_runtime.settings import client_tls, client_token

    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    return ClientOptions(
        tls=client_tls(args),
        token=client_token(args),
        retry=RetryPolicy(max_attempts=1 + args.retries),
    )


def _print_summary(args: argparse.Namespace, runs: list[RunResult], ratios: dict[str, Any]) -> None:
    from pdserve.bench.report import format_ratios, format_table

    first = runs[0]
    n_in = sum(o.prompt_len for o in first.outcomes)
    per_run = " per run (fresh prompts for each rate)" if len(runs) > 1 and not args.compare else ""
    print(
        f"\n{first.metrics.num_requests} requests{per_run}, {n_in} prompt tokens in the first, "
        f"seed {args.seed}; " + "; ".join(dict.fromkeys(r.load.describe() for r in runs))
    )
    for label, description in dict.fromkeys((r.label, r.description) for r in runs):
        print(f"  {label}: {description}")
    print()
    print(format_table(runs))
    if ratios:
        print()
        print(format_ratios(ratios))
    if args.request_rate_sweep and args.goodput:
        met = [r.load.request_rate for r in runs if (r.metrics.slo_attainment or 0) >= 0.9]
        best = "none of the rates swept"
        if met:
            best = "inf (all at once)" if math.isinf(max(met)) else f"{max(met):g} req/s"
        print(f"\nhighest rate with >= 90% of requests within every SLO: {best}")
    for r in runs:
        errors = [o.error for o in r.outcomes if not o.success]
        if errors:
            print(f"\n{r.label}: {len(errors)} failed requests, e.g. {errors[0]}", file=sys.stderr)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_bench(args: argparse.Namespace) -> int:
    """Entry point for ``pdserve bench``; returns the process exit status."""
    from engine.config import ModelConfig
    from engine.model_files import default_cache_dir, resolve_model_path
    from pdserve.bench.report import write_json

    if args.smoke:
        _apply_smoke(args)
    # SIGTERM unwinds like Ctrl-C, so the clusters --compare started are stopped, not orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        model_path = resolve_model_path(
            ModelConfig(model=args.model, cache_dir=args.cache_dir or default_cache_dir())
        )
        runs, ratios = _run(args, model_path)
    except ValueError as err:
        print(f"pdserve bench: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a warm-up request refused, a cluster that would not start
        print(f"pdserve bench: {err}", file=sys.stderr)
        return 1
    _print_summary(args, runs, ratios)
    if args.output_json:
        write_json(args.output_json, runs, _json_config(args, model_path), ratios)
        print(f"\nwrote {args.output_json}")
    if args.plot_dir:
        from pdserve.bench.plots import write_plots

        for path in write_plots(runs, args.plot_dir):
            print(f"wrote {path}")
    return 0 if all(r.metrics.failed == 0 for r in runs) else 1
