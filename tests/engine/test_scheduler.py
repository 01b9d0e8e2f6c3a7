"""Scheduler: continuous batching, chunked prefill, FCFS admission, preemption and every exit
path returning blocks. No model: a fake runner hands ``update`` one token per sampling item,
and finished sequences are released the way the engine does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from core.errors import OutOfBlocksError
from core.sampling import FinishReason, SamplingParams
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.scheduler import Finished, ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

BS = 4  # block size: small, so block boundaries come often
EOS = 2
TokenFn = Callable[[Sequence], int]


def make_seq(
    request_id: str,
    prompt_len: int,
    *,
    max_tokens: int = 4,
    eos: frozenset[int] = frozenset({EOS}),
    ignore_eos: bool = False,
    stop_token_ids: tuple[int, ...] = (),
) -> Sequence:
    sampling = SamplingParams(
        max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids
    )
    prompt = [100 + i for i in range(prompt_len)]
    return Sequence(request_id, prompt, prompt_len, sampling, eos_token_ids=eos)


def position_token(seq: Sequence) -> int:
    """A token that records the position it was sampled for (never EOS)."""
    return 1000 + seq.num_tokens


class Sim:
    """A scheduler plus the engine's side of the contract, with invariant checks each step."""

    def __init__(
        self,
        num_blocks: int,
        *,
        max_num_seqs: int = 8,
        budget: int = 64,
        prefix_caching: bool = False,  # these prompts share prefixes; most tests test without
    ) -> None:
        self.pool = BlockPool(num_blocks)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            enable_prefix_caching=prefix_caching,
        )
        self.sched = Scheduler(config, self.pool, BS)
        self.finished: list[Finished] = []

    def step(self, token: TokenFn = position_token) -> tuple[ScheduledBatch | None, list[Finished]]:
        batch = self.sched.schedule()
        self.check()
        if batch is None:
            return None, []
        for item in batch.items:
            seq = item.seq
            assert item.num_new_tokens > 0
            # the sequence's blocks cover every token computed in this step
            assert len(seq.block_table) * BS >= seq.num_computed_tokens + item.num_new_tokens
            assert item.sample == (seq.num_computed_tokens + item.num_new_tokens == seq.num_tokens)
        sampled = [token(item.seq) if item.sample else 0 for item in batch.items]
        finished = self.sched.update(batch, sampled)
        for f in finished:
            self.sched.release(f.seq, f.reason)  # what Engine._collect does
        self.finished.extend(finished)
        self.check()
        return batch, finished

    def run(self, max_steps: int = 200) -> int:
        steps = 0
        while self.sched.has_work() and steps < max_steps:
            self.step()
            steps += 1
        return steps

    def check(self) -> None:
        """Every used block belongs to exactly one live sequence."""
        self.pool.check_integrity()
        live = [
            *self.sched.waiting,
            *self.sched.running,
            *self.sched.awaiting_kv.values(),
            *self.sched.parking.parked.values(),
        ]
        tables = [b for seq in live for b in seq.block_table]
        assert len(tables) == len(set(tables)), "a block is in two block tables"
        assert len(tables) == self.pool.num_used, "a used block belongs to no live sequence"
        assert len({id(s) for s in live}) == len(live), "a sequence is in two queues"
        for seq in self.sched.running:
            assert seq.status is SequenceStatus.RUNNING
        for seq in self.sched.waiting:
            assert seq.status is SequenceStatus.WAITING

    def all_free(self) -> bool:
        return self.pool.num_free == self.pool.num_blocks


def ids(batch: ScheduledBatch | None) -> list[str]:
    return [] if batch is None else [item.seq.request_id for item in batch.items]


# -- continuous batching ------------------------------------------------------------------------


def test_sequences_join_and_leave_at_any_step() -> None:
    sim = Sim(32)
    a = make_seq("a", 5, max_tokens=3)
    sim.sched.add(a)
    batch, _ = sim.step()
    assert ids(batch) == ["a"]
    assert batch is not None and batch.items[0].num_new_tokens == 5
    b = make_seq("b", 3, max_tokens=4)
    sim.sched.add(b)
    batch, _ = sim.step()
    assert ids(batch) == ["a", "b"]  # a decodes one token while b prefills
    assert [item.num_new_tokens for item in batch.items] == [1, 3]  # type: ignore[union-attr]
    c = make_seq("c", 2, max_tokens=1)
    sim.sched.add(c)
    batch, finished = sim.step()
    assert ids(batch) == ["a", "b", "c"]
    assert {f.seq.request_id for f in finished} == {"a", "c"}  # a: 3 tokens; c: 1 token
    assert a.finish_reason is FinishReason.LENGTH and a.num_completion_tokens == 3
    assert c.finish_reason is FinishReason.LENGTH and c.num_completion_tokens == 1
    assert a.block_table == [] and c.block_table == []
    batch, _ = sim.step()
    assert ids(batch) == ["b"]
    sim.run()
    assert b.is_finished and b.num_completion_tokens == 4
    assert sim.all_free()
    assert sim.sched.schedule() is None


def test_generated_tokens_are_appended_in_order() -> None:
    sim = Sim(8)
    seq = make_seq("a", 3, max_tokens=4)
    sim.sched.add(seq)
    sim.run()
    assert seq.token_ids == [100, 101, 102, 1003, 1004, 1005, 1006]
    assert seq.num_computed_tokens == 6  # the last token's KV is never computed
    assert sim.all_free()


def test_long_prompt_is_chunked_and_samples_only_on_the_last_chunk() -> None:
    sim = Sim(16, budget=8)
    seq = make_seq("long", 20, max_tokens=2)
    sim.sched.add(seq)
    chunks = []
    for _ in range(3):
        batch, _ = sim.step()
        assert batch is not None
        (item,) = batch.items
        chunks.append((item.num_new_tokens, item.sample))
        assert batch.num_tokens <= 8
    assert chunks == [(8, False), (8, False), (4, True)]
    assert seq.num_computed_tokens == 20
    assert seq.num_completion_tokens == 1
    assert seq.status is SequenceStatus.RUNNING
    assert len(seq.block_table) == 5
    sim.run()
    assert seq.finish_reason is FinishReason.LENGTH and sim.all_free()


def test_chunk_blocks_are_allocated_per_chunk() -> None:
    sim = Sim(16, budget=6)
    seq = make_seq("long", 13)
    sim.sched.add(seq)
    sim.step()
    assert (seq.num_computed_tokens, len(seq.block_table)) == (6, 2)
    # admitted: a partial prefill runs (and can be preempted) like any running sequence
    assert seq.status is SequenceStatus.RUNNING and seq.num_completion_tokens == 0
    sim.step()
    assert (seq.num_computed_tokens, len(seq.block_table)) == (12, 3)
    sim.step()
    assert (seq.num_computed_tokens, len(seq.block_table)) == (13, 4)
    assert seq.num_completion_tokens == 1


def test_running_sequences_take_the_budget_first() -> None:
    sim = Sim(32, budget=8)
    running = [make_seq(f"r{i}", 2, max_tokens=10) for i in range(3)]
    for seq in running:
        sim.sched.add(seq)
    sim.step()
    long = make_seq("long", 12)
    sim.sched.add(long)
    batch, _ = sim.step()
    assert batch is not None
    assert [(i.seq.request_id, i.num_new_tokens, i.sample) for i in batch.items] == [
        ("r0", 1, True),
        ("r1", 1, True),
        ("r2", 1, True),
        ("long", 5, False),
    ]
    assert batch.num_tokens == 8
    batch, _ = sim.step()
    assert batch is not None and batch.items[-1].num_new_tokens == 5
    batch, _ = sim.step()
    assert batch is not None and batch.items[-1][1:3] == (2, True)


def test_max_num_seqs_is_respected() -> None:
    sim = Sim(64, max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 3, max_tokens=3) for i in range(5)]
    for seq in seqs:
        sim.sched.add(seq)
    for _ in range(100):
        if not sim.sched.has_work():
            break
        batch, _ = sim.step()
        assert batch is not None and len(batch.items) <= 2
        assert len(sim.sched.running) <= 2
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert [f.seq.request_id for f in sim.finished] == [f"s{i}" for i in range(5)]
    assert sim.all_free()


def test_finished_sequence_keeps_blocks_until_released() -> None:
    pool = BlockPool(8)
    sched = Scheduler(SchedulerConfig(), pool, BS)
    seq = make_seq("a", 5, max_tokens=1)
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None
    (fin,) = sched.update(batch, [7])
    assert fin == Finished(seq, FinishReason.LENGTH)
    assert seq not in sched.running and seq not in sched.waiting
    assert pool.num_used == 2  # e.g. a KV export may still read them
    sched.release(seq, fin.reason)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert seq.block_table == [] and pool.num_free == 8
    assert not sched.has_work()


# -- admission and preemption ---------------------------------------------------------------


def test_admission_is_first_come_first_served_when_the_pool_is_short() -> None:
    sim = Sim(4)
    a = make_seq("a", 8, max_tokens=2)  # 2 blocks, a third at its first decode step
    sim.sched.add(a)
    sim.step()
    big = make_seq("big", 12)  # 3 blocks: does not fit while a runs
    small = make_seq("small", 2)  # 1 block: would fit, but must not overtake big
    sim.sched.add(big)
    sim.sched.add(small)
    batch, finished = sim.step()
    assert ids(batch) == ["a"]
    assert [f.seq.request_id for f in finished] == ["a"]
    assert big.block_table == [] and small.block_table == []
    assert list(sim.sched.waiting) == [big, small]
    batch, _ = sim.step()
    assert ids(batch) == ["big", "small"]
    sim.run()
    assert big.is_finished and small.is_finished and sim.all_free()


def test_waiting_prompt_that_never_fits_now_waits_without_allocating() -> None:
    sim = Sim(2)
    seq = make_seq("a", 12)
    sim.sched.add(seq)
    assert sim.sched.schedule() is None
    assert seq.block_table == [] and sim.all_free()


def test_newest_running_sequence_is_preempted_and_recomputed() -> None:
    sim = Sim(4)
    a = make_seq("a", 4, max_tokens=6, ignore_eos=True)
    b = make_seq("b", 4, max_tokens=8, ignore_eos=True)
    sim.sched.add(a)
    sim.sched.add(b)
    for _ in range(5):  # prefill, then decode until both fill their second block (8 slots)
        batch, _ = sim.step()
        assert ids(batch) == ["a", "b"]
    assert sim.pool.num_free == 0
    b_tokens = list(b.token_ids)
    assert (b.num_tokens, b.num_computed_tokens) == (9, 8)

    batch, finished = sim.step()  # a needs a third block: b (newest) gives its blocks up
    assert ids(batch) == ["a"]
    assert sim.sched.num_preemptions == 1
    assert sim.sched.waiting[0] is b
    assert b.status is SequenceStatus.WAITING
    assert (b.num_computed_tokens, b.block_table) == (0, [])
    assert b.token_ids == b_tokens  # generated tokens survive; only their KV is recomputed
    assert [f.seq for f in finished] == [a]  # a reached max_tokens

    batch, _ = sim.step()  # b recomputes prompt + generated tokens in one go, then samples
    assert batch is not None
    assert [(i.seq, i.num_new_tokens, i.sample) for i in batch.items] == [(b, 9, True)]
    assert b.token_ids[:9] == b_tokens and b.token_ids[9] == 1009
    sim.run()
    assert b.finish_reason is FinishReason.LENGTH and b.num_completion_tokens == 8
    assert b.token_ids == [*b_tokens, 1009, 1010, 1011]
    assert sim.all_free()


def test_preemption_order_is_newest_first_and_keeps_age_order_in_waiting() -> None:
    sim = Sim(3)
    seqs = [make_seq(f"s{i}", 4, max_tokens=6, ignore_eos=True) for i in range(3)]
    for seq in seqs:
        sim.sched.add(seq)
    sim.step()
    assert sim.pool.num_free == 0  # each holds 1 full block and needs a second now
    batch, _ = sim.step()  # s0 takes s2's block; s1 finds none left and yields its own
    assert ids(batch) == ["s0"]
    assert list(sim.sched.waiting) == [seqs[1], seqs[2]]
    assert sim.sched.num_preemptions == 2
    sim.run()
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert all(s.num_completion_tokens == 6 for s in seqs)
    assert sim.all_free()


def test_a_lone_sequence_that_outgrows_the_pool_preempts_itself() -> None:
    sim = Sim(1)
    seq = make_seq("a", 3, max_tokens=5, ignore_eos=True)
    sim.sched.add(seq)
    sim.step()  # prefill: 3 tokens, 1 block
    sim.step()  # decode into slot 3
    assert seq.num_computed_tokens == 4 and seq.num_tokens == 5
    batch, _ = sim.step()  # needs a second block that does not exist
    assert batch is None
    assert seq.status is SequenceStatus.WAITING and seq.block_table == []
    assert sim.all_free()


def test_partial_prefills_cannot_deadlock_the_pool() -> None:
    sim = Sim(4, budget=8)
    a = make_seq("a", 12, max_tokens=4, ignore_eos=True)
    b = make_seq("b", 12, max_tokens=4, ignore_eos=True)
    sim.sched.add(a)
    sim.sched.add(b)
    sim.run(max_steps=100)
    # step 3 preempts a (pool full: a 3 blocks, b's first chunk 1 block); a re-prefills 8
    # tokens into 2 of the 3 free blocks; then a needs 2 more blocks and b (holding 1) needs 2,
    # with 1 free: schedule() returns None forever while has_work() is True.
    assert not sim.sched.has_work()
    assert a.is_finished and b.is_finished and sim.all_free()


# -- exits ----------------------------------------------------------------------------------


def test_abort_waiting_sequence() -> None:
    sim = Sim(8)
    seq = make_seq("a", 5)
    sim.sched.add(seq)
    assert sim.sched.abort("a", FinishReason.CANCELLED) is seq
    assert seq.status is SequenceStatus.FINISHED
    assert seq.finish_reason is FinishReason.CANCELLED
    assert not sim.sched.has_work() and sim.all_free()


def test_abort_partially_prefilled_sequence_frees_its_blocks() -> None:
    sim = Sim(8, budget=4)
    seq = make_seq("a", 10)
    sim.sched.add(seq)
    sim.step()
    assert seq.status is SequenceStatus.RUNNING and sim.pool.num_used == 1
    assert sim.sched.abort("a", FinishReason.ERROR) is seq
    assert seq.finish_reason is FinishReason.ERROR and seq.block_table == []
    assert sim.all_free() and not sim.sched.running


def test_abort_running_sequence() -> None:
    sim = Sim(8)
    seq, other = make_seq("a", 6, max_tokens=10), make_seq("b", 3, max_tokens=2)
    sim.sched.add(seq)
    sim.sched.add(other)
    sim.step()
    assert seq.status is SequenceStatus.RUNNING and sim.pool.num_used == 3
    assert sim.sched.abort("a", FinishReason.CANCELLED) is seq
    assert seq not in sim.sched.running and seq.block_table == []
    batch, _ = sim.step()
    assert ids(batch) == ["b"]
    sim.run()
    assert sim.all_free()


def test_abort_awaiting_kv_sequence() -> None:
    sim = Sim(8)
    seq = make_seq("a", 9)
    sim.sched.reserve(seq)
    assert sim.pool.num_used == 3
    assert sim.sched.abort("a", FinishReason.ERROR) is seq
    assert "a" not in sim.sched.awaiting_kv
    assert seq.status is SequenceStatus.FINISHED and sim.all_free()


def test_abort_unknown_or_finished_returns_none() -> None:
    sim = Sim(8)
    assert sim.sched.abort("nope", FinishReason.CANCELLED) is None
    seq = make_seq("a", 2, max_tokens=1)
    sim.sched.add(seq)
    sim.run()
    assert seq.is_finished
    assert sim.sched.abort("a", FinishReason.CANCELLED) is None
    assert seq.finish_reason is FinishReason.LENGTH
    assert sim.all_free()


def test_abort_while_its_step_runs_is_skipped_by_update() -> None:
    sim = Sim(8)
    a, b = make_seq("a", 3, max_tokens=3), make_seq("b", 3, max_tokens=3)
    sim.sched.add(a)
    sim.sched.add(b)
    batch = sim.sched.schedule()
    assert batch is not None
    sim.sched.abort("a", FinishReason.CANCELLED)
    finished = sim.sched.update(batch, [7, 7])
    assert finished == []
    assert a.num_completion_tokens == 0 and a.finish_reason is FinishReason.CANCELLED
    assert b.status is SequenceStatus.RUNNING and sim.sched.running == [b]
    sim.check()
    sim.run()
    assert sim.all_free()


# -- reserve + kv_ready (disaggregated path) ------------------------------------------------


def test_reserve_allocates_the_prompt_and_kv_ready_queues_for_admission() -> None:
    sim = Sim(8)
    seq = make_seq("a", 9, max_tokens=3)
    block_ids = sim.sched.reserve(seq)
    assert len(block_ids) == 3 and block_ids == seq.block_table
    assert block_ids is not seq.block_table  # the caller gets a copy
    assert seq.status is SequenceStatus.WAITING_FOR_KV
    assert not sim.sched.has_work()  # nothing to compute until the pages arrive
    assert sim.sched.schedule() is None
    assert sim.sched.kv_ready("a", 55) is None
    # queued with its blocks; admitted (under max_num_seqs) by the next schedule()
    assert seq.status is SequenceStatus.WAITING and list(sim.sched.waiting) == [seq]
    assert seq.token_ids[-1] == 55 and seq.num_computed_tokens == 9
    batch, _ = sim.step()
    assert seq.status is SequenceStatus.RUNNING
    assert batch is not None
    assert [(i.seq, i.num_new_tokens, i.sample) for i in batch.items] == [(seq, 1, True)]
    assert len(seq.block_table) == 3  # slot 9 fits in the third block
    sim.run()
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_completion_tokens == 3
    assert sim.all_free()


def test_reserve_when_the_pool_is_short_changes_nothing() -> None:
    sim = Sim(2)
    seq = make_seq("a", 9)
    with pytest.raises(OutOfBlocksError):
        sim.sched.reserve(seq)
    assert sim.sched.awaiting_kv == {} and sim.all_free()
    assert seq.status is SequenceStatus.WAITING and seq.block_table == []


@pytest.mark.parametrize(
    ("first_token", "max_tokens", "reason"),
    [(EOS, 5, FinishReason.STOP), (9, 5, FinishReason.STOP), (7, 1, FinishReason.LENGTH)],
)
def test_first_token_that_ends_the_sequence_frees_at_once(
    first_token: int, max_tokens: int, reason: FinishReason
) -> None:
    sim = Sim(8)
    seq = make_seq("a", 6, max_tokens=max_tokens, stop_token_ids=(9,))
    sim.sched.reserve(seq)
    assert sim.sched.kv_ready("a", first_token) == Finished(seq, reason)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is reason
    assert seq.token_ids[-1] == first_token
    assert sim.sched.running == [] and sim.sched.awaiting_kv == {}
    assert sim.all_free()


def test_kv_ready_sequence_can_be_preempted_and_recomputed_locally() -> None:
    sim = Sim(4)
    old = make_seq("old", 4, max_tokens=10, ignore_eos=True)
    sim.sched.add(old)
    sim.step()
    remote = make_seq("remote", 4, max_tokens=6, ignore_eos=True)
    sim.sched.reserve(remote)
    sim.sched.kv_ready("remote", 42)
    for _ in range(4):
        sim.step()
    assert sim.pool.num_free == 0 and sim.sched.running == [old, remote]
    sim.step()  # old needs a third block: remote is the newest
    assert remote.status is SequenceStatus.WAITING and remote.num_computed_tokens == 0
    assert remote.token_ids[4] == 42
    sim.run()
    assert old.is_finished and remote.is_finished
    assert remote.num_completion_tokens == 6 and sim.all_free()


def test_kv_ready_respects_max_num_seqs() -> None:
    sim = Sim(32, max_num_seqs=2, budget=2)
    seqs = [make_seq(f"r{i}", 4, max_tokens=5) for i in range(3)]
    for seq in seqs:
        sim.sched.reserve(seq)
        sim.sched.kv_ready(seq.request_id, 7)
    batch = sim.sched.schedule()
    assert batch is not None
    assert len(batch.items) <= 2
    assert batch.num_tokens <= 2


# -- stopping -------------------------------------------------------------------------------


def run_with_tokens(seq: Sequence, tokens: list[int]) -> list[Finished]:
    sim = Sim(16)
    sim.sched.add(seq)
    feed = iter(tokens)
    while sim.sched.has_work():
        sim.step(lambda _seq: next(feed))
    assert sim.all_free()
    return sim.finished


def test_eos_stops() -> None:
    seq = make_seq("a", 3, max_tokens=10)
    (fin,) = run_with_tokens(seq, [5, 6, EOS, 8])
    assert fin.reason is FinishReason.STOP
    assert seq.token_ids[3:] == [5, 6, EOS]


def test_ignore_eos_runs_to_max_tokens() -> None:
    seq = make_seq("a", 3, max_tokens=4, ignore_eos=True)
    (fin,) = run_with_tokens(seq, [EOS, EOS, 5, EOS])
    assert fin.reason is FinishReason.LENGTH
    assert seq.token_ids[3:] == [EOS, EOS, 5, EOS]


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    seq = make_seq("a", 3, max_tokens=10, ignore_eos=True, stop_token_ids=(40, 41))
    (fin,) = run_with_tokens(seq, [5, EOS, 41, 6])
    assert fin.reason is FinishReason.STOP
    assert seq.token_ids[3:] == [5, EOS, 41]


def test_length_at_exactly_max_tokens() -> None:
    seq = make_seq("a", 3, max_tokens=3)
    (fin,) = run_with_tokens(seq, [5, 6, 7, 8])
    assert fin.reason is FinishReason.LENGTH
    assert seq.num_completion_tokens == 3


def test_stop_token_on_the_last_allowed_token_is_stop() -> None:
    seq = make_seq("a", 3, max_tokens=2)
    (fin,) = run_with_tokens(seq, [5, EOS])
    assert fin.reason is FinishReason.STOP


def test_multiple_eos_ids() -> None:
    seq = make_seq("a", 3, max_tokens=10, eos=frozenset({2, 3}))
    (fin,) = run_with_tokens(seq, [5, 3])
    assert fin.reason is FinishReason.STOP


def test_append_token_unit() -> None:
    seq = make_seq("a", 2, max_tokens=2, stop_token_ids=(9,))
    assert seq.append_token(5) is None
    assert seq.num_completion_tokens == 1 and seq.last_token_id == 5
    assert seq.append_token(6) is FinishReason.LENGTH
    seq = make_seq("b", 2, max_tokens=2, stop_token_ids=(9,))
    assert seq.append_token(9) is FinishReason.STOP


# -- a longer random workload -----------------------------------------------------------------


def test_random_workload_finishes_everything_and_leaks_nothing() -> None:
    import random

    rng = random.Random(7)
    sim = Sim(24, max_num_seqs=6, budget=16)
    pending = [
        make_seq(
            f"s{i}",
            rng.randint(1, 20),
            max_tokens=rng.randint(1, 12),
            ignore_eos=rng.random() < 0.5,
        )
        for i in range(40)
    ]
    everyone = list(pending)
    aborted: set[str] = set()
    steps = 0
    while (pending or sim.sched.has_work()) and steps < 2000:
        steps += 1
        for _ in range(rng.randint(0, 2)):
            if pending:
                sim.sched.add(pending.pop(0))
        if rng.random() < 0.05:
            live = [*sim.sched.waiting, *sim.sched.running]
            if live:
                victim = rng.choice(live)
                assert sim.sched.abort(victim.request_id, FinishReason.CANCELLED) is victim
                aborted.add(victim.request_id)
        sim.step(lambda seq: rng.choice([EOS, 5, 6, 7, 8, 9, 10]))
    assert not pending and not sim.sched.has_work(), "workload did not drain"
    assert all(seq.is_finished for seq in everyone)
    assert {f.seq.request_id for f in sim.finished} | aborted == {s.request_id for s in everyone}
    assert sim.all_free()
