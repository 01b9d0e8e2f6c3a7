"""Seeds: the one a sampled request is drawn with, and each of its samples'.

Every worker that samples part of a request (prefill, decode, a resume elsewhere) draws
position ``p`` from ``(seed, p)`` (:mod:`engine.sampler`), so a request that samples carries a
seed on every hop: the caller's, or one the gateway draws (:func:`with_seed`). Sample ``i`` of
a request with ``n`` samples draws from ``seed + i`` (vLLM's convention; :func:`sample_seed`).
"""

from __future__ import annotations

import dataclasses
import secrets

from core.sampling import SamplingParams

SEED_BITS = 63  # assigned seeds fit the proto's uint64 and a signed 64-bit int alike
SEED_MODULUS = 2**64  # caller seeds lie in [0, 2**64): they travel as uint64


def with_seed(sampling: SamplingParams, samples: int = 1) -> SamplingParams:
    """``sampling`` with a random seed when it samples (temperature > 0) without one, small
    enough that each of ``samples`` seeds (``seed + i``) fits SEED_BITS; greedy and
    already-seeded requests are returned as they are."""
    if sampling.greedy or sampling.seed is not None:
        return sampling
    return dataclasses.replace(sampling, seed=secrets.randbelow(2**SEED_BITS - samples + 1))


def sample_seed(seed: int, index: int) -> int:
    """The seed sample ``index`` draws from (wrapping within the uint64 range)."""
    return (seed + index) % SEED_MODULUS
