"""kvtransfer.send_budget: the sender's open transfers and per-peer byte budget (no sockets)."""

from __future__ import annotations

import threading

import pytest
import torch

from core.ticket import Fingerprint
from kvtransfer.send_budget import SendBudget, TransferSpec, check_pages

SPEC = TransferSpec("req", b"t" * 16, "tcp://decode:1", (3, 4))


def test_open_once_then_closed() -> None:
    budget = SendBudget(100)
    budget.open(SPEC)
    with pytest.raises(ValueError, match="already open"):
        budget.open(SPEC)
    assert budget.spec(SPEC.transfer_id) == SPEC and budget.num_open() == 1
    budget.close(SPEC.transfer_id)
    assert budget.spec(SPEC.transfer_id) is None and budget.num_open() == 0


def test_a_peer_with_nothing_queued_always_takes_one_more() -> None:
    budget = SendBudget(100)
    assert budget.reserve("a", 500, 0.0, threading.Event())  # larger than the budget
    assert not budget.reserve("a", 1, 0.05, threading.Event())  # over budget: times out
    assert budget.reserve("b", 100, 0.0, threading.Event())  # budgets are per peer


def test_reserve_waits_for_release() -> None:
    budget = SendBudget(100)
    assert budget.reserve("a", 80, 0.0, threading.Event())
    releaser = threading.Timer(0.1, budget.release, ("a", 80))
    releaser.start()
    try:
        assert budget.reserve("a", 80, 5.0, threading.Event())
    finally:
        releaser.join()


def test_released_bytes_leave_no_entry_and_never_go_negative() -> None:
    budget = SendBudget(100)
    assert budget.reserve("a", 60, 0.0, threading.Event())
    budget.release("a", 60)
    assert budget.queued("a") == 0
    budget.release("a", 1)  # more than queued (a bookkeeping slip): stays at zero
    assert budget.queued("a") == 0
    assert budget.reserve("a", 100, 0.0, threading.Event())


def test_stopping_during_the_wait_ends_it() -> None:
    budget = SendBudget(100)
    assert budget.reserve("a", 80, 0.0, threading.Event())
    stopping = threading.Event()
    threading.Timer(0.1, stopping.set).start()
    assert not budget.reserve("a", 80, 30.0, stopping)  # within the 0.5 s wait slice


def test_stopping_ends_the_wait() -> None:
    budget = SendBudget(100)
    assert budget.reserve("a", 80, 0.0, threading.Event())
    stopping = threading.Event()
    stopping.set()
    assert not budget.reserve("a", 80, 5.0, stopping)


def _fingerprint() -> Fingerprint:
    return Fingerprint(
        model="m",
        dtype="float32",
        block_size=4,
        num_layers=3,
        num_kv_heads=2,
        head_dim=8,
        backend="zmq",
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "layer_start", "match"),
    [
        ((1, 2, 2, 4, 2), torch.float32, 0, "6-D"),
        ((1, 2, 2, 4, 2, 8), torch.bfloat16, 0, "carries float32"),
        ((1, 2, 2, 4, 3, 8), torch.float32, 0, "fingerprint"),
        ((1, 2, 3, 4, 2, 8), torch.float32, 0, "3 blocks of pages for 2"),
        ((2, 2, 2, 4, 2, 8), torch.float32, 2, "out of range"),
    ],
)
def test_check_pages_refuses(
    shape: tuple[int, ...], dtype: torch.dtype, layer_start: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        check_pages(_fingerprint(), SPEC, layer_start, torch.zeros(shape, dtype=dtype))
    check_pages(_fingerprint(), SPEC, 1, torch.zeros((2, 2, 2, 4, 2, 8)))  # fits
