"""A draining worker's parked sequences: decoding sequences stopped, blocks kept, until they
migrate to another worker (their KV copied out, then aborted here) or are let to finish here.

Only the scheduler touches it (engine lock). A sequence let go on (:meth:`ParkingLot.release`)
is never parked again, so a sequence no other worker can take finishes where it is.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from engine.sequence import Sequence, SequenceStatus


class ParkingLot:
    def __init__(self) -> None:
        self.parked: dict[str, Sequence] = {}
        self._kept: set[str] = set()  # released: they finish here

    def park(self, running: Seq[Sequence]) -> list[Sequence]:
        """Which of ``running`` to park now: those that decode (output begun, only the next
        token's KV missing) and were not released; marked PARKED and kept here."""
        parked = [
            s
            for s in running
            if s.is_decoding and s.num_completion_tokens > 0 and s.request_id not in self._kept
        ]
        for seq in parked:
            seq.status = SequenceStatus.PARKED
            self.parked[seq.request_id] = seq
        return parked

    def release(self, request_id: str) -> Sequence | None:
        """Take a parked sequence back for good (RUNNING again); None when not parked."""
        seq = self.parked.pop(request_id, None)
        if seq is not None:
            self._kept.add(request_id)
            seq.status = SequenceStatus.RUNNING
        return seq

    def take(self, request_id: str) -> Sequence | None:
        """Remove a parked sequence (it ends here: aborted, or moved)."""
        return self.parked.pop(request_id, None)
