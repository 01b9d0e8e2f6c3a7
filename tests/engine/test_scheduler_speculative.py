"""Speculative decoding's KV bookkeeping in the scheduler, no model.

A deterministic fake model (the next token is a hash of the tokens so far) samples each row of a
verified draft as a real one would; a shadow KV records which token each slot was computed for.
Over thousands of steps of random drafts (rejected, partly or wholly kept), preemption, aborts
and the prefix cache: every position a sequence counts as computed holds its own token's KV,
block tables cover exactly what the next step needs, the pool stays intact, and every output
equals what decoding without speculation produces."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence as Seq

import pytest

from core.prefix_hash import prefix_hashes
from core.sampling import FinishReason, SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig, SpeculativeConfig, SpeculativeMethod
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative import (
    DraftRequest,
    NgramProposer,
    SpecState,
    Speculator,
    accepted_tokens,
)

BS = 4
REQUESTS = 250
VOCAB = 11  # small: n-grams repeat, so prompt lookup proposes often


def next_token(tokens: Seq[int]) -> int:
    """The fake model's greedy choice: a function of the last three tokens (so text repeats)."""
    a, b, c = [*tokens[-3:], 0, 0, 0][:3]
    return (a * 7 + b * 3 + c * 5 + 1) % VOCAB


class MixedProposer:
    """Prompt lookup half the time, random tokens otherwise, random lengths: every acceptance
    pattern, from nothing kept to a whole draft."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ngram = NgramProposer(1, 3)

    def new_state(self, k: int) -> SpecState:
        return self.ngram.new_state(k)

    def propose(self, requests: Seq[DraftRequest]) -> list[tuple[int, ...]]:
        drafts = []
        for request in requests:
            if self.rng.random() < 0.5:
                drafts.extend(self.ngram.propose([request]))
            else:
                k = self.rng.randrange(request.k + 1)
                drafts.append(tuple(self.rng.randrange(VOCAB) for _ in range(k)))
        return drafts


class World:
    def __init__(self, seed: int, num_blocks: int, prefix_caching: bool) -> None:
        self.rng = random.Random(seed)
        self.pool = BlockPool(num_blocks)
        spec = SpeculativeConfig(SpeculativeMethod.NGRAM, num_tokens=4, max_seqs=64)
        config = SchedulerConfig(
            max_num_seqs=6, max_num_batched_tokens=40, enable_prefix_caching=prefix_caching
        )
        self.sched = Scheduler(config, self.pool, BS, Speculator(spec, MixedProposer(self.rng)))
        self.kv: dict[int, int] = {}  # slot -> the token whose KV it holds
        self.outputs: dict[str, list[int]] = {}
        self.prompts: dict[str, list[int]] = {}
        self.drafted = 0

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        self.prompts[rid] = prompt
        self.outputs[rid] = []
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.sched.add(Sequence(rid, list(prompt), len(prompt), sampling))

    def step(self) -> None:
        batch = self.sched.schedule()
        self.check()
        if batch is None:
            return
        batch = self.sched.speculator.fill(batch)
        sampled: list[tuple[int, ...]] = []
        for item in batch.items:
            seq, start = item.seq, item.seq.num_computed_tokens
            tokens = [*seq.token_ids, *item.draft]
            assert len(tokens) >= start + item.num_new_tokens
            assert not item.draft or len(tokens) == start + item.num_new_tokens
            assert len(seq.block_table) * BS >= start + item.num_new_tokens
            for p in range(start, start + item.num_new_tokens):  # the forward writes KV
                self.kv[seq.block_table[p // BS] * BS + p % BS] = tokens[p]
            if not item.sample:
                sampled.append((0,))
                continue
            rows = [next_token(tokens[: seq.num_tokens + j]) for j in range(len(item.draft) + 1)]
            sampled.append(accepted_tokens(item.draft, rows))
            self.drafted += bool(item.draft)
        before = [item.seq.num_tokens for item in batch.items]
        finished = self.sched.update(batch, sampled)
        for item, n in zip(batch.items, before, strict=True):
            if item.sample:
                self.outputs[item.seq.request_id].extend(item.seq.token_ids[n:])
        for f in finished:
            self.sched.release(f.seq, f.reason)
        for seq in self.sched.running:  # a rejected draft's blocks went back
            assert len(seq.block_table) <= -(-seq.num_tokens // BS), seq.request_id
        if self.rng.random() < 0.02 and self.sched.running:  # an abort now and then
            victim = self.rng.choice(self.sched.running)
            self.sched.abort(victim.request_id, FinishReason.CANCELLED)
            del self.outputs[victim.request_id]
        self.check()

    def check(self) -> None:
        self.pool.check_integrity()
        live = [*self.sched.waiting, *self.sched.running]
        owners = Counter(b for seq in live for b in seq.block_table)
        assert len(owners) == self.pool.num_used, "a used block belongs to no live sequence"
        for block, count in owners.items():  # shared only through the prefix cache
            assert self.pool.ref_count(block) == count, block
        for seq in live:
            for p in range(seq.num_computed_tokens):  # KV counted valid is the token's own
                slot = seq.block_table[p // BS] * BS + p % BS
                assert self.kv[slot] == seq.token_ids[p], (seq.request_id, p)
            hashed = len(seq.block_hashes)
            assert hashed * BS <= seq.num_computed_tokens
            assert seq.block_hashes == prefix_hashes(seq.token_ids[: hashed * BS], BS)


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


@pytest.mark.parametrize(("seed", "num_blocks"), [(0, 48), (1, 20), (2, 400), (3, 14)])
def test_random_drafts_leave_pool_prefix_cache_and_outputs_intact(
    seed: int, num_blocks: int
) -> None:
    world = World(seed, num_blocks, prefix_caching=True)
    rng = random.Random(seed + 100)
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(5, 14))] for _ in range(3)]
    max_tokens: dict[str, int] = {}
    added = 0
    steps = 0
    while steps < 20_000:
        if added < REQUESTS and rng.random() < 0.15:  # shared stems: the prefix cache hits
            rid = f"r{added}"
            prompt = [*rng.choice(stems), *(rng.randrange(VOCAB) for _ in range(rng.randrange(4)))]
            max_tokens[rid] = rng.randrange(1, 30)
            world.add(rid, prompt, max_tokens[rid])
            added += 1
        world.step()
        steps += 1
        if added == REQUESTS and not world.sched.has_work():
            break
    assert not world.sched.has_work() and world.pool.num_used == 0
    assert steps > 1000 and world.drafted > 500
    assert world.sched.speculator.counters.accepted > 0
    for rid, out in world.outputs.items():
        assert out == reference(world.prompts[rid], max_tokens[rid]), rid
    if num_blocks < 30:
        assert world.sched.num_preemptions > 0


def test_a_draft_never_preempts_and_shrinks_to_the_free_blocks() -> None:
    world = World(7, num_blocks=3, prefix_caching=False)
    world.sched.speculator = Speculator(world.sched.speculator.config, _Always((1, 1, 1, 1)))
    world.add("a", [3, 4, 5], max_tokens=20)  # 1 block
    world.add("b", [6, 7, 8, 9, 10], max_tokens=20)  # 2 blocks: the pool is full
    world.step()  # both prefill
    batch = world.sched.schedule()
    assert batch is not None
    assert world.sched.num_preemptions == 0
    for item in world.sched.speculator.fill(batch).items:
        free_room = len(item.seq.block_table) * BS - item.seq.num_computed_tokens - 1
        assert len(item.draft) <= free_room


class _Always:
    def __init__(self, draft: tuple[int, ...]) -> None:
        self.draft = draft

    def new_state(self, k: int) -> SpecState:
        return SpecState(k)

    def propose(self, requests: Seq[DraftRequest]) -> list[tuple[int, ...]]:
        return [self.draft[: r.k] for r in requests]


def test_exporting_and_constrained_sequences_never_speculate() -> None:
    world = World(9, num_blocks=64, prefix_caching=False)
    exporting = Sequence("x", [1, 2, 1, 2], 4, SamplingParams(max_tokens=5))
    exporting.export_kv = True
    world.sched.add(exporting)
    constrained = Sequence(
        "c",
        [1, 2, 1, 2],
        4,
        SamplingParams(max_tokens=5, structured=StructuredOutput(GrammarKind.REGEX, "a+")),
    )
    world.sched.add(constrained)
    plain = Sequence("p", [1, 2, 1, 2], 4, SamplingParams(max_tokens=5))
    world.sched.add(plain)
    assert exporting.spec is None and constrained.spec is None and plain.spec is not None
