"""The sampler's device plumbing, run on CPU: every generator is made on the logits' device
(through the injectable factory), a step copies to the host once, and a row whose draw fails
fails alone; the spelled-out draw is ``torch.multinomial`` bit for bit."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from core.sampling import SamplingParams
from engine.sampler import BAD_PARAMS_TOKEN, Sampler, SampleRequest
from engine.token_draw import Generators, draw_rows, filtered_probs, request_seed

VOCAB = 300


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


def _req(position: int = 0, **params: object) -> SampleRequest:
    return SampleRequest(SamplingParams(**params), position)  # type: ignore[arg-type]


class RecordingFactory:
    """Makes CPU generators, and remembers the device each was asked for."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def __call__(self, device: torch.device) -> torch.Generator:
        self.devices.append(device)
        return torch.Generator()


def test_every_generator_is_made_on_the_logits_device() -> None:
    make = RecordingFactory()
    sampler = Sampler(seed=0, make_generator=make)
    logits = _logits(4)
    requests = [_req(1), _req(2, seed=7), _req(3, temperature=0.0), _req(4, seed=8, top_k=5)]
    sampler.sample(logits, requests)
    assert make.devices == [logits.device] * 3  # the shared one, and one per seeded row
    sampler.sample(logits, requests)
    assert make.devices == [logits.device] * 5  # the shared one is kept; seeded ones are fresh


def test_generators_are_kept_per_device_and_seeded_from_the_request() -> None:
    make = RecordingFactory()
    generators = Generators(5, make)
    cuda = torch.device("cuda", 3)  # only named: the factory makes CPU generators
    cpu = torch.device("cpu")
    assert generators.shared(cuda) is generators.shared(cuda)
    assert generators.shared(cpu) is not generators.shared(cuda)
    assert generators.shared(cpu).initial_seed() == 5
    seeded = generators.for_row(SamplingParams(seed=42), 9, cuda)
    assert seeded.initial_seed() == request_seed(42, 9)
    assert generators.for_row(SamplingParams(), 9, cuda) is generators.shared(cuda)
    assert make.devices == [cuda, cpu, cuda]


def test_the_draw_is_multinomial_bit_for_bit() -> None:
    logits = _logits(6, seed=1)
    params = [
        SamplingParams(temperature=0.7 + 0.1 * i, top_k=i * 7, top_p=1.0 - 0.1 * i, seed=i)
        for i in range(6)
    ]
    rows = list(range(6))
    draws = draw_rows(logits, rows, params, [torch.Generator().manual_seed(100 + i) for i in rows])
    want = [
        int(
            torch.multinomial(
                filtered_probs(logits[i], p.temperature, p.top_k, p.top_p),
                1,
                generator=torch.Generator().manual_seed(100 + i),
            )
        )
        for i, p in zip(rows, params, strict=True)
    ]
    assert draws.tokens.tolist() == want
    assert draws.valid.tolist() == [True] * 6
    assert draws.tokens.device == logits.device


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_a_row_that_cannot_be_drawn_is_invalid_alone(poison: float) -> None:
    logits = _logits(3, seed=2)
    bad = logits.clone()
    bad[1, 4] = poison  # past the sampler's greedy check: the draw's own check catches it
    params = [SamplingParams(seed=s) for s in range(3)]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in range(3)]

    draws = draw_rows(bad, [0, 1, 2], params, generators())
    clean = draw_rows(logits, [0, 1, 2], params, generators())
    assert draws.valid.tolist() == [True, False, True]
    assert draws.tokens[[0, 2]].tolist() == clean.tokens[[0, 2]].tolist()


def test_a_failed_draw_fails_that_row_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.token_draw as token_draw

    real = token_draw.filtered_probs

    def broken_for_top_k_3(
        logits: torch.Tensor, temperature: float, top_k: int, top_p: float
    ) -> torch.Tensor:
        probs = real(logits, temperature, top_k, top_p)
        return probs * math.nan if top_k == 3 else probs

    logits = _logits(4, seed=3)
    requests = [_req(1, seed=1), _req(2, seed=2, top_k=3), _req(3, temperature=0.0), _req(4)]
    want = Sampler(seed=9).sample(logits, requests)
    monkeypatch.setattr(token_draw, "filtered_probs", broken_for_top_k_3)
    got = Sampler(seed=9).sample(logits, requests)
    assert got[1] == BAD_PARAMS_TOKEN
    assert [got[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]


@pytest.fixture
def host_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records each Python-level device-to-host read of a tensor (``tolist``, ``item``)."""
    seen: list[str] = []
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: object, _real=real, _name=name) -> object:
            seen.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    yield seen


def test_one_host_copy_per_step(host_copies: list[str]) -> None:
    logits = _logits(8, seed=4)
    requests = [
        _req(i, temperature=0.0 if i % 3 == 0 else 0.9, seed=i if i % 2 else None, top_k=i * 5)
        for i in range(8)
    ]
    requests[5] = _req(5, temperature=0.8, top_p=0.8, min_p=0.05, seed=3)
    tokens = Sampler(seed=0).sample(logits, requests)
    assert host_copies == ["tolist"]
    assert all(0 <= t < VOCAB for t in tokens)
