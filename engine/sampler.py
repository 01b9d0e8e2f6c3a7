"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Reproducibility: a seeded request draws its n-th token from a generator seeded with
``(seed, position)``, so the same seed gives the same output whichever worker or tier samples
which position (a prefill worker samples the first token, a decode worker the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.sampling import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads consecutive positions apart
_MASK64 = (1 << 63) - 1


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler needs of one row of logits."""

    params: SamplingParams
    position: int  # index of the token being sampled in the sequence


class Sampler:
    """Turns logits ``(S, V)`` into one token id per row."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = torch.Generator()
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: Sequence[SampleRequest]) -> list[int]:
        logits = logits.float()
        tokens = logits.max(dim=-1).indices  # (S,) greedy for every row; random rows overwrite
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            out = tokens.tolist()
            for row in random_rows:
                out[row] = self._sample_row(logits[row], requests[row])
            return out
        return tokens.tolist()

    def _sample_row(self, logits: torch.Tensor, request: SampleRequest) -> int:
        params = request.params
        probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
        generator = self._generator_for(request)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def _generator_for(self, request: SampleRequest) -> torch.Generator:
        if request.params.seed is None:
            return self._rng
        generator = torch.Generator()
        generator.manual_seed(((request.params.seed + 1) * _SEED_MIX + request.position) & _MASK64)
        return generator


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
