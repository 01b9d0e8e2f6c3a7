"""Another serving system beside pdserve in ``pdserve bench --compare``: vLLM's CPU build,
reached through its OpenAI HTTP API (:mod:`pdserve.bench.openai_http`).

Either the bench starts it with a peer script (``--peer-script``, by default
``../shared/peers/vllm-cpu.sh`` beside the repository) and stops it after its run, or the user
names one already running (``--peer-url``), which the bench neither starts nor stops. The
script's contract, which ``vllm-cpu.sh`` keeps:

- ``SCRIPT start MODEL PORT``: serve the transformers folder MODEL as model ``peer`` on
  ``127.0.0.1:PORT``, in the background; exit 0 once it answers, nonzero if it never does;
- ``SCRIPT stop``: stop what ``start`` started (nothing to stop is no error);
- both keep the server's pid and log under ``PEER_RUN_DIR``, which the bench points into its
  ``--log-dir``; ``PEER_DTYPE`` is set to the bench's ``--dtype`` (the weights' dtype must be
  the clusters'); ``PEER_THREADS`` and the script's other variables pass through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pdserve.local_cluster import free_port_range

PEER_MODEL = "peer"
"""The model name the script serves its model as."""
START_TIMEOUT_S = 900.0
"""The script's start: its first start compiles for minutes (and installs, if it must)."""
STOP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 2000


def default_peer_script() -> Path | None:
    """``../shared/peers/vllm-cpu.sh`` beside the repository this package runs from, if any."""
    repo = Path(__file__).resolve().parents[2]
    script = repo.parent / "shared" / "peers" / "vllm-cpu.sh"
    return script if script.is_file() else None


def peer_base_url(url: str) -> str:
    """``http://host:port`` or ``.../v1`` as the OpenAI client's base URL (up to ``/v1``)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--peer-url must be an http:// or https:// URL: {url!r}")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


@dataclass(frozen=True)
class PeerConfig:
    """Where the peer comes from: ``url`` (already running) or ``script`` (started here)."""

    script: Path | None = None
    url: str | None = None

    @classmethod
    def resolve(cls, script: Path | None, url: str | None) -> PeerConfig:
        """The flags' values, checked before any system runs: a URL wins over a script; with
        neither, the default script must exist."""
        if url:
            return cls(url=peer_base_url(url))
        script = script or default_peer_script()
        if script is None:
            raise ValueError(
                "vllm-cpu needs --peer-url, or --peer-script (no ../shared/peers/vllm-cpu.sh "
                "beside the repository)"
            )
        if not script.is_file():
            raise ValueError(f"--peer-script {script}: no such file")
        return cls(script=script)


class RunningPeer(NamedTuple):
    """A peer that answers: its base URL, model name (None: ask ``GET /models``) and origin."""

    base_url: str
    model: str | None
    description: str


@contextmanager
def running_peer(
    cfg: PeerConfig, model_path: Path, log_dir: Path, dtype: str = "float32"
) -> Iterator[RunningPeer]:
    """The peer, for the length of the ``with`` block: one the script starts on a free port
    with ``dtype`` weights (and stops on every exit, a failed or interrupted start included),
    or ``cfg.url`` (whose dtype is the user's to match)."""
    if cfg.url is not None:
        yield RunningPeer(cfg.url, None, "vLLM CPU build, already running")
        return
    assert cfg.script is not None, "PeerConfig.resolve gives a script or a URL"
    port = free_port_range(1)
    run_dir = log_dir / "vllm-cpu"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PEER_RUN_DIR": str(run_dir), "PEER_DTYPE": dtype}
    threads = env.get("PEER_THREADS", "all cores")
    print(f"starting vllm-cpu: {cfg.script} start ... {port}", file=sys.stderr, flush=True)
    try:
        _script(cfg.script, ("start", str(model_path), str(port)), env, run_dir, START_TIMEOUT_S)
        description = f"vLLM CPU build via {cfg.script.name} ({dtype}, PEER_THREADS={threads})"
        yield RunningPeer(f"http://127.0.0.1:{port}/v1", PEER_MODEL, description)
    finally:
        _script(cfg.script, ("stop",), env, run_dir, STOP_TIMEOUT_S, check=False)


def _script(
    script: Path,
    args: tuple[str, ...],
    env: Mapping[str, str],
    run_dir: Path,
    timeout_s: float,
    *,
    check: bool = True,
) -> None:
    """Run ``bash SCRIPT ARGS...``, its output appended to ``run_dir/script.log``; with
    ``check``, a nonzero exit or a timeout is a RuntimeError quoting the log's tail."""
    log = run_dir / "script.log"
    with log.open("ab") as out:
        try:
            done = subprocess.run(
                ["bash", str(script), *args],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
            failure = None if done.returncode == 0 else f"exited {done.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"did not finish in {timeout_s:g} s"
    if check and failure is not None:
        tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"{script} {args[0]} {failure}:\n{tail}")
