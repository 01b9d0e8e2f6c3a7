"""What a gateway process costs to start: time until it accepts connections, resident memory,
and whether libtorch is mapped into it, for one or more source trees side by side in one run.

    .venv/bin/python benchmarks/gateway_footprint.py                       # this tree
    .venv/bin/python benchmarks/gateway_footprint.py --tree /tmp/old-checkout --runs 7

Each run starts ``python -m pdserve.cli gateway`` on the default model, pointed at a decode
address nobody serves (the gateway starts anyway and waits for workers), and reads
``/proc/<pid>/status`` and ``/proc/<pid>/maps`` once it listens. Trees are interleaved run by
run, so a noisy neighbour affects each alike. An older checkout needs its generated protos
(``python -m protos.build`` in it). Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    start_s: float
    rss_mib: float
    libtorch: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"the gateway did not listen within {timeout_s:.0f} s")


def measure(tree: Path, python: str) -> Sample:
    port = _free_port()
    argv = [
        python,
        "-m",
        "pdserve.cli",
        "gateway",
        "--listen",
        f"127.0.0.1:{port}",
        "--decode",
        f"127.0.0.1:{_free_port()}",
        "--metrics-port",
        "0",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(proc, port)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let start-up allocations settle
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        return Sample(elapsed, rss_kib / 1024, "libtorch" in maps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="source tree (repeat)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run them with")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = args.tree or [ROOT]
    samples: dict[Path, list[Sample]] = {tree: [] for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            samples[tree].append(measure(tree, args.python))
    print(f"{'tree':<40} {'start s (median, min)':>22} {'RSS MiB':>9} {'libtorch':>9}")
    for tree, runs in samples.items():
        start = statistics.median(s.start_s for s in runs)
        fastest = min(s.start_s for s in runs)
        rss = statistics.median(s.rss_mib for s in runs)
        torch = "yes" if any(s.libtorch for s in runs) else "no"
        print(f"{tree!s:<40} {start:>14.2f} ({fastest:.2f}) {rss:>9.0f} {torch:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
