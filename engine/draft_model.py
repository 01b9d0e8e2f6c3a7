"""Draft-model speculation: a smaller model with the target's tokenizer proposes greedily.

The draft's KV lives in its own cache tensor at the target's block ids, so one pool accounts for
both (a block holds the target's and the draft's KV of the same positions; the pool is sized
for both, see :class:`engine.engine.Engine`). Each sequence's :attr:`SpecState.draft_computed`
says how far the draft's KV is valid: 0 for a new, imported or preempted sequence (the draft
then catches up over its prompt on this worker, so a decode tier needs no draft KV from
prefill), cut back to the kept tokens after each verification (see :mod:`engine.scheduler`).

A step's drafts take ``k`` batched draft forwards: the first catches every sequence up to its
last token and proposes one token, each next one feeds the previous proposal back. The draft
writes KV only at positions inside blocks the scheduler gave the sequence for this step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import structlog
import torch

from core.sampling import SamplingParams
from engine.attention import register_paged_attention
from engine.config import EngineConfig, SpeculativeMethod
from engine.kv_cache import KVCache
from engine.model_files import ModelSpec
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.runner_setup import build_runner
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence as EngineSequence
from engine.speculative import DraftRequest, SpecState
from engine.structured import GrammarManager

log = structlog.get_logger(__name__)

_GREEDY = SamplingParams(max_tokens=1 << 30, temperature=0.0, ignore_eos=True)


class DraftModelProposer:
    """Greedy drafts from the draft model's runner (over its own :class:`KVCache`)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def new_state(self, k: int) -> SpecState:
        return SpecState(k)

    def propose(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        # stand-ins the draft runner computes: the sequence's tokens and blocks, its own count
        proxies = []
        for seq, _ in requests:
            assert seq.spec is not None
            proxies.append(
                EngineSequence(
                    seq.request_id,
                    list(seq.token_ids),
                    seq.num_prompt_tokens,
                    _GREEDY,
                    block_table=seq.block_table,
                    num_computed_tokens=min(seq.spec.draft_computed, seq.num_computed_tokens),
                )
            )
        drafts: list[list[int]] = [[] for _ in requests]
        active = [i for i, (_, k) in enumerate(requests) if k > 0]
        while active:
            items = tuple(
                ScheduledSeq(p, p.num_tokens - p.num_computed_tokens, True)
                for p in (proxies[i] for i in active)
            )
            tokens = self.runner.execute(ScheduledBatch(items))
            for i, token in zip(active, tokens, strict=True):
                proxy = proxies[i]
                proxy.num_computed_tokens = proxy.num_tokens  # its KV now covers every input
                proxy.token_ids.append(token)
                drafts[i].append(token)
            active = [i for i in active if len(drafts[i]) < requests[i].k and drafts[i][-1] >= 0]
        for (seq, _), proxy in zip(requests, proxies, strict=True):
            assert seq.spec is not None
            seq.spec.draft_computed = proxy.num_computed_tokens
        return [tuple(t for t in draft if t >= 0) for draft in drafts]


def load_draft_model(
    config: EngineConfig, target: ModelSpec
) -> tuple[torch.nn.Module, ModelSpec] | None:
    """The draft model of ``--speculative draft`` on the target's device and dtype (None for
    any other method); raises ValueError when its vocabulary is not the target's."""
    name = config.speculative.draft_model
    if config.speculative.method is not SpeculativeMethod.DRAFT or name is None:
        return None
    model, spec = load_model(replace(config.model, model=name))
    if spec.vocab_size != target.vocab_size:
        raise ValueError(
            f"--draft-model {name} has a vocabulary of {spec.vocab_size} tokens, the target "
            f"{target.vocab_size}: a draft model must share the target's tokenizer"
        )
    return model, spec


def build_draft_proposer(
    config: EngineConfig,
    model: torch.nn.Module,
    spec: ModelSpec,
    num_blocks: int,
    grammars: GrammarManager,
) -> DraftModelProposer:
    """The proposer over ``model`` (loaded by :func:`load_draft_model`), with a KV cache of
    ``num_blocks`` blocks: the target pool's, block for block."""
    weights = next(model.parameters())
    model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
    cache = KVCache.for_model(spec, num_blocks, config.cache.block_size, weights)
    draft_config = replace(config, model=replace(config.model, model=str(spec.path)))
    runner = build_runner(draft_config, model, cache, grammars)
    runner.install_layer_hooks()
    log.info(
        "draft_model_loaded",
        model=str(spec.path),
        layers=spec.num_layers,
        bytes=num_blocks * cache.bytes_per_block,
    )
    return DraftModelProposer(runner)
