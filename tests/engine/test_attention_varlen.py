"""Varlen FlashAttention metadata and backend choice, on CPU (no kernel).

The metadata :meth:`ModelRunner.prepare` builds for the varlen path is checked against the
gather path's for a mixed batch (decode, fresh prompt, chunk, prefix hit), then driven through a
pure-torch paged varlen attention with the kernel's contract (:func:`reference_varlen_attn`) and
compared numerically with the gather path: equal outputs mean the offsets, lengths and block
tables say what the gather path's block ids and masks say.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from core.sampling import SamplingParams
from engine.attention import paged_attention
from engine.attention_varlen import (
    VARLEN_PAGE_MULTIPLE,
    AttentionBackend,
    SeqSpan,
    VarlenSupport,
    build_varlen_batch,
    choose_attention_backend,
    detect_varlen_support,
    load_varlen_kernel,
    varlen_attend,
    varlen_takes_paged_kv,
)
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from engine.step_inputs import ModelInputs
from tests.support.tiny_models import build_tiny_model

BS, KVH, GROUP, D = 4, 2, 3, 8
H = KVH * GROUP
NUM_BLOCKS, LAYERS, LAYER = 32, 2, 1
CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def reference_varlen_attn(
    query: torch.Tensor,  # (N, H, D)
    key: torch.Tensor,  # (NB, bs, KVH, D)
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    **kwargs: Any,
) -> torch.Tensor:
    """Paged varlen attention as FlashAttention computes it, one sequence at a time: causal
    aligned bottom-right, consecutive query heads sharing a KV head."""
    assert kwargs["window_size"] == (-1, 0) and kwargs["enable_gqa"]
    assert kwargs["num_splits"] == 1
    seqused_k, table = kwargs["seqused_k"], kwargs["block_table"]
    for t in (cu_seq_q, seqused_k, table):
        assert t.dtype == torch.int32
    assert key.dim() == 4 and key.shape[1:] == value.shape[1:]
    group = query.shape[1] // key.shape[2]
    out = torch.empty_like(query)
    num_seqs = seqused_k.numel()
    assert cu_seq_q.numel() == num_seqs + 1 and table.shape[0] == num_seqs
    if cu_seq_k is not None:
        assert torch.equal(cu_seq_k[1:] - cu_seq_k[:-1], seqused_k)
    for b in range(num_seqs):
        q0, q1 = int(cu_seq_q[b]), int(cu_seq_q[b + 1])
        used = int(seqused_k[b])
        assert q1 - q0 <= max_q and used <= max_k
        blocks = table[b].long()
        k = key[blocks].reshape(-1, key.shape[2], key.shape[3])[:used]  # (used, KVH, D)
        v = value[blocks].reshape(-1, key.shape[2], key.shape[3])[:used]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, used, D)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[q0:q1].transpose(0, 1)  # (H, n, D)
        scores = q @ k.transpose(1, 2) * kwargs["scale"]  # (H, n, used)
        n = q1 - q0
        ctx_pos = torch.arange(used, device=q.device)
        q_pos = used - n + torch.arange(n, device=q.device)  # bottom-right aligned
        visible = ctx_pos[None, :] <= q_pos[:, None]  # (n, used)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


def make_seq(
    rid: str, total: int, computed: int, table: list[int], tokens: list[int] | None = None
) -> Sequence:
    seq = Sequence(rid, tokens or list(range(total)), total, SamplingParams())
    seq.block_table = list(table)
    seq.num_computed_tokens = computed
    return seq


def mixed_batch() -> ScheduledBatch:
    """Decode, fresh prompt, chunk and prefix hit; the hit shares its first two blocks with the
    chunk's sequence (as the prefix cache hands them out), tables carry spare blocks."""
    items = (
        ScheduledSeq(make_seq("chunk", 12, 4, [3, 9, 17]), 3, False),  # positions 4..6
        ScheduledSeq(make_seq("decode", 7, 6, [5, 11]), 1, True),  # position 6
        ScheduledSeq(make_seq("fresh", 6, 0, [20, 2, 30]), 6, True),  # 0..5, a spare block
        ScheduledSeq(make_seq("hit", 10, 8, [3, 9, 26]), 2, True),  # hits: blocks 3 and 9
        ScheduledSeq(make_seq("decode2", 2, 1, [14]), 1, True),  # position 1
    )
    return ScheduledBatch(items)


def make_cache(seed: int) -> KVCache:
    cache = KVCache(LAYERS, NUM_BLOCKS, BS, KVH, D, torch.float32, CPU)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def prepare(cache: KVCache, batch: ScheduledBatch, varlen: bool) -> ModelInputs:
    kernel = reference_varlen_attn if varlen else None
    runner = ModelRunner(object(), cache, Sampler(seed=0), varlen=kernel)  # type: ignore[arg-type]
    return runner.prepare(batch)


def test_metadata_of_a_mixed_batch_matches_the_gather_path() -> None:
    batch = mixed_batch()
    gather = prepare(make_cache(0), batch, varlen=False)
    inputs = prepare(make_cache(0), batch, varlen=True)
    meta = inputs.attention.varlen
    assert meta is not None
    att = inputs.attention
    assert att.decode == () and att.prefill is None and att.native is None
    # the same packed tokens, slots and sampled rows as the gather path
    assert torch.equal(inputs.input_ids, gather.input_ids)
    assert torch.equal(inputs.position_ids, gather.position_ids)
    assert torch.equal(att.slot_mapping, gather.attention.slot_mapping)
    assert torch.equal(inputs.logits_index, gather.logits_index)
    assert inputs.sample_items == gather.sample_items
    # packed order: decode by context (decode2, decode), then chunk, fresh, hit
    assert meta.cu_seq_q.tolist() == [0, 1, 2, 5, 11, 13]
    assert meta.seqused_k.tolist() == [2, 7, 7, 6, 10]
    assert meta.cu_seq_k.tolist() == [0, 2, 9, 16, 22, 32]
    assert (meta.max_q, meta.max_k) == (6, 10)
    assert meta.block_table.tolist() == [
        [14, 0, 0],
        [5, 11, 0],
        [3, 9, 0],
        [20, 2, 0],  # only the blocks the context covers: the spare block 30 is cut
        [3, 9, 26],
    ]
    # every block a query reads is the gather path's block for that position
    for b, rows in enumerate(meta.block_table.tolist()):
        q0, q1 = meta.cu_seq_q[b].item(), meta.cu_seq_q[b + 1].item()
        used = meta.seqused_k[b].item()
        positions = gather.position_ids[0, q0:q1].tolist()
        assert positions[-1] == used - 1  # the last new token ends the context
        slots = att.slot_mapping[q0:q1].tolist()
        assert slots == [rows[p // BS] * BS + p % BS for p in positions]
    # the gather path's block ids, row by row in packed order, agree where the context lies
    contexts = [g.context for g in gather.attention.decode]
    assert gather.attention.prefill is not None and gather.attention.prefill.context is not None
    contexts.append(gather.attention.prefill.context)
    gather_rows = [r for c in contexts for r in c.block_ids.view(c.num_seqs, -1).tolist()]
    assert len(gather_rows) == len(batch.items)
    for row, varlen_row, used in zip(
        gather_rows, meta.block_table.tolist(), meta.seqused_k.tolist(), strict=True
    ):
        blocks = -(-used // BS)
        assert row[:blocks] == varlen_row[:blocks]


def test_metadata_is_one_host_to_device_copy() -> None:
    spans = [SeqSpan(3, 1, [4]), SeqSpan(0, 5, [1, 2])]
    meta = build_varlen_batch(spans, BS, CPU, reference_varlen_attn)
    ptr = meta.cu_seq_q.untyped_storage().data_ptr()
    for t in (meta.cu_seq_k, meta.seqused_k, meta.block_table):
        assert t.untyped_storage().data_ptr() == ptr and t.dtype == torch.int32
    assert meta.block_table.shape == (2, 2) and meta.block_table.is_contiguous()
    assert isinstance(meta.max_q, int) and isinstance(meta.max_k, int)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_over_varlen_metadata_equals_gather_path(seed: int) -> None:
    batch = mixed_batch()
    gen = torch.Generator().manual_seed(100 + seed)
    num_tokens = sum(item.num_new_tokens for item in batch.items)
    query = torch.randn((num_tokens, H, D), generator=gen)  # (N, H, D) in packed order
    key = torch.randn((num_tokens, KVH, D), generator=gen)
    value = torch.randn((num_tokens, KVH, D), generator=gen)
    outs = []
    for varlen in (False, True):
        cache = make_cache(seed)  # the same stale contents: padding must not leak either way
        inputs = prepare(cache, batch, varlen)
        out, _ = paged_attention(
            types.SimpleNamespace(layer_idx=LAYER),  # type: ignore[arg-type]
            query.transpose(0, 1)[None],  # (1, H, N, D)
            key.transpose(0, 1)[None],  # (1, KVH, N, D)
            value.transpose(0, 1)[None],
            None,
            scaling=D**-0.5,
            pdserve_batch=inputs.attention,
        )
        outs.append((out, cache.kv.clone()))
    (gather_out, gather_kv), (varlen_out, varlen_kv) = outs
    assert varlen_out.shape == (1, num_tokens, H, D)
    assert torch.equal(gather_kv, varlen_kv)  # the same slots written
    torch.testing.assert_close(varlen_out, gather_out, rtol=1e-5, atol=1e-5)


def test_llama_forward_through_varlen_matches_transformers(tmp_path: Path) -> None:
    """The whole forward pass with every layer's attention through the varlen call: a chunked
    prompt (two steps, the second with a context) beside a fresh one."""
    model, spec = load_model(ModelConfig(model=str(build_tiny_model(tmp_path, "llama", 512))))
    prompts = [list(range(10, 33)), [5, 17, 99, 3, 250]]
    with torch.inference_mode():
        expected = [model(torch.tensor([p])).logits[0, -1] for p in prompts]
    cache = KVCache(spec.num_layers, 32, BS, spec.num_kv_heads, spec.head_dim, torch.float32, CPU)
    runner = ModelRunner(model, cache, Sampler(seed=0), varlen=reference_varlen_attn)
    assert runner.fast is not None
    long_seq = make_seq("long", len(prompts[0]), 0, list(range(6)), prompts[0])
    short_seq = make_seq("short", len(prompts[1]), 0, [10, 11], prompts[1])
    steps = [
        ScheduledBatch((ScheduledSeq(long_seq, 10, False),)),
        ScheduledBatch((ScheduledSeq(long_seq, 13, True), ScheduledSeq(short_seq, 5, True))),
    ]
    logits = torch.empty(0)
    inputs = None
    for step in steps:
        inputs = runner.prepare(step)
        assert inputs.attention.varlen is not None
        with torch.inference_mode():
            logits = runner.fast(
                inputs.input_ids[0], inputs.position_ids[0], inputs.attention, inputs.logits_index
            )
        for item in step.items:
            item.seq.num_computed_tokens += item.num_new_tokens
    assert inputs is not None
    for row, i in enumerate(inputs.sample_items):
        torch.testing.assert_close(logits[row], expected[i], atol=1e-4, rtol=1e-4)


def test_takes_paged_kv_is_read_from_the_signature() -> None:
    def old(query: Any, key: Any, value: Any, cu_seq_q: Any, cu_seq_k: Any) -> None: ...

    def new(*, block_table: Any = None, seqused_k: Any = None, num_splits: Any = None) -> None: ...

    assert not varlen_takes_paged_kv(old)
    assert varlen_takes_paged_kv(new)
    kernel = load_varlen_kernel()
    assert kernel is not None and varlen_takes_paged_kv(kernel)  # the pinned torch has it


def test_nothing_is_looked_up_off_cuda() -> None:
    assert detect_varlen_support(CPU) == VarlenSupport(False, False, None)


FULL = VarlenSupport(has_varlen=True, takes_block_table=True, capability=(9, 0))


@pytest.mark.parametrize(
    ("device", "dtype", "block_size", "head_dim", "support", "native", "backend", "reason"),
    [
        (CPU, torch.float32, 16, 64, FULL, False, AttentionBackend.GATHER, "cpu"),
        (CPU, torch.bfloat16, 256, 64, FULL, True, AttentionBackend.NATIVE_CPU, "native"),
        (CUDA, torch.float32, 256, 64, FULL, False, AttentionBackend.GATHER, "float16/bfloat16"),
        (CUDA, torch.bfloat16, 256, 64, FULL, False, AttentionBackend.VARLEN, "varlen"),
        (CUDA, torch.float16, 512, 128, FULL, False, AttentionBackend.VARLEN, "varlen"),
        (CUDA, torch.bfloat16, 16, 64, FULL, False, AttentionBackend.GATHER, "--block-size 256"),
        (CUDA, torch.bfloat16, 256, 60, FULL, False, AttentionBackend.GATHER, "head sizes"),
        (CUDA, torch.bfloat16, 256, 512, FULL, False, AttentionBackend.GATHER, "head sizes"),
        (
            CUDA,
            torch.bfloat16,
            256,
            64,
            FULL._replace(takes_block_table=False),
            False,
            AttentionBackend.GATHER,
            "block_table",
        ),
        (
            CUDA,
            torch.bfloat16,
            256,
            64,
            VarlenSupport(False, False, (9, 0)),
            False,
            AttentionBackend.GATHER,
            "no nn.attention.varlen",
        ),
        (
            CUDA,
            torch.float16,
            256,
            64,
            FULL._replace(capability=(7, 5)),
            False,
            AttentionBackend.GATHER,
            "sm75",
        ),
    ],
)
def test_backend_choice(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int,
    support: VarlenSupport,
    native: bool,
    backend: AttentionBackend,
    reason: str,
) -> None:
    choice = choose_attention_backend(device, dtype, block_size, head_dim, support, native)
    assert choice.backend is backend
    assert reason in choice.reason


def test_unsupported_block_size_reports_the_size_needed() -> None:
    choice = choose_attention_backend(CUDA, torch.bfloat16, 16, 64, FULL)
    assert choice.block_size_needed == VARLEN_PAGE_MULTIPLE
    choice = choose_attention_backend(CUDA, torch.bfloat16, 300, 64, FULL)
    assert choice.block_size_needed == 2 * VARLEN_PAGE_MULTIPLE
    assert choose_attention_backend(CUDA, torch.bfloat16, 256, 64, FULL).block_size_needed is None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_BS, CUDA_H, CUDA_KVH, CUDA_D = VARLEN_PAGE_MULTIPLE, 8, 2, 64


def cuda_case(
    spans: list[SeqSpan], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random pool and queries on CUDA: layer_kv (2, NB, bs, KVH, D) and q (H, N, D), q as a
    strided slice of a fused qkv buffer (as :class:`LlamaForward` hands it over)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = 1 + max(max(span.block_table) for span in spans)
    shape = (2, num_blocks, CUDA_BS, CUDA_KVH, CUDA_D)
    layer_kv = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    n = sum(span.num_new for span in spans)
    qkv = torch.randn((n, CUDA_H + 2 * CUDA_KVH, CUDA_D), generator=gen, device="cuda")
    return layer_kv, qkv.to(dtype)[:, :CUDA_H].transpose(0, 1)


# decode over two blocks, a fresh prompt, a chunk with context, a prefix hit sharing blocks 0-1
CUDA_SPANS = [
    SeqSpan(300, 1, [3, 4]),
    SeqSpan(0, 40, [5]),
    SeqSpan(266, 50, [6, 7]),
    SeqSpan(512, 9, [0, 1, 2]),
]


@needs_cuda
def test_cuda_backend_is_varlen_for_bfloat16() -> None:
    support = detect_varlen_support(CUDA)
    choice = choose_attention_backend(CUDA, torch.bfloat16, CUDA_BS, CUDA_D, support)
    assert choice.backend is AttentionBackend.VARLEN, choice.reason


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_reference(dtype: torch.dtype) -> None:
    kernel = load_varlen_kernel()
    assert kernel is not None
    layer_kv, q = cuda_case(CUDA_SPANS, dtype)
    meta = build_varlen_batch(CUDA_SPANS, CUDA_BS, CUDA, kernel)
    out = varlen_attend(meta, layer_kv, q, CUDA_D**-0.5)  # (N, H, D)
    assert out.shape == (q.shape[1], CUDA_H, CUDA_D) and out.is_contiguous()
    ref_meta = build_varlen_batch(CUDA_SPANS, CUDA_BS, CUDA, reference_varlen_attn)
    expected = varlen_attend(ref_meta, layer_kv.float(), q.float(), CUDA_D**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_cuda_kernel_is_batch_invariant() -> None:
    """num_splits=1: a sequence's output is bitwise the same alone and inside a batch."""
    kernel = load_varlen_kernel()
    assert kernel is not None
    layer_kv, q = cuda_case(CUDA_SPANS, torch.bfloat16, seed=1)
    batch = varlen_attend(
        build_varlen_batch(CUDA_SPANS, CUDA_BS, CUDA, kernel), layer_kv, q, CUDA_D**-0.5
    )
    offset = 0
    for span in CUDA_SPANS:
        alone = varlen_attend(
            build_varlen_batch([span], CUDA_BS, CUDA, kernel),
            layer_kv,
            q[:, offset : offset + span.num_new],
            CUDA_D**-0.5,
        )
        assert torch.equal(alone, batch[offset : offset + span.num_new])
        offset += span.num_new
