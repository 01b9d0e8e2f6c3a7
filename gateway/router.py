"""Which workers serve a request: pluggable policies per tier, and conditional disaggregation.

:meth:`Router.route` picks a decode worker first, then prefills the prompt on a prefill worker
("disaggregated") or on that decode worker ("colocated", "local_*"). Loads are the workers'
reports (:mod:`gateway.registry`) corrected by the calls this gateway routed since; ties rotate,
so equal workers share the work. Every :class:`Route` lists the fallbacks taken, for metrics.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from core.prefix_summary import matched_depth, prompt_anchors
from gateway.errors import NoWorkersError, OverloadedError
from gateway.registry import Registry
from gateway.worker_entry import WorkerEntry

AFFINITY_SLACK = 2  # queued prompts an affine prefill worker may have beyond the shortest queue
AFFINITY_ENTRIES = 4096  # prefixes remembered
OVERLOADED_RETRY_S = 0.5
HEADROOM_BATCH_FRACTION = 0.5  # a decode worker below this batch occupancy may prefill locally


WORKER_PREFIX_CACHE = "worker_prefix_cache"
RECENT_ROUTE = "recent_route"
SHORTEST_QUEUE = "shortest_queue"
LEAST_LOADED = "least_loaded"
ROUND_ROBIN = "round_robin"
SIBLING_SAMPLE = "sibling_sample"  # another sample of a prompt this prefill worker computed


class Pick(NamedTuple):
    """A policy's choice, why it was made, and any fallback on the way."""

    worker: WorkerEntry
    reason: str
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    decode: WorkerEntry
    prefill: WorkerEntry | None  # None: the decode worker computes the prompt
    decision: str
    """``colocated``, ``local_*`` or ``disaggregated`` (see :meth:`Router.route`)."""
    prefill_reason: str = ""
    """Why this prefill worker (``worker_prefix_cache``, ``recent_route``, ...); "" if none."""
    fallbacks: tuple[str, ...] = ()
    """First choices that could not be had, for metrics: ``decode_failed_worker_reused`` /
    ``prefill_failed_worker_reused`` (only workers that already failed this request were
    routable), ``prefill_all_full`` (every prefill worker is at its admission limit; one gets the
    call anyway and may refuse it), ``prefill_unavailable`` (a prefill tier is configured but no
    worker of it is routable: the decode worker prefills), ``prefix_affinity_overloaded`` (a
    worker holding the prefix was passed over for its queue)."""


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "load-aware"
    """``load-aware`` or ``round-robin`` (see :data:`POLICIES`)."""
    local_prefill_below: int = 0
    """Prompts with fewer tokens prefill on the decode worker (0: never)."""
    prefill_saturated_queue: int = 0
    """When every prefill worker has this many prompts queued or running, prompts prefill on a
    decode worker with headroom (0: never)."""
    affinity_tokens: int = 64
    """Prompt tokens that identify a shared prefix for prefill affinity (0: no affinity)."""


class Policy(Protocol):
    def pick(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> Pick: ...


def _batch(entry: WorkerEntry) -> int:
    return entry.batch()


def decode_score(entry: WorkerEntry, prompt_len: int) -> float:
    """Block usage after admitting this prompt, plus batch occupancy (both in [0, 1]-ish)."""
    load = entry.load
    if load is None or load.total_blocks == 0:
        return math.inf
    needed = -(-(prompt_len + 1) // max(1, load.block_size))
    usage = 1.0 - (load.free_blocks - needed) / load.total_blocks
    batch = _batch(entry) / max(1, load.max_num_seqs or 64)
    return usage + batch


def prefill_queue(entry: WorkerEntry) -> int:
    return _batch(entry)


class _Rotation:
    """Breaks ties between equal scores by rotating the starting point."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def order(self, candidates: Sequence[WorkerEntry]) -> list[WorkerEntry]:
        ordered = sorted(candidates, key=lambda e: e.address)
        start = next(self._counter) % len(ordered)
        return ordered[start:] + ordered[:start]


class RoundRobinPolicy:
    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> Pick:
        return Pick(self._rotation.order(candidates)[0], ROUND_ROBIN)


class LeastLoadedDecodePolicy:
    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> Pick:
        ordered = self._rotation.order(candidates)
        return Pick(min(ordered, key=lambda e: decode_score(e, len(prompt))), LEAST_LOADED)


class ShortestQueuePrefillPolicy:
    """Prefix-cache affinity first, then the shortest queue; the pick's reason is

    1. ``worker_prefix_cache``: the worker whose load report advertises the longest cached prefix
       of the prompt (:mod:`core.prefix_summary`: the same chained block hashes, with the
       worker's block size), unless its queue is longer than the shortest by more than
       ``AFFINITY_SLACK`` (then the next-longest match, ...);
    2. ``recent_route``: else the worker this gateway last sent the same first
       ``affinity_tokens`` to (the last ``AFFINITY_ENTRIES`` prefixes are remembered: this
       catches prefixes routed since the last load report), with the same slack;
    3. ``shortest_queue``: else the shortest queue.
    """

    def __init__(self, affinity_tokens: int = 64) -> None:
        self._rotation = _Rotation()
        self._affinity_tokens = affinity_tokens
        self._last: collections.OrderedDict[int, str] = collections.OrderedDict()

    def pick(self, candidates: Sequence[WorkerEntry], prompt: Sequence[int]) -> Pick:
        ordered = self._rotation.order(candidates)
        best = min(ordered, key=prefill_queue)
        limit = prefill_queue(best) + AFFINITY_SLACK
        chosen, reason = best, SHORTEST_QUEUE
        fallbacks: tuple[str, ...] = ()
        holders = _prefix_holders(ordered, prompt)
        if holders:
            within = [e for e in holders if prefill_queue(e) <= limit]
            if within:
                chosen, reason = within[0], WORKER_PREFIX_CACHE
            else:
                fallbacks = ("prefix_affinity_overloaded",)
        key = self._prefix_key(prompt)
        if key is None:
            return Pick(chosen, reason, fallbacks)
        if reason == SHORTEST_QUEUE:
            affine = self._last.get(key)
            for entry in ordered:
                if entry.address == affine and prefill_queue(entry) <= limit:
                    chosen, reason = entry, RECENT_ROUTE
        self._last[key] = chosen.address
        self._last.move_to_end(key)
        while len(self._last) > AFFINITY_ENTRIES:
            self._last.popitem(last=False)
        return Pick(chosen, reason, fallbacks)

    def _prefix_key(self, prompt: Sequence[int]) -> int | None:
        n = self._affinity_tokens
        if n <= 0 or len(prompt) < n:
            return None
        return hash(tuple(prompt[:n]))


def _prefix_holders(ordered: Sequence[WorkerEntry], prompt: Sequence[int]) -> list[WorkerEntry]:
    """Workers whose last report advertises a cached prefix of ``prompt``, longest match first
    (then shortest queue, then ``ordered``'s rotation)."""
    anchors: dict[int, list[tuple[int, bytes]]] = {}  # per block size (one, in practice)
    matched: list[tuple[int, int, int, WorkerEntry]] = []
    for index, entry in enumerate(ordered):
        load = entry.load
        if load is None or not load.cached_prefixes:
            continue
        if load.block_size not in anchors:
            anchors[load.block_size] = prompt_anchors(prompt, load.block_size)
        depth = matched_depth(anchors[load.block_size], load.cached_prefixes) * load.block_size
        if depth:
            matched.append((-depth, prefill_queue(entry), index, entry))
    return [entry for *_, entry in sorted(matched, key=lambda m: m[:3])]


POLICIES = ("load-aware", "round-robin")


def make_policies(config: RoutingConfig) -> tuple[Policy, Policy]:
    """(decode policy, prefill policy) for ``config.policy`` (``--router``).

    ``load-aware``: decode least loaded (:func:`decode_score`: KV block usage after this prompt
    plus batch occupancy), prefill by :class:`ShortestQueuePrefillPolicy`. ``round-robin``: each
    tier in turn, ignoring load.
    """
    if config.policy == "round-robin":
        return RoundRobinPolicy(), RoundRobinPolicy()
    if config.policy == "load-aware":
        return LeastLoadedDecodePolicy(), ShortestQueuePrefillPolicy(config.affinity_tokens)
    raise ValueError(f"unknown routing policy {config.policy!r}; choose one of {POLICIES}")


class Router:
    def __init__(self, registry: Registry, config: RoutingConfig | None = None) -> None:
        self.registry = registry
        self.config = config or RoutingConfig()
        self.decode_policy, self.prefill_policy = make_policies(self.config)

    def route(
        self,
        prompt: Sequence[int],
        avoid_decode: Collection[str] = (),
        avoid_prefill: Collection[str] = (),
    ) -> Route:
        """The decode worker (by policy), then where the prompt is computed::

            no prefill tier configured                         -> "colocated"
            prompt shorter than local_prefill_below            -> "local_short_prompt"
            no prefill worker routable (all down or draining)  -> "local_no_prefill"
            every prefill queue >= prefill_saturated_queue,
              and the decode worker has headroom               -> "local_prefill_saturated"
            otherwise a prefill worker (by policy)             -> "disaggregated"

        "local_*" decisions prefill on the decode worker itself. Raises :class:`NoWorkersError`
        when no decode worker is routable and :class:`OverloadedError` when every routable one
        is at its limit. Workers in ``avoid_*`` (failed for this request) are used only when no
        other is routable."""
        fallbacks: list[str] = []
        decode_candidates = self._decode_candidates(avoid_decode, fallbacks)
        decode = self.decode_policy.pick(decode_candidates, prompt).worker
        if not self.registry.prefill.configured:
            return Route(decode, None, "colocated", fallbacks=tuple(fallbacks))
        if len(prompt) < self.config.local_prefill_below:
            return Route(decode, None, "local_short_prompt", fallbacks=tuple(fallbacks))
        prefill = _prefer_not(self.registry.prefill.routable(), avoid_prefill, fallbacks, "prefill")
        if not prefill:
            fallbacks.append("prefill_unavailable")
            return Route(decode, None, "local_no_prefill", fallbacks=tuple(fallbacks))
        open_ = [e for e in prefill if e.load is None or not e.load.full]
        if not open_:
            fallbacks.append("prefill_all_full")
        prefill = open_ or prefill
        saturated_at = self.config.prefill_saturated_queue
        if (
            saturated_at
            and min(prefill_queue(e) for e in prefill) >= saturated_at
            and _has_headroom(decode)
        ):
            return Route(decode, None, "local_prefill_saturated", fallbacks=tuple(fallbacks))
        pick = self.prefill_policy.pick(prefill, prompt)
        return Route(
            decode, pick.worker, "disaggregated", pick.reason, (*fallbacks, *pick.fallbacks)
        )

    def migration_target(self, prompt: Sequence[int], source: str) -> WorkerEntry | None:
        """A decode worker to take over a draining worker's sequence (its tokens ``prompt``):
        by the decode policy among the routable ones with room, never ``source``; None when
        there is none (the sequence then finishes where it is)."""
        entries = [
            e
            for e in self.registry.decode.routable()
            if e.address != source and (e.load is None or not e.load.full)
        ]
        return self.decode_policy.pick(entries, prompt).worker if entries else None

    def pinned(self, route: Route) -> Route | None:
        """``route``'s workers again, for another sample of the same prompt (its KV is in their
        prefix caches: :mod:`gateway.fanout`), while each is routable and below its admission
        limit; None when one is not (the caller routes afresh). A disaggregated pin's prefill
        pick is counted as ``sibling_sample``."""
        decode = _still_open(self.registry.decode.routable(), route.decode)
        if decode is None:
            return None
        if route.prefill is None:
            return Route(decode, None, route.decision)
        prefill = _still_open(self.registry.prefill.routable(), route.prefill)
        if prefill is None:
            return None
        return Route(decode, prefill, route.decision, SIBLING_SAMPLE)

    def _decode_candidates(self, avoid: Collection[str], fallbacks: list[str]) -> list[WorkerEntry]:
        tier = self.registry.decode
        routable = _prefer_not(tier.routable(), avoid, fallbacks, "decode")
        if not routable:
            raise NoWorkersError(f"no decode worker is available ({tier.summary()})")
        open_ = [e for e in routable if e.load is None or not e.load.full]
        if not open_:
            raise OverloadedError(
                f"every decode worker is at capacity ({len(routable)} routable); retry later",
                OVERLOADED_RETRY_S,
            )
        return open_


def _prefer_not(
    entries: list[WorkerEntry], avoid: Collection[str], fallbacks: list[str], tier: str
) -> list[WorkerEntry]:
    preferred = [e for e in entries if e.address not in avoid]
    if entries and not preferred:
        fallbacks.append(f"{tier}_failed_worker_reused")
    return preferred or entries


def _still_open(routable: list[WorkerEntry], entry: WorkerEntry) -> WorkerEntry | None:
    if entry not in routable or (entry.load is not None and entry.load.full):
        return None
    return entry


def _has_headroom(entry: WorkerEntry) -> bool:
    load = entry.load
    if load is None:
        return False
    return _batch(entry) < HEADROOM_BATCH_FRACTION * max(1, load.max_num_seqs or 64)
