"""Speculative decoding's proposing half, no model: prompt lookup against a brute-force search,
the kept prefix of a verified draft, and the per-sequence adaptation."""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import pytest

from core.pool_stats import SpecStats
from core.sampling import SamplingParams
from engine.config import SpeculativeConfig, SpeculativeMethod
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from engine.speculative import (
    MAX_BACKOFF_STEPS,
    NgramIndex,
    SpecState,
    Speculator,
    accepted_tokens,
)


def brute_force(tokens: Seq[int], k: int, min_n: int, max_n: int) -> tuple[int, ...]:
    """The continuation of the latest earlier occurrence of the longest trailing n-gram."""
    n = len(tokens)
    for size in range(min(max_n, n - 1), min_n - 1, -1):
        suffix = list(tokens[n - size :])
        for end in range(n - 1, size - 1, -1):  # latest first; never the suffix itself
            if list(tokens[end - size : end]) == suffix:
                return tuple(tokens[end : end + k])
    return ()


@pytest.mark.parametrize("seed", range(6))
def test_incremental_lookup_matches_a_brute_force_search(seed: int) -> None:
    rng = random.Random(seed)
    min_n, max_n = rng.choice([(1, 3), (2, 4), (3, 3)])
    index = NgramIndex(min_n, max_n)
    tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
    for _ in range(300):
        k = rng.randrange(1, 6)
        assert index.propose(tokens, k) == brute_force(tokens, k, min_n, max_n), tokens
        tokens.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))  # kept + 1 per step


def test_lookup_proposes_what_followed_the_latest_occurrence() -> None:
    index = NgramIndex(2, 4)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    assert index.propose(tokens, 3) == (4, 5, 1)  # "1 2" last seen at 5-6, then 4 5 1
    assert index.propose([*tokens, 4], 2) == (5, 1)  # "1 2 4" beats the shorter matches


def test_no_match_proposes_nothing() -> None:
    assert NgramIndex(2, 4).propose([1, 2, 3, 4, 5], 3) == ()
    assert NgramIndex(2, 4).propose([1], 3) == ()


@pytest.mark.parametrize(
    ("draft", "sampled", "kept"),
    [
        ((5, 6, 7), (5, 6, 7, 8), (5, 6, 7, 8)),  # all kept, then the bonus token
        ((5, 6, 7), (5, 9, 7, 8), (5, 9)),  # the first disagreement ends it, its sample stays
        ((5, 6, 7), (4, 6, 7, 8), (4,)),  # nothing kept: the plain next token
        ((5,), (5, -2), (5, -2)),  # a failed row is never a draft token: it ends the list
        ((), (3,), (3,)),
    ],
)
def test_accepted_tokens(
    draft: tuple[int, ...], sampled: tuple[int, ...], kept: tuple[int, ...]
) -> None:
    assert accepted_tokens(draft, sampled) == kept


def test_accepted_tokens_needs_one_sample_per_row() -> None:
    with pytest.raises(ValueError, match="need 3 samples"):
        accepted_tokens((1, 2), (1, 2))


def test_draft_length_grows_on_success_and_shrinks_to_what_was_kept() -> None:
    state = SpecState(k=2)
    state.record(proposed=2, kept=2, max_k=4)
    assert state.k == 3
    state.record(proposed=3, kept=3, max_k=4)
    state.record(proposed=4, kept=4, max_k=4)
    assert state.k == 4  # capped
    state.record(proposed=4, kept=1, max_k=4)
    assert state.k == 2 and state.pause == 0


def test_rejected_drafts_back_off_exponentially_and_success_resets() -> None:
    state = SpecState(k=3)
    pauses = []
    for _ in range(10):
        state.record(proposed=1, kept=0, max_k=3)
        pauses.append(state.pause)
        state.pause = 0
    assert pauses[:5] == [0, 1, 2, 4, 8]
    assert max(pauses) == MAX_BACKOFF_STEPS
    state.record(proposed=1, kept=1, max_k=3)
    assert state.misses == 0


def test_speculator_sizes_fills_and_counts_drafts() -> None:
    spec = Speculator(SpeculativeConfig(SpeculativeMethod.NGRAM, num_tokens=3))
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 1, 2], 8, SamplingParams())
    seq.spec = spec.new_state()
    assert seq.spec is not None
    assert spec.slots(seq.spec, limit=10) == 3  # state.k
    assert spec.slots(seq.spec, limit=2) == 2
    assert spec.slots(seq.spec, limit=0) == 0
    seq.spec.pause = 2
    assert [spec.slots(seq.spec, limit=3) for _ in range(3)] == [0, 0, 3]
    other = Sequence("b", [9, 8, 7], 3, SamplingParams())
    other.spec = spec.new_state()
    batch = ScheduledBatch(
        (ScheduledSeq(seq, 1, True, draft_slots=2), ScheduledSeq(other, 1, True, draft_slots=3))
    )
    filled = spec.fill(batch).items
    assert filled[0].draft == (3, 4) and filled[0].num_new_tokens == 3  # cut to its slots
    assert filled[1].draft == () and filled[1].num_new_tokens == 1  # no match: plain decode
    spec.record(seq.spec, proposed=2, kept=1)
    assert spec.counters.snapshot() == SpecStats(2, 1, 1)


def test_off_gives_no_state_and_no_draft() -> None:
    spec = Speculator(SpeculativeConfig())
    assert not spec.enabled and spec.new_state() is None
    assert spec.slots(None, limit=3) == 0


def test_draft_needs_its_model_and_its_proposer() -> None:
    with pytest.raises(ValueError, match="--draft-model"):
        SpeculativeConfig(SpeculativeMethod.DRAFT)
    with pytest.raises(ValueError, match="--draft-model"):
        SpeculativeConfig(SpeculativeMethod.NGRAM, draft_model="x")
    with pytest.raises(ValueError, match="proposer"):
        Speculator(SpeculativeConfig(SpeculativeMethod.DRAFT, draft_model="x"))


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SpeculativeConfig(num_tokens=0)
    with pytest.raises(ValueError, match="prompt-lookup-min"):
        SpeculativeConfig(ngram_min=3, ngram_max=2)
