"""A prefill worker that dies mid-transfer, for the lease tests; and :class:`DyingSenders`,
the test side's handle on such processes.

Run as ``python -m tests.kvtransfer.dying_sender``; tests start it early, since importing torch
is the slow part. It prints ``ready`` once imported, then reads one line of JSON (fingerprint,
endpoint, blocks, transfer id, how many layers), opens that transfer and pushes the first layers
of :func:`harness.random_pages` (same seed, same bytes as in the test) and prints ``sent``; on
the next line it SIGKILLs itself: no DONE, no ABORT, no socket shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import structlog

from core.ticket import Fingerprint
from kvtransfer import wire
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.harness import GROUP_TIMEOUT_S, Channel, random_pages, tid

ROOT = Path(__file__).resolve().parents[2]


class DyingSenders:
    """The test side: sender processes started ahead of need (at the start of the session:
    importing torch takes seconds on a busy machine), one per test."""

    def __init__(self, logs: Path, count: int) -> None:
        self.logs = logs
        self.taken: list[subprocess.Popen[str]] = []
        self.procs = [self._spawn() for _ in range(count)]

    def _spawn(self) -> subprocess.Popen[str]:
        n = len(self.taken) + len(getattr(self, "procs", ()))
        with (self.logs / f"sender-{n}.log").open("w") as log:  # the child keeps its own fd
            return subprocess.Popen(
                [sys.executable, "-m", "tests.kvtransfer.dying_sender"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def take(self) -> subprocess.Popen[str]:
        """A sender process that has imported everything and waits for its orders."""
        proc = self.procs.pop() if self.procs else self._spawn()
        self.taken.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc

    @staticmethod
    def push(proc: subprocess.Popen[str], ch: Channel, blocks: list[int], layers: int) -> None:
        """Open transfer 1 to ``ch`` and push its first ``layers`` layers."""
        config = {
            "fingerprint": ch.receiver_fp.to_fields(),
            "endpoint": ch.endpoint,
            "block_ids": blocks,
            "transfer_id": tid(1).hex(),
            "layers": layers,
            "seed": 1,
            "timeout_s": GROUP_TIMEOUT_S,
        }
        tell(proc, json.dumps(config), "sent\n")

    def close(self) -> None:
        for proc in [*self.procs, *self.taken]:
            proc.kill()
            proc.communicate()


def tell(proc: subprocess.Popen[str], line: str, answer: str | None = None) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    if answer is not None:
        assert proc.stdout.readline() == answer


def main() -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    print("ready", flush=True)
    config = json.loads(sys.stdin.readline())
    fp = Fingerprint(**config["fingerprint"])
    endpoint, blocks = config["endpoint"], tuple(config["block_ids"])
    transfer_id = bytes.fromhex(config["transfer_id"])
    sender = KVSender(fp, wire.FrameAuth(None), handshake_timeout_s=config["timeout_s"])
    sender.start()
    sender.open(TransferSpec("dying", transfer_id, endpoint, blocks))
    pages = random_pages(fp, len(blocks), config["seed"])
    for layer in range(config["layers"]):
        sender.send_pages(transfer_id, layer, pages[layer : layer + 1])
    print("sent", flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
