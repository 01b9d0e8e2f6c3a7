"""Attention on CUDA through torch's own varlen FlashAttention over the paged pool.

One call per layer for the whole step, decode tokens and prefill chunks alike: the kernel reads
every sequence's context in place through its block table (no gather, no padding, no mask),
shares each KV head among its query heads (``enable_gqa``, no expanded K/V), and masks causally
within each sequence's new tokens. ``num_splits=1`` keeps it batch invariant: a sequence's output
does not depend on what else is in the batch, so colocated and disaggregated runs stay
token-identical.

Metadata for B sequences with ``n_b`` new tokens after ``s_b`` cached ones (fresh prompts,
chunks, prefix hits and decode tokens are all the same case)::

    cu_seq_q   [0, n_0, n_0 + n_1, ...]            (B + 1,) int32: packed query offsets
    seqused_k  [s_0 + n_0, s_1 + n_1, ...]         (B,)     int32: context incl. new tokens
    cu_seq_k   [0, k_0, k_0 + k_1, ...]            (B + 1,) int32: cumsum of seqused_k
    block_table                                    (B, MB)  int32: the blocks each context
                                                            covers, padded with block 0

With ``seqlen_q < seqlen_k``, FlashAttention's causal mask is aligned bottom-right: query ``i``
of sequence b sees keys ``0 .. s_b + i``, which is exactly causal over the whole context.

Constraints of the FlashAttention 2 build inside torch (checked here before the engine starts,
so a mismatch falls back to the gather path with a reason instead of failing a step):

- CUDA, compute capability 8.0 or newer; query and pool in float16 or bfloat16;
- head size a multiple of 8, at most 256;
- paged KV: the pool as ``(num_blocks, block_size, kv_heads, head_dim)`` per K and V (the
  layout of :mod:`engine.kv_cache` already), ``block_size`` a multiple of
  :data:`VARLEN_PAGE_MULTIPLE` (256), the block table int32, ``seqused_k`` given;
- a torch whose ``varlen_attn`` takes ``block_table`` (looked up at run time, not assumed).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

VARLEN_PAGE_MULTIPLE = 256
"""FlashAttention 2 reads paged KV only in pages of a multiple of 256 token slots."""
SMALL_BLOCK_SIZE = 16
"""The automatic block size wherever varlen FlashAttention does not run (CPU, the gather
fallback): a sequence's last, partial block wastes at most 15 slots."""
VARLEN_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)


class VarlenKernel(Protocol):
    """``torch.nn.attention.varlen.varlen_attn`` (or a stand-in with its contract)."""

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seq_q: torch.Tensor,
        cu_seq_k: torch.Tensor | None,
        max_q: int,
        max_k: int,
        **kwargs: Any,
    ) -> Any: ...


class SeqSpan(NamedTuple):
    """One sequence of the step, as the kernel sees it."""

    start: int  # tokens already in the cache (computed before, or prefix hits)
    num_new: int  # tokens computed this step (1 for decode)
    block_table: Sequence[int]  # the sequence's blocks, at least ceil((start + num_new) / bs)


@dataclass(frozen=True)
class VarlenBatch:
    """Per-step metadata for :func:`varlen_attend`, on the pool's device."""

    kernel: VarlenKernel
    cu_seq_q: torch.Tensor  # (B + 1,) int32
    cu_seq_k: torch.Tensor  # (B + 1,) int32
    seqused_k: torch.Tensor  # (B,) int32
    block_table: torch.Tensor  # (B, MB) int32, rows padded with block 0
    max_q: int  # most new tokens of one sequence (host int: no device sync to read it)
    max_k: int  # longest context, new tokens included


def build_varlen_batch(
    spans: Sequence[SeqSpan], block_size: int, device: torch.device, kernel: VarlenKernel
) -> VarlenBatch:
    """The metadata of ``spans`` (in packed order), made on the host from plain ints and moved
    to ``device`` in one copy; ``max_q`` and ``max_k`` stay host ints, so nothing syncs."""
    assert spans, "a step with no sequence has no attention"
    lengths = [span.start + span.num_new for span in spans]
    max_blocks = -(-max(lengths) // block_size)
    cu_q, cu_k = [0], [0]
    table: list[int] = []
    for span, length in zip(spans, lengths, strict=True):
        cu_q.append(cu_q[-1] + span.num_new)
        cu_k.append(cu_k[-1] + length)
        needed = -(-length // block_size)
        row = list(span.block_table[:needed])  # spare blocks past the context left out
        assert len(row) == needed, "block table shorter than the context"
        table.extend(row)
        table.extend([0] * (max_blocks - len(row)))  # block 0 exists: a valid id to pad with
    num_seqs = len(spans)
    host = torch.tensor(cu_q + cu_k + lengths + table, dtype=torch.int32)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)  # (3B + 2 + B * MB,): the one host->device copy
    q_end = num_seqs + 1
    k_end = 2 * q_end
    used_end = k_end + num_seqs
    return VarlenBatch(
        kernel=kernel,
        cu_seq_q=flat[:q_end],
        cu_seq_k=flat[q_end:k_end],
        seqused_k=flat[k_end:used_end],
        block_table=flat[used_end:].view(num_seqs, max_blocks),
        max_q=max(span.num_new for span in spans),
        max_k=max(lengths),
    )


def varlen_attend(
    batch: VarlenBatch,
    layer_kv: torch.Tensor,  # (2, NB, bs, KVH, D), the step's new K and V already written
    q: torch.Tensor,  # (H, N, D), last stride 1
    scale: float,
) -> torch.Tensor:
    """Every new token's attention over its context: ``(N, H, D)``, one kernel call."""
    out = batch.kernel(
        q.transpose(0, 1),  # (N, H, D)
        layer_kv[0],  # (NB, bs, KVH, D): the pool of pages
        layer_kv[1],
        batch.cu_seq_q,
        batch.cu_seq_k,
        batch.max_q,
        batch.max_k,
        scale=scale,
        window_size=(-1, 0),  # causal, aligned to the end of each context
        enable_gqa=True,
        seqused_k=batch.seqused_k,
        block_table=batch.block_table,
        num_splits=1,  # batch invariance
    )
    assert isinstance(out, torch.Tensor)
    return out.contiguous()  # (N, H, D); a no-op unless the kernel kept q's strides


class AttentionBackend(enum.Enum):
    VARLEN = "varlen"  # torch's FlashAttention over the paged pool, one call per layer
    GATHER = "gather"  # gather blocks + SDPA (engine.attention), everywhere
    NATIVE_CPU = "native_cpu"  # CPU decode through the native kernel, prefill through gather


class VarlenSupport(NamedTuple):
    """What this torch and this GPU offer, found at run time (:func:`detect_varlen_support`)."""

    has_varlen: bool  # torch.nn.attention.varlen.varlen_attn exists
    takes_block_table: bool  # ... and accepts block_table, seqused_k and num_splits
    capability: tuple[int, int] | None  # the CUDA device's compute capability, None off CUDA


class BackendChoice(NamedTuple):
    backend: AttentionBackend
    reason: str
    block_size_needed: int | None = None  # a block size the pool would need for VARLEN


def varlen_takes_paged_kv(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (a ``varlen_attn``) takes the paged-KV and batch-invariance arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in ("block_table", "seqused_k", "num_splits"))


def load_varlen_kernel() -> VarlenKernel | None:
    """This torch's ``varlen_attn``, or None when it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn  # type: ignore[return-value]


def detect_varlen_support(device: torch.device) -> VarlenSupport:
    """What ``device`` offers; off CUDA nothing, without looking (importing the varlen module
    pulls in ``torch._dynamo``, a second of CPU start-up for nothing)."""
    if device.type != "cuda":
        return VarlenSupport(has_varlen=False, takes_block_table=False, capability=None)
    kernel = load_varlen_kernel()
    capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    return VarlenSupport(
        has_varlen=kernel is not None,
        takes_block_table=kernel is not None and varlen_takes_paged_kv(kernel),
        capability=capability,
    )


def choose_attention_backend(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int,
    support: VarlenSupport,
    native_kernel: bool = False,
) -> BackendChoice:
    """Which attention path the runner takes, and why (logged by the engine at start).

    ``native_kernel``: the CPU paged-attention kernel loaded (decode through it there)."""
    if device.type != "cuda":
        if native_kernel:
            return BackendChoice(AttentionBackend.NATIVE_CPU, f"{device.type}: native kernel")
        return BackendChoice(AttentionBackend.GATHER, f"{device.type}: no varlen FlashAttention")
    if not support.has_varlen:
        return BackendChoice(AttentionBackend.GATHER, "torch has no nn.attention.varlen")
    if not support.takes_block_table:
        return BackendChoice(
            AttentionBackend.GATHER, "this torch's varlen_attn takes no block_table/num_splits"
        )
    if support.capability is not None and support.capability < MIN_CAPABILITY:
        major, minor = support.capability
        return BackendChoice(
            AttentionBackend.GATHER, f"FlashAttention needs sm80 or newer, GPU is sm{major}{minor}"
        )
    if dtype not in VARLEN_DTYPES:
        return BackendChoice(
            AttentionBackend.GATHER, f"FlashAttention takes float16/bfloat16, not {dtype}"
        )
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return BackendChoice(
            AttentionBackend.GATHER,
            f"FlashAttention takes head sizes that are multiples of 8 up to 256, not {head_dim}",
        )
    if block_size % VARLEN_PAGE_MULTIPLE:
        needed = -(-block_size // VARLEN_PAGE_MULTIPLE) * VARLEN_PAGE_MULTIPLE
        return BackendChoice(
            AttentionBackend.GATHER,
            f"paged FlashAttention needs a block size that is a multiple of "
            f"{VARLEN_PAGE_MULTIPLE}, not {block_size} (--block-size {needed})",
            block_size_needed=needed,
        )
    return BackendChoice(AttentionBackend.VARLEN, "cuda: varlen FlashAttention over paged KV")


class BlockSizeChoice(NamedTuple):
    block_size: int
    reason: str


def choose_block_size(
    requested: int,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    support: VarlenSupport,
) -> BlockSizeChoice:
    """The pool's block size: ``requested`` unless it is 0 (``--block-size auto``); then
    :data:`VARLEN_PAGE_MULTIPLE` where :func:`choose_attention_backend` would take the varlen
    path with it (CUDA, a torch whose ``varlen_attn`` takes ``block_table``, sm80+, float16 or
    bfloat16, a head size it takes), else :data:`SMALL_BLOCK_SIZE`."""
    if requested:
        return BlockSizeChoice(requested, "--block-size")
    choice = choose_attention_backend(device, dtype, VARLEN_PAGE_MULTIPLE, head_dim, support)
    if choice.backend is AttentionBackend.VARLEN:
        return BlockSizeChoice(
            VARLEN_PAGE_MULTIPLE,
            f"auto: paged FlashAttention reads pages of {VARLEN_PAGE_MULTIPLE}",
        )
    return BlockSizeChoice(SMALL_BLOCK_SIZE, f"auto: {choice.reason}")
