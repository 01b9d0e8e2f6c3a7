"""Paged attention against a straightforward reference, on random tensors (no model).

Each case builds sequences with random contexts already in shuffled cache blocks, lets
:meth:`ModelRunner.prepare` build the metadata, runs :func:`paged_attention` on random new
queries/keys/values, and compares every token's output with causal attention computed one
sequence at a time over its whole context. Grouped-query attention throughout (H = 3 * KVH).
Every case runs twice: decode tokens through torch (gather + SDPA, in length groups) and through
the native kernel (reading blocks in place), which also runs in bfloat16 and at the head sizes it
has specialized code for.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import pytest
import torch

from core.sampling import SamplingParams
from engine.attention import paged_attention
from engine.kernels import KernelBuildError, PagedAttentionKernel, load_paged_attention
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence

BS, KVH, GROUP, D = 4, 2, 3, 8
H = KVH * GROUP
NUM_BLOCKS, LAYERS = 64, 2


class Case(NamedTuple):
    computed: int  # tokens already in the cache
    new: int  # tokens computed this step


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at positions ``start..`` over keys ``0..``, one head at a time.

    q (n, H, D), k and v (c, KVH, D); returns (n, H, D)."""
    out = torch.empty_like(q)
    for h in range(H):
        kv_head = h // GROUP  # transformers' grouping: consecutive query heads share a KV head
        for i in range(q.shape[0]):
            visible = start + i + 1
            scores = k[:visible, kv_head] @ q[i, h] / q.shape[-1] ** 0.5  # (visible,)
            out[i, h] = scores.softmax(0) @ v[:visible, kv_head]
    return out


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> PagedAttentionKernel:
    try:
        return load_paged_attention(tmp_path_factory.mktemp("kernels"))
    except KernelBuildError as exc:  # the engine falls back to torch there too
        pytest.skip(f"no native kernel on this machine: {exc}")


@pytest.fixture(params=["torch", "native"])
def kernel(request: pytest.FixtureRequest) -> PagedAttentionKernel | None:
    if request.param == "torch":
        return None
    return request.getfixturevalue("native")  # type: ignore[no-any-return]


def run_case(
    cases: list[Case],
    seed: int,
    kernel: PagedAttentionKernel | None,
    layer: int = 1,
    head_dim: int = D,
    dtype: torch.dtype = torch.float32,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(LAYERS, NUM_BLOCKS, BS, KVH, head_dim, dtype, torch.device("cpu"))
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))  # stale data: padding must not leak
    runner = ModelRunner(object(), cache, Sampler(seed=0), kernel)  # type: ignore[arg-type]
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    items, keys, values = [], [], []
    for i, case in enumerate(cases):
        total = case.computed + case.new
        seq = Sequence(f"s{i}", list(range(total)), total, SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-total // BS))]
        seq.num_computed_tokens = case.computed
        k = torch.randn((total, KVH, head_dim), generator=gen).to(dtype)
        v = torch.randn((total, KVH, head_dim), generator=gen).to(dtype)
        for p in range(case.computed):
            block, offset = seq.block_table[p // BS], p % BS
            cache.kv[layer, 0, block, offset] = k[p]
            cache.kv[layer, 1, block, offset] = v[p]
        items.append(ScheduledSeq(seq, case.new, True))
        keys.append(k)
        values.append(v)
    inputs = runner.prepare(ScheduledBatch(tuple(items)))
    order = inputs.sample_items  # every item samples: rows follow the packed order
    assert sorted(order) == list(range(len(cases)))
    new_k = torch.cat([keys[i][cases[i].computed :] for i in order])  # (N, KVH, D) packed
    new_v = torch.cat([values[i][cases[i].computed :] for i in order])
    query = torch.randn((new_k.shape[0], H, head_dim), generator=gen).to(dtype)  # (N, H, D)
    out, _ = paged_attention(
        types.SimpleNamespace(layer_idx=layer),  # type: ignore[arg-type]
        query.transpose(0, 1)[None],  # (1, H, N, D)
        new_k.transpose(0, 1)[None],  # (1, KVH, N, D)
        new_v.transpose(0, 1)[None],
        None,
        scaling=head_dim**-0.5,
        pdserve_batch=inputs.attention,
    )
    assert out.shape == (1, new_k.shape[0], H, head_dim)
    decoding = any(case.new == 1 for case in cases)
    assert (inputs.attention.native is not None) == (kernel is not None and decoding)
    offset = 0
    for i in order:
        case = cases[i]
        expected = reference(
            query[offset : offset + case.new].float(),
            keys[i].float(),
            values[i].float(),
            case.computed,
        ).to(dtype)
        tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(
            out[0, offset : offset + case.new], expected, msg=f"seq {i}", **tolerance
        )
        offset += case.new
    for i, item in enumerate(items):  # every position's K and V is now in the cache
        table = item.seq.block_table
        for p in range(cases[i].computed + cases[i].new):
            torch.testing.assert_close(cache.kv[layer, 0, table[p // BS], p % BS], keys[i][p])
            torch.testing.assert_close(cache.kv[layer, 1, table[p // BS], p % BS], values[i][p])


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param([Case(0, 7)], id="one-prompt-from-zero"),
        pytest.param([Case(0, 1)], id="one-token-prompt"),
        pytest.param([Case(9, 6)], id="one-prompt-chunk-after-context"),
        pytest.param([Case(5, 1)], id="one-decode"),
        pytest.param([Case(3, 1), Case(12, 1), Case(7, 1)], id="decode-ragged"),
        pytest.param([Case(4, 1), Case(8, 1)], id="decode-full-blocks"),
        pytest.param([Case(0, 5), Case(0, 9)], id="two-prompts"),
        pytest.param(
            [Case(60, 1), Case(1, 1), Case(58, 1), Case(2, 1), Case(0, 1), Case(3, 6)],
            id="decode-in-length-groups",
        ),
        pytest.param([Case(6, 1), Case(0, 10), Case(2, 1)], id="decode-around-a-prompt"),
        pytest.param(
            [Case(0, 3), Case(11, 1), Case(5, 7), Case(20, 1), Case(0, 1)],
            id="mixed-chunks-and-decode",
        ),
    ],
)
def test_paged_attention_matches_reference(
    cases: list[Case], kernel: PagedAttentionKernel | None
) -> None:
    run_case(cases, seed=len(cases), kernel=kernel)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int, kernel: PagedAttentionKernel | None) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    count = int(torch.randint(1, 7, (1,), generator=gen))
    cases = []
    for _ in range(count):
        computed = int(torch.randint(0, 25, (1,), generator=gen))
        prefill = bool(torch.rand(1, generator=gen) < 0.4)
        new = int(torch.randint(2, 9, (1,), generator=gen)) if prefill else 1
        cases.append(Case(computed, new))
    run_case(cases, seed=seed, kernel=kernel, layer=seed % LAYERS)


def test_layers_do_not_mix(kernel: PagedAttentionKernel | None) -> None:
    run_case([Case(5, 1), Case(0, 4)], seed=7, kernel=kernel, layer=0)


DECODE_MIX = [Case(0, 1), Case(3, 1), Case(4, 1), Case(37, 1), Case(16, 1), Case(5, 7)]


@pytest.mark.parametrize("head_dim", [64, 128, 40], ids=["d64", "d128", "d40-generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_native_kernel_head_sizes_and_dtypes(
    native: PagedAttentionKernel, head_dim: int, dtype: torch.dtype
) -> None:
    """The kernel's specialized (AVX-512) code for head sizes 64 and 128 and its generic loops,
    in both dtypes, next to a prefill chunk that takes the torch path in the same step."""
    run_case(DECODE_MIX, seed=head_dim, kernel=native, head_dim=head_dim, dtype=dtype)


def test_native_kernel_refuses_bad_shapes(native: PagedAttentionKernel) -> None:
    layer = torch.zeros((2, 4, BS, KVH, D))
    query = torch.zeros((1, H + 1, D))  # heads not a multiple of KV heads
    table = torch.zeros((1, 1), dtype=torch.long)
    one = torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="refused"):
        native(query, torch.empty_like(query), layer, table, one, 1.0)
    query = torch.zeros((1, H, D))
    with pytest.raises(ValueError, match="refused"):  # a context longer than its block row
        native(query, torch.empty_like(query), layer, table, one * (BS + 1), 1.0)
