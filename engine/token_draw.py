"""Drawing sampled tokens on the logits' device: the sampler's generators and the batch's draws.

torch draws on a device only from a generator of that device (a CPU generator with CUDA
probabilities raises), so every generator here is made on the logits' device, through a
:data:`GeneratorFactory` that a test may replace. :class:`Generators` keeps one shared generator
per device for the unseeded rows and makes a fresh one per seeded row, seeded from
``(seed, position)``.

A draw is ``torch.multinomial(probs, 1, generator=g)`` spelled out as the exponential race it
runs for one sample (ATen's ``multinomial``: ``argmax(probs / q)``, ``q ~ Exp(1)`` drawn from
``g``): the same numbers from the same generator, bit for bit, minus multinomial's validity
check, which copies a flag to the host for every call (one stall per sampled row on CUDA) and
raises, so one broken row would fail every row after it. Here validity is a device tensor per
row; the caller folds it into the batch's one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from core.sampling import SamplingParams

GeneratorFactory = Callable[[torch.device], torch.Generator]
"""Makes an unseeded generator on the given device."""

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive positions apart
_MASK64 = (1 << 63) - 1


def device_generator(device: torch.device) -> torch.Generator:
    """A new generator on ``device`` (the default :data:`GeneratorFactory`)."""
    return torch.Generator(device=device)


def request_seed(seed: int, position: int) -> int:
    """The seed of the generator that draws a seeded request's token at ``position``."""
    return ((seed + 1) * _SEED_MIX + position) & _MASK64


class Generators:
    """The sampler's generators, made on first use on each device that logits come from: one
    shared per device for unseeded rows (seeded from ``seed``, or from fresh entropy when
    None), and a fresh one per seeded row, so a seeded row's draw does not depend on its batch,
    its worker or its device's history."""

    def __init__(self, seed: int | None, make: GeneratorFactory = device_generator) -> None:
        self._seed = seed
        self._make = make
        self._shared: dict[torch.device, torch.Generator] = {}

    def shared(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``'s unseeded rows (its state carries over between calls)."""
        generator = self._shared.get(device)
        if generator is None:
            generator = self._make(device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._shared[device] = generator
        return generator

    def for_row(
        self, params: SamplingParams, position: int, device: torch.device
    ) -> torch.Generator:
        """The generator that draws the token at ``position`` for a request with ``params``."""
        if params.seed is None:
            return self.shared(device)
        generator = self._make(device)
        generator.manual_seed(request_seed(params.seed, position))
        return generator


class Draws(NamedTuple):
    tokens: torch.Tensor  # (R,) long, on the logits' device
    valid: torch.Tensor  # (R,) bool: the row's probabilities could be drawn from


def draw_rows(
    logits: torch.Tensor,
    rows: Sequence[int],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> Draws:
    """One token for each of ``rows`` of ``logits`` (S, V), after its temperature, top-k and
    top-p, from its generator (on the logits' device). No host copy: where a row's
    probabilities are not a distribution (NaN, inf, negative, or all zero: what multinomial
    would raise for) ``valid`` is False and its token is meaningless."""
    tokens: list[torch.Tensor] = []
    valid: list[torch.Tensor] = []
    for row, p, generator in zip(rows, params, generators, strict=True):
        probs = filtered_probs(logits[row], p.temperature, p.top_k, p.top_p)  # (V,)
        race = torch.empty_like(probs).exponential_(1, generator=generator)  # (V,)
        tokens.append(torch.argmax(probs / race))
        valid.append(torch.isfinite(probs).all() & (probs >= 0).all() & (probs.sum() > 0))
    return Draws(torch.stack(tokens), torch.stack(valid))


def filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Probabilities (V,) after temperature, top-k and top-p filtering."""
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop_sorted = cumulative - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return probs
