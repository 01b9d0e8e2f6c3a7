"""Which workers serve a request. Round-robin for now; load-aware routing comes later."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from gateway.errors import NoWorkersError
from gateway.worker_clients import DecodeClient, PrefillClient


@dataclass(frozen=True)
class Route:
    decode: DecodeClient
    prefill: PrefillClient | None  # None: the decode worker computes the prompt (colocated)


class RoundRobinRouter:
    def __init__(self, prefill: list[PrefillClient], decode: list[DecodeClient]) -> None:
        if not decode:
            raise NoWorkersError("the gateway needs at least one decode worker")
        self.prefill = prefill
        self.decode = decode
        self._next_prefill = itertools.cycle(prefill) if prefill else None
        self._next_decode = itertools.cycle(decode)

    def route(self) -> Route:
        prefill = next(self._next_prefill) if self._next_prefill is not None else None
        return Route(decode=next(self._next_decode), prefill=prefill)

    async def close(self) -> None:
        for prefill in self.prefill:
            await prefill.close()
        for decode in self.decode:
            await decode.close()
