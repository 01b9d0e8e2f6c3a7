"""Turns a :class:`ScheduledBatch` into tensors, runs one forward pass, and samples.

The batch is packed into one row of tokens (:mod:`engine.step_inputs`); attention finds each
token's context through its sequence's block table (see :mod:`engine.attention`). When sampled
rows carry a grammar, their allowed-token mask is computed on a helper thread during the forward
pass and applied before sampling (see :mod:`engine.structured`); batches without one pay
nothing for it. A verified draft (speculative decoding, :mod:`engine.speculative`) has every
row sampled as its position would be; the kept prefix is decided here (``accepted_tokens``).
On CUDA a pure-decode step replays a captured graph instead of launching its kernels one by
one, when :mod:`engine.runner_setup` captured one for its batch size (:mod:`engine.cuda_graphs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
import torch

from core.sampling import TokenLogprob
from engine import llama_forward
from engine.attention_varlen import VarlenKernel
from engine.cuda_graphs import DecodeGraphs, decode_metadata
from engine.kernels import LayerOps, LinearKernel, PagedAttentionKernel
from engine.kernels.quant_linear import QuantLinearKernel
from engine.kv_cache import KVCache
from engine.linear import pack_linear, pack_linear_layers
from engine.llama_forward import LlamaForward
from engine.quantized_weights import FLOAT_PLAN, WeightPlan
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.speculative import accepted_tokens
from engine.step_inputs import InputBuilder, ModelInputs
from engine.structured import GrammarManager, PendingMask

log = structlog.get_logger(__name__)


LayerListener = Callable[[int], None]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        sampler: Sampler,
        kernel: PagedAttentionKernel | None = None,
        linear: LinearKernel | None = None,
        layer_ops: LayerOps | None = None,
        grammars: GrammarManager | None = None,
        weights: WeightPlan = FLOAT_PLAN,
        quant: QuantLinearKernel | None = None,
        varlen: VarlenKernel | None = None,
    ) -> None:
        """Takes the model over: Llama-family models run through :class:`LlamaForward` (fused
        projections, no per-step module overhead), others through transformers with
        :func:`paged_attention`; on CPU the float32 linear layers run from weights packed once,
        through the ``linear`` kernel or else oneDNN (see :mod:`engine.linear`), and Llama-family
        norms, RoPE and SiLU through ``layer_ops`` when given. With ``kernel``, decode tokens
        attend through it (see :mod:`engine.kernels`). ``grammars`` masks the rows of
        sequences with a structured-output constraint (required to run any). ``weights`` says
        which layers compute from quantized blocks, through ``quant``
        (:mod:`engine.quantized_weights`). With ``varlen`` (CUDA), every token attends through
        it in one call per layer instead (:mod:`engine.attention_varlen`)."""
        self.model = model
        self.varlen = varlen
        self.weights = weights
        self.grammars = grammars
        self.kernel = kernel
        self.fast: LlamaForward | None = None
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = kv_cache.device
        self.layer_listener: LayerListener | None = None
        """Called with a layer index as soon as that layer's KV is in the cache (during
        :meth:`execute`); the engine sets it for steps that stream KV out layer by layer."""
        self.graphs: DecodeGraphs | None = None
        """CUDA graphs of pure-decode steps (set by :mod:`engine.runner_setup` on CUDA)."""
        self._inputs = InputBuilder(kv_cache)
        if isinstance(model, torch.nn.Module):

            def pack(layer: torch.nn.Module) -> torch.nn.Module:
                blocks = weights.quantized(layer) if quant is not None else None
                return pack_linear(layer, linear, blocks, quant)

            if llama_forward.supports(model):
                self.fast = LlamaForward(model, pack, layer_ops)
            else:
                pack_linear_layers(model, linear, weights.quantized, quant)

    def install_layer_hooks(self) -> None:
        """Hook every attention module so :attr:`layer_listener` hears each finished layer
        (transformers path; :class:`LlamaForward` calls the listener itself)."""
        if self.fast is not None:
            return
        layers = [m for m in self.model.modules() if _is_attention(m)]
        if len(layers) != self.kv_cache.num_layers:
            raise ValueError(
                f"found {len(layers)} attention modules, expected {self.kv_cache.num_layers}"
            )
        for module in layers:
            module.register_forward_hook(self._after_attention)

    def _after_attention(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.layer_listener is not None:
            self.layer_listener(int(module.layer_idx))  # type: ignore[arg-type]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; returns one token per item (0 for items that do not sample; the
        first of a verified draft's tokens)."""
        return [tokens[0] if tokens else 0 for tokens in self.execute_step(batch)[0]]

    @torch.inference_mode()
    def execute_step(
        self, batch: ScheduledBatch
    ) -> tuple[list[tuple[int, ...]], list[tuple[TokenLogprob, ...]]]:
        """Run the batch; for each item the tokens it yields (none when it does not sample;
        one, or a verified draft's kept tokens and the next) and their logprobs (empty when not
        asked). A row that could not be sampled gives a negative token (see
        :data:`engine.sampler.SAMPLING_FAILURES`), which fails that sequence alone."""
        inputs = self.prepare(batch)
        pending = self._start_masks(batch, inputs.sample_items)  # runs during the forward
        try:
            logits = self._logits(inputs, batch)  # (S, V)
        finally:  # joined even when the forward fails: the helper touches the batch's matchers
            mask = pending.wait() if pending is not None else None
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        if len(logits):
            tokens, logprobs = self.sampler.sample_with_logprobs(
                logits, inputs.sample_requests, mask
            )
        n = len(batch.items)
        rows: list[list[int]] = [[0] * (len(item.draft) + 1) for item in batch.items]
        row_lp: list[list[TokenLogprob | None]] = [[None] * len(r) for r in rows]
        for i, j, token, lp in zip(
            inputs.sample_items, inputs.sample_offsets, tokens, logprobs, strict=True
        ):
            rows[i][j] = token
            row_lp[i][j] = lp
        result: list[tuple[int, ...]] = [()] * n
        result_lp: list[tuple[TokenLogprob, ...]] = [()] * n
        for i, item in enumerate(batch.items):
            if not item.sample:
                continue
            kept = accepted_tokens(item.draft, rows[i]) if item.draft else (rows[i][0],)
            result[i] = kept
            result_lp[i] = tuple(lp for lp in row_lp[i][: len(kept)] if lp is not None)
            if kept[-1] < 0:
                log.warning("sampling_failed", request_id=item.seq.request_id, code=kept[-1])
        return result, result_lp

    def _logits(self, inputs: ModelInputs, batch: ScheduledBatch) -> torch.Tensor:
        """The logits ``(S, V)`` of the sampled rows: replayed from a CUDA graph where one
        covers the step, else computed eagerly."""
        replayed = self._replay(inputs, batch)
        return replayed if replayed is not None else self._forward(inputs)

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The logits ``(S, V)`` of the sampled rows, computed eagerly."""
        if self.fast is not None:
            return self.fast(
                inputs.input_ids[0],
                inputs.position_ids[0],
                inputs.attention,
                inputs.logits_index,
                self.layer_listener,
            )
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.logits_index,
            pdserve_batch=inputs.attention,
        )
        return out.logits[0]

    def _replay(self, inputs: ModelInputs, batch: ScheduledBatch) -> torch.Tensor | None:
        """The sampled rows' logits from the step's graph (rows in packed order, so
        ``logits_index`` picks them as in the eager step), or None: run eagerly."""
        if self.graphs is None:
            return None
        meta = decode_metadata(batch, self.kv_cache.block_size)
        out = self.graphs.replay(meta) if meta is not None else None  # (B, V)
        return out[inputs.logits_index] if out is not None else None  # (S, V), a copy

    def _start_masks(self, batch: ScheduledBatch, sample_items: list[int]) -> PendingMask | None:
        """Start the sampled rows' grammar masks (None when no row is constrained)."""
        seqs = [batch.items[i].seq for i in sample_items]
        if all(seq.sampling.structured is None for seq in seqs):
            return None
        if self.grammars is None:
            raise RuntimeError("a constrained sequence reached a runner without grammars")
        for seq in seqs:
            self.grammars.attach(seq)
        return self.grammars.start_masks(
            [seq.grammar for seq in seqs], [(seq.token_ids, seq.output_start) for seq in seqs]
        )

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        """The step's packed inputs (:mod:`engine.step_inputs`)."""
        return self._inputs.build(batch, self.kernel, self.varlen)


def _is_attention(module: torch.nn.Module) -> bool:
    """transformers' self-attention modules carry their ``layer_idx`` (and write the KV)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
