"""Sampler and filtered_probs: greedy, top-k, top-p, temperature and per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch

from core.sampling import SamplingParams
from engine.sampler import Sampler, SampleRequest, filtered_probs

VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, VOCAB), generator=generator) * 3  # (S, V)


def req(position: int = 0, **params: object) -> SampleRequest:
    return SampleRequest(SamplingParams(**params), position)  # type: ignore[arg-type]


def test_greedy_is_argmax() -> None:
    logits = random_logits(6)
    tokens = Sampler(seed=0).sample(logits, [req(temperature=0.0)] * 6)
    assert tokens == torch.argmax(logits, dim=-1).tolist()


def test_top_k_one_is_argmax_at_any_temperature() -> None:
    logits = random_logits(6, seed=1)
    requests = [req(temperature=5.0, top_k=1, seed=s) for s in range(6)]
    assert SamplingParams(temperature=5.0, top_k=1).greedy
    assert Sampler(seed=0).sample(logits, requests) == torch.argmax(logits, dim=-1).tolist()


def test_half_precision_logits_are_accepted() -> None:
    logits = random_logits(3, seed=2)
    tokens = Sampler(seed=0).sample(logits.half(), [req(temperature=0.0)] * 3)
    assert tokens == torch.argmax(logits.half().float(), dim=-1).tolist()


def test_mixed_batch_greedy_rows_stay_greedy() -> None:
    logits = random_logits(4, seed=3)
    requests = [req(temperature=0.0), req(seed=1), req(temperature=0.0), req(seed=2, top_k=3)]
    tokens = Sampler(seed=0).sample(logits, requests)
    argmax = torch.argmax(logits, dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    assert tokens[3] in torch.topk(logits[3], 3).indices.tolist()
    assert all(isinstance(t, int) for t in tokens)


def test_seeded_sampling_is_reproducible_across_samplers() -> None:
    logits = torch.zeros((1, 1000))  # uniform: every draw is pure generator output
    first = [Sampler(seed=1).sample(logits, [req(p, seed=42)])[0] for p in range(20)]
    again = [Sampler(seed=999).sample(logits, [req(p, seed=42)])[0] for p in range(20)]
    assert first == again  # the sampler's own generator plays no part


def test_seeded_sampling_varies_across_positions_and_seeds() -> None:
    logits = torch.zeros((1, 1000))
    sampler = Sampler(seed=0)
    by_position = [sampler.sample(logits, [req(p, seed=42)])[0] for p in range(20)]
    assert len(set(by_position)) > 10
    by_seed = [sampler.sample(logits, [req(5, seed=s)])[0] for s in range(20)]
    assert len(set(by_seed)) > 10


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    logits = random_logits(3, seed=4)
    alone = Sampler(seed=0).sample(logits[1:2], [req(7, seed=3)])
    batched = Sampler(seed=5).sample(logits, [req(1), req(7, seed=3), req(2)])
    assert batched[1] == alone[0]


def test_unseeded_sampler_seed_makes_runs_reproducible() -> None:
    logits = torch.zeros((8, 1000))
    requests = [req(p) for p in range(8)]
    assert Sampler(seed=11).sample(logits, requests) == Sampler(seed=11).sample(logits, requests)


def test_samples_stay_inside_the_filter() -> None:
    logits = random_logits(1, seed=5)[0]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    sampler = Sampler(seed=0)
    draws = {sampler.sample(logits[None], [req(p, top_k=3, seed=9)])[0] for p in range(200)}
    assert draws <= allowed
    assert len(draws) > 1


def test_top_k_keeps_exactly_k_highest() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, 0.0])
    probs = filtered_probs(logits, 1.0, 3, 1.0)
    assert torch.nonzero(probs).flatten().tolist() == [1, 3, 4]
    assert probs.sum().item() == pytest.approx(1.0)
    expected = torch.softmax(logits[[1, 3, 4]], dim=-1)
    torch.testing.assert_close(probs[[1, 3, 4]], expected)


@pytest.mark.parametrize("top_k", [0, 6, 100])
def test_top_k_off_or_at_least_vocab_keeps_everything(top_k: int) -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, 0.0])
    probs = filtered_probs(logits, 1.0, top_k, 1.0)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1))


# Hand-made distribution, shuffled so that vocabulary order is not probability order.
HAND = {3: 0.5, 0: 0.3, 4: 0.15, 1: 0.04, 2: 0.01}


def hand_logits() -> torch.Tensor:
    return torch.tensor([math.log(HAND[i]) for i in range(len(HAND))])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.3, {3}),  # the top token alone reaches 0.3
        (0.45, {3}),
        (0.55, {3, 0}),  # 0.5 < 0.55 <= 0.8
        (0.79, {3, 0}),
        (0.9, {3, 0, 4}),  # 0.8 < 0.9 <= 0.95
        (0.97, {3, 0, 4, 1}),
        (0.999, {3, 0, 4, 1, 2}),
        (1.0, {3, 0, 4, 1, 2}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p: float, kept: set[int]) -> None:
    probs = filtered_probs(hand_logits(), 1.0, 0, top_p)
    assert set(torch.nonzero(probs).flatten().tolist()) == kept
    assert probs.sum().item() == pytest.approx(1.0)
    mass = sum(HAND[i] for i in kept)
    for i in kept:
        assert probs[i].item() == pytest.approx(HAND[i] / mass, rel=1e-5)


def test_top_k_then_top_p() -> None:
    # top_k=2 renormalizes {3: 0.5, 0: 0.3} to {0.625, 0.375}; top_p=0.6 then keeps token 3 only
    probs = filtered_probs(hand_logits(), 1.0, 2, 0.6)
    assert torch.nonzero(probs).flatten().tolist() == [3]
    probs = filtered_probs(hand_logits(), 1.0, 2, 0.7)
    assert torch.nonzero(probs).flatten().tolist() == [0, 3]


def test_temperature_one_is_softmax() -> None:
    logits = random_logits(1, seed=6)[0]
    torch.testing.assert_close(filtered_probs(logits, 1.0, 0, 1.0), torch.softmax(logits, -1))


def test_temperature_scales_logits() -> None:
    logits = random_logits(1, seed=7)[0]
    torch.testing.assert_close(
        filtered_probs(logits, 2.0, 0, 1.0), torch.softmax(logits / 2.0, dim=-1)
    )


def test_temperature_sharpens_and_flattens() -> None:
    logits = random_logits(1, seed=8)[0]
    top = int(torch.argmax(logits))

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * torch.log(p.clamp_min(1e-30))).sum())

    cold, warm, hot = (filtered_probs(logits, t, 0, 1.0) for t in (0.01, 1.0, 20.0))
    assert entropy(cold) < entropy(warm) < entropy(hot)
    assert cold[top].item() > 0.99
    assert hot.max().item() - hot.min().item() < warm.max().item() - warm.min().item()
    for p in (cold, warm, hot):
        assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
