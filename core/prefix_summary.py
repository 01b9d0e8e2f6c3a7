"""The prefix-cache summary a worker advertises on its load stream, and the gateway's match.

For its recently served prompts, a worker advertises the chained hashes (:mod:`core.prefix_hash`)
at anchor depths of 1, 2, 4, ... full blocks, each only as deep as its pool still holds; the
gateway hashes a new prompt's anchors the same way (with the worker's block size), and the
deepest match says how long a prefix that worker would reuse, within a factor of two. Bounded:
:data:`MAX_PREFIXES` prompts x 7 anchors (:data:`MAX_BLOCKS` deep), 448 hashes of 16 bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence

from core.prefix_hash import prefix_hashes

MAX_BLOCKS = 64
"""Deepest anchor, in blocks (1,024 tokens at 16 tokens per block)."""
MAX_PREFIXES = 64
"""Prompts a worker remembers for its summary (least recently seen forgotten first)."""

HeldBlocks = Callable[[list[list[bytes]]], list[int]]
"""For each chain of prefix hashes, how many leading blocks the prefix cache holds."""


def reusable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt a prefix-cache hit may cover: the scheduler computes at least
    one token itself (it samples from it), so an exact multiple of the block size reuses one
    block fewer."""
    return max(0, (num_tokens - 1) // block_size)


def anchor_depths(num_blocks: int) -> list[int]:
    """1, 2, 4, ... up to ``min(num_blocks, MAX_BLOCKS)``."""
    depths = []
    depth = 1
    while depth <= min(num_blocks, MAX_BLOCKS):
        depths.append(depth)
        depth *= 2
    return depths


def prompt_anchors(prompt: Sequence[int], block_size: int) -> list[tuple[int, bytes]]:
    """``(depth, hash of blocks 0..depth-1)`` for each anchor depth of ``prompt``."""
    blocks = min(reusable_blocks(len(prompt), block_size), MAX_BLOCKS)
    if blocks == 0:
        return []
    chain = prefix_hashes(prompt[: blocks * block_size], block_size)
    return [(depth, chain[depth - 1]) for depth in anchor_depths(blocks)]


def matched_depth(anchors: Sequence[tuple[int, bytes]], advertised: Collection[bytes]) -> int:
    """Blocks of the prompt (whose ``anchors`` these are) a worker advertising ``advertised``
    holds: the deepest anchor it names, 0 if none."""
    best = 0
    for depth, block_hash in anchors:
        if block_hash in advertised:
            best = depth
    return best


class PrefixSummary:
    """A worker's recently served prompts, as hash chains; :meth:`advertised` is the summary.

    Why a summary: a worker cannot list every block it caches (a GPU pool holds ~10^5 of them,
    and the load stream repeats every 250 ms by default), and the pool does not know a block's
    depth in its prompt (the chain is hashed, not stored). Why geometric anchor depths::

        prompt blocks     b0  b1  b2  b3  b4  b5  b6  b7  b8 ...
        anchor hashes     h0  h1      h3              h7          (h_i names blocks 0..i)

    a system prompt shared by every conversation matches on every worker at depth 4, while the
    conversation's own history (depth 16, 32, ...) singles out the worker that served its
    previous turn. Shared anchors are sent once; a prompt the pool holds none of is forgotten.

    Not thread-safe: record and read from one thread (the worker's event loop)."""

    def __init__(self, block_size: int, max_prefixes: int = MAX_PREFIXES) -> None:
        self.block_size = block_size
        self.max_prefixes = max_prefixes
        self._chains: OrderedDict[bytes, list[bytes]] = OrderedDict()  # last hash -> chain

    def record(self, prompt: Sequence[int]) -> None:
        """Remember ``prompt`` (its first :data:`MAX_BLOCKS` reusable blocks) as most recent."""
        blocks = min(reusable_blocks(len(prompt), self.block_size), MAX_BLOCKS)
        if blocks == 0:
            return
        chain = prefix_hashes(prompt[: blocks * self.block_size], self.block_size)
        key = chain[-1]
        self._chains[key] = chain
        self._chains.move_to_end(key)
        while len(self._chains) > self.max_prefixes:
            self._chains.popitem(last=False)

    def advertised(self, held: HeldBlocks) -> list[bytes]:
        """Anchor hashes of the remembered prompts, each as deep as ``held`` says the prefix
        cache still holds it, most recent first and without repeats; prompts it holds none
        of are forgotten."""
        keys = list(self._chains)
        counts = held([self._chains[k] for k in keys])
        out: dict[bytes, None] = {}
        for key, count in zip(reversed(keys), reversed(counts), strict=True):
            if count == 0:
                del self._chains[key]
                continue
            chain = self._chains[key]
            for depth in anchor_depths(count):
                out.setdefault(chain[depth - 1], None)
        return list(out)

    def __len__(self) -> int:
        return len(self._chains)
