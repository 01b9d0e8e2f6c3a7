"""A draining worker's parking, no model: which sequences park, that parked ones keep their
blocks and leave the batch, and that a sequence let go on finishes here and never parks again."""

from __future__ import annotations

from core.sampling import FinishReason
from engine.sequence import SequenceStatus
from tests.engine.test_scheduler import Sim, make_seq


def test_only_decoding_sequences_park_and_they_keep_their_blocks() -> None:
    sim = Sim(num_blocks=32, budget=8)
    decoding = make_seq("d", 4, max_tokens=20)
    sim.sched.add(decoding)
    sim.step()  # its prompt, then its first token: it decodes
    prompt = make_seq("p", 12, max_tokens=20)  # longer than the budget: still computing
    sim.sched.add(prompt)
    sim.step()
    blocks = list(decoding.block_table)
    parked = sim.sched.park_decoding()
    assert parked == [decoding]
    assert decoding.status is SequenceStatus.PARKED and decoding.block_table == blocks
    assert decoding not in sim.sched.running and prompt in sim.sched.running
    batch, _ = sim.step()  # the prompt goes on; the parked sequence computes nothing
    assert batch is not None and [i.seq for i in batch.items] == [prompt]
    assert sim.pool.num_used == len(blocks) + len(prompt.block_table)


def test_a_parked_sequence_aborted_frees_its_blocks() -> None:
    sim = Sim(num_blocks=16)
    seq = make_seq("d", 4, max_tokens=20)
    sim.sched.add(seq)
    sim.step()
    sim.sched.park_decoding()
    assert sim.sched.abort("d", FinishReason.CANCELLED) is seq
    assert sim.all_free() and not sim.sched.parking.parked


def test_unparked_sequences_finish_here_and_never_park_again() -> None:
    sim = Sim(num_blocks=16)
    seq = make_seq("d", 4, max_tokens=6)
    sim.sched.add(seq)
    sim.step()
    sim.sched.park_decoding()
    assert sim.sched.unpark("d") and not sim.sched.unpark("d")
    assert seq.status is SequenceStatus.RUNNING and seq in sim.sched.running
    assert sim.sched.park_decoding() == []
    sim.run()
    assert [f.seq.request_id for f in sim.finished] == ["d"]
    assert seq.num_completion_tokens == 6 and sim.all_free()
