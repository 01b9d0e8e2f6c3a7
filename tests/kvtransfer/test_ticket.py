"""check_compatible: a prefill worker refuses a ticket whose KV layout differs from its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.kv_cache import KVCache
from kvtransfer.ticket import IncompatiblePeerError, TransferTicket, check_compatible


@pytest.fixture(scope="module")
def cache() -> KVCache:
    return KVCache(3, 8, 4, 2, 16, torch.bfloat16, torch.device("cpu"))


def ticket(**overrides: object) -> TransferTicket:
    fields: dict[str, object] = dict(
        transfer_id=bytes(16),
        kv_endpoint="tcp://127.0.0.1:5555",
        block_ids=(4, 1, 6),
        block_size=4,
        num_layers=3,
        num_kv_heads=2,
        head_dim=16,
        dtype="bfloat16",
        lease_s=30.0,
    )
    fields.update(overrides)
    return TransferTicket(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", ["tcp://10.0.0.1:7000", "ipc:///tmp/pdserve-kv.sock"])
def test_matching_ticket_passes(cache: KVCache, endpoint: str) -> None:
    check_compatible(ticket(kv_endpoint=endpoint), cache, num_prompt_blocks=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 16),
        ("num_layers", 4),
        ("num_kv_heads", 1),
        ("head_dim", 64),
        ("dtype", "float16"),
        ("dtype", "torch.bfloat16"),
    ],
)
def test_each_mismatched_field_is_named(cache: KVCache, field: str, value: object) -> None:
    with pytest.raises(IncompatiblePeerError, match=field) as info:
        check_compatible(ticket(**{field: value}), cache, num_prompt_blocks=3)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("block_ids", [(), (1, 2), (1, 2, 3, 4)])
def test_block_count_must_match_the_prompt(cache: KVCache, block_ids: tuple[int, ...]) -> None:
    with pytest.raises(IncompatiblePeerError, match="num_blocks"):
        check_compatible(ticket(block_ids=block_ids), cache, num_prompt_blocks=3)


@pytest.mark.parametrize("endpoint", ["inproc://kv", "http://host:1", "", "127.0.0.1:5555"])
def test_unsupported_endpoint(cache: KVCache, endpoint: str) -> None:
    with pytest.raises(IncompatiblePeerError, match="endpoint"):
        check_compatible(ticket(kv_endpoint=endpoint), cache, num_prompt_blocks=3)


def test_first_mismatch_is_reported(cache: KVCache) -> None:
    bad = dataclasses.replace(ticket(), head_dim=1, dtype="float32", block_size=2)
    with pytest.raises(IncompatiblePeerError, match="block_size"):
        check_compatible(bad, cache, num_prompt_blocks=3)
