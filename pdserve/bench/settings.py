"""``pdserve bench``'s settings (flags and ``PDSERVE_*`` variables), declared once.

Imported on every ``pdserve`` command (the parser is built each time): the standard library and
the declarations only.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from core.settings import Group, Setting
from engine.config import DEFAULT_MODEL
from server_runtime.settings import AUTH_TOKEN_ENV, CLIENT_TLS

DATASETS = ("random", "shared-prefix", "sharegpt")
BACKENDS = ("pdserve", "openai")
ENDPOINTS = ("completions", "chat")
SMOKE_NUM_PROMPTS = 4
SMOKE_INPUT_LEN = "8,32"
SMOKE_OUTPUT_LEN = "4,8"
SMOKE_PREFIX_LEN = 16


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("a request rate must be positive (inf: all at once)")
    return value


def _rates(text: str) -> list[float]:
    return [_rate(t) for t in text.split(",") if t.strip()]


def _join(values: list[float]) -> str:
    return ",".join(map(str, values))


TARGET = Group(
    "target",
    (
        Setting(
            "--backend",
            choices=BACKENDS,
            default="pdserve",
            help="pdserve: the gateway's gRPC API (--gateway); openai: any OpenAI-compatible "
            "HTTP server (--base-url), streamed over SSE",
        ),
        Setting(
            "--gateway",
            default="127.0.0.1:50051",
            help="gateway address to load (ignored with --compare)",
        ),
        Setting(
            "--base-url",
            default="http://127.0.0.1:8000/v1",
            help="--backend openai: the API's base URL, up to /v1",
        ),
        Setting(
            "--endpoint",
            choices=ENDPOINTS,
            default="completions",
            help="--backend openai: /completions (the prompts' token ids) or /chat/completions "
            "(their text as one user message)",
        ),
        Setting(
            "--served-model-name",
            help="--backend openai: the requests' model field (default: the first id "
            "GET /v1/models lists)",
        ),
        Setting(
            "--model",
            default=DEFAULT_MODEL,
            help="the served model: its tokenizer builds the prompts; --compare runs it",
        ),
        Setting("--cache-dir", type=Path, help="pdserve's model cache"),
        Setting("--request-timeout", type=float, help="seconds per request"),
        Setting("--temperature", type=float, default=0.0, help="0: greedy (default)"),
        Setting(
            "--retries",
            type=int,
            default=3,
            help="retries of a request refused with RESOURCE_EXHAUSTED before its first token, "
            "after the server's RetryInfo delay (its TTFT includes the wait)",
        ),
        Setting(
            "--auth-token-file",
            type=Path,
            help=f"file whose first line is the gateway's bearer token (or set {AUTH_TOKEN_ENV})",
        ),
    ),
)

DATASET = Group(
    "dataset",
    (
        Setting(
            "--dataset",
            choices=DATASETS,
            help="random lengths (default), shared prefixes, or a ShareGPT file (--dataset-path)",
        ),
        Setting("--dataset-path", type=Path, help="ShareGPT-format JSON"),
        Setting("--num-prompts", type=int, default=24, help="requests per run"),
        Setting(
            "--input-len-range",
            default="16,256",
            help="MIN,MAX prompt tokens (shared-prefix: suffix tokens after the prefix)",
        ),
        Setting("--output-len-range", default="16,128", help="MIN,MAX output tokens"),
        Setting("--num-prefixes", type=int, default=4, help="shared-prefix: prefixes"),
        Setting("--prefix-len", type=int, default=256, help="shared-prefix: prefix tokens"),
        Setting(
            "--sharegpt-output-len",
            type=int,
            help="sharegpt: fixed output tokens instead of the reference answer's length",
        ),
        Setting("--seed", type=int, default=0, help="seeds the dataset and the arrivals"),
    ),
)

LOAD = Group(
    "load",
    (
        Setting(
            "--request-rate", type=_rate, default=math.inf, help="requests/s; inf: all at once"
        ),
        Setting(
            "--burstiness",
            type=float,
            default=1.0,
            help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 more regular",
        ),
        Setting("--max-concurrency", type=int, help="requests in flight at most"),
        Setting(
            "--request-rate-sweep",
            type=_rates,
            metavar="R1,R2,...",
            format=_join,
            help="one run per rate (overrides --request-rate)",
        ),
    ),
)

OUTPUT = Group(
    "metrics and output",
    (
        Setting(
            "--goodput",
            nargs="+",
            split=" ",
            default=(),
            metavar="KEY:MS",
            help="SLOs in ms for goodput, keys ttft, tpot, e2el (e.g. ttft:500 tpot:100)",
        ),
        Setting("--percentiles", default="50,90,99", help="latency percentiles to report"),
        Setting("--num-warmups", type=int, default=1, help="untimed requests first"),
        Setting("--output-json", type=Path, help="write every metric here"),
        Setting("--plot-dir", type=Path, help="write PNG plots here"),
        Setting("--disable-tqdm", switch=True, help="no progress bar"),
        Setting(
            "--smoke",
            switch=True,
            help=f"CI mode: {SMOKE_NUM_PROMPTS} tiny requests ({SMOKE_INPUT_LEN} prompt, "
            f"{SMOKE_OUTPUT_LEN} output tokens)",
        ),
    ),
)

COMPARE = Group(
    "compare",
    (
        Setting(
            "--compare",
            switch=True,
            help="run transformers one at a time, in static batches of 8 and with its "
            "continuous batching, then pdserve colocated and disaggregated clusters it starts "
            "itself (and vLLM's CPU build if --systems names vllm-cpu), one after the other, "
            "and print output tok/s ratios",
        ),
        Setting(
            "--systems",
            help="with --compare, a comma-separated list of hf-serial, hf-static8, hf-cb "
            "(transformers continuous batching), pdserve-colocated, pdserve-disaggregated, "
            "vllm-cpu (vLLM's CPU build over its OpenAI API: --peer-script or --peer-url) "
            "(default: all but vllm-cpu)",
        ),
        Setting(
            "--peer-script",
            type=Path,
            help="vllm-cpu: the script that starts it (`SCRIPT start MODEL PORT`, model served "
            "as 'peer') on a free port with the model's converted folder, and stops it "
            "(`SCRIPT stop`) after its run; its log goes to --log-dir/vllm-cpu/ "
            "(default: ../shared/peers/vllm-cpu.sh beside the repository; PEER_THREADS passes "
            "through)",
        ),
        Setting(
            "--peer-url",
            metavar="URL",
            help="vllm-cpu: an already running peer (http://127.0.0.1:PORT), which bench "
            "neither starts nor stops (it keeps its memory while the other systems run)",
        ),
        Setting("--dtype", default="float32", choices=["float32", "bfloat16", "float16"]),
        Setting(
            "--cluster-arg",
            repeat=True,
            metavar="FLAG=VALUE",
            help="extra flag for the clusters' `pdserve up`, repeatable "
            "(e.g. --cluster-arg=--num-blocks=512)",
        ),
        Setting("--log-dir", type=Path, help="cluster logs (default: a temporary folder)"),
    ),
)

BENCH = (TARGET, CLIENT_TLS, DATASET, LOAD, OUTPUT, COMPARE)
"""Every ``pdserve bench`` setting (``--tls*`` as ``pdserve generate`` takes them)."""
