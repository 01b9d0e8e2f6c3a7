"""The gloo/nccl rendezvous (kvtransfer.datapath.GroupHost): its TCPStore listens on the pair
host only, its key prefix is secret on a keyed channel, and a joiner must prove the fleet key
over the group before the pair is used."""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kvtransfer import datapath
from kvtransfer.datapath import Backend, GroupHost, PairLinkError, join_pair
from kvtransfer.wire import FrameAuth

KEY = b"0123456789abcdef-fleet-key"
TIMEOUT_S = 10.0


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (Linux /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _pair(host_auth: FrameAuth, joiner_auth: FrameAuth) -> tuple[object, object]:
    host = GroupHost(Backend.GLOO, "127.0.0.1", TIMEOUT_S, host_auth.stream_proof)
    offer = host.offer()
    try:
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(host.accept, offer)
            try:
                joined: object = join_pair(Backend.GLOO, offer, TIMEOUT_S, joiner_auth.stream_proof)
            except Exception as exc:  # the joiner may see the refusal as a broken group
                joined = exc
            try:
                return accepted.result(timeout=2 * TIMEOUT_S), joined
            except Exception as exc:
                return exc, joined
    finally:
        host.close()


def test_the_store_listens_on_the_pair_host_only() -> None:
    host = GroupHost(Backend.GLOO, "127.0.0.1", TIMEOUT_S)
    try:
        offer = host.offer()
        assert _listening_addresses(int(str(offer["store_port"]))) == {"127.0.0.1"}
    finally:
        host.close()


def test_a_keyed_pair_is_proven_and_carries_payloads() -> None:
    auth = FrameAuth(KEY)
    offer_token = bytes.fromhex(str(GroupHost(Backend.GLOO, "127.0.0.1", 1.0).offer()["token"]))
    assert auth.stream_proof(offer_token) != offer_token  # the store prefix is not on the wire
    accepted, joined = _pair(auth, auth)
    assert not isinstance(accepted, Exception) and not isinstance(joined, Exception)
    payload = torch.arange(32, dtype=torch.float32)
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(joined.send, payload)  # type: ignore[attr-defined]
        got = accepted.receive((32,), torch.float32, torch.device("cpu"))  # type: ignore[attr-defined]
        sent.result(timeout=TIMEOUT_S)
    assert torch.equal(got, payload)


def test_a_joiner_with_another_key_never_meets_the_pair() -> None:
    """Another key derives another store prefix: the two ends never meet, and the decode
    side gives up at its timeout."""
    host = GroupHost(Backend.GLOO, "127.0.0.1", 1.0, FrameAuth(KEY).stream_proof)
    other = FrameAuth(b"not-the-fleet-key-but-long-enough")
    offer = host.offer()
    try:
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(host.accept, offer)
            with pytest.raises(RuntimeError):
                join_pair(Backend.GLOO, offer, 1.0, other.stream_proof)
            with pytest.raises(RuntimeError):
                accepted.result(timeout=10)
    finally:
        host.close()


def test_a_joiner_that_learned_the_prefix_but_lacks_the_key_is_refused() -> None:
    """Someone who reached the store and read its keys (``TCPStore`` lists them to anyone)
    may join the group under the right prefix, but cannot answer the challenge: the decode
    side refuses the pair before any page moves."""
    auth = FrameAuth(KEY)
    host = GroupHost(Backend.GLOO, "127.0.0.1", TIMEOUT_S, auth.stream_proof)
    offer = host.offer()
    try:
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(host.accept, offer)
            timeout = datetime.timedelta(seconds=TIMEOUT_S)
            store = dist.TCPStore("127.0.0.1", int(str(offer["store_port"])), timeout=timeout)
            prefix = datapath._store_prefix(offer, auth.stream_proof)  # learned, not derived
            intruder = datapath.GroupLink(
                datapath.make_group(Backend.GLOO, dist.PrefixStore(prefix, store), 1, timeout), 0
            )
            intruder.receive((16,), torch.uint8, torch.device("cpu"))  # the challenge
            intruder.send(torch.zeros(16, dtype=torch.uint8))  # a guess
            with pytest.raises(PairLinkError, match="prove the fleet key"):
                accepted.result(timeout=TIMEOUT_S)
    finally:
        host.close()


def test_a_malformed_token_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed token"):
        join_pair(Backend.GLOO, {"store_host": "127.0.0.1", "store_port": 1, "token": "ab"}, 1.0)
