"""engine.kernels.layer_ops: RMSNorm, RoPE and SiLU in C compute what transformers' operations
(engine.llama_forward.TorchLayerOps) compute, to float32 rounding (no model)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import KernelBuildError, LayerOps, load_layer_ops
from engine.llama_forward import TorchLayerOps

TORCH = TorchLayerOps()


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> LayerOps:
    try:
        return load_layer_ops(tmp_path_factory.mktemp("cache"))
    except KernelBuildError as exc:
        pytest.skip(str(exc))


ROWS = [1, 7, 64, 300]  # 64 and up split rows between threads


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm(ops: LayerOps, rows: int, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g) * 3
    delta = torch.randn(rows, 576, generator=g) if with_delta else None
    weight = torch.rand(576, generator=g) + 0.5
    x_ref = x.clone()
    expected = TORCH.add_rms_norm(x_ref, delta, weight, 1e-5)
    got = ops.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)  # the residual add is exact
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


def test_rms_norm_of_strided_rows(ops: LayerOps) -> None:
    wide = torch.randn(5, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    weight = torch.ones(64)
    expected = TORCH.add_rms_norm(x.clone(), None, weight, 1e-6)
    torch.testing.assert_close(ops.add_rms_norm(x, None, weight, 1e-6), expected)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_rope_in_place_on_a_qkv_view(ops: LayerOps, rows: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    heads, kv_heads = 9, 3
    qkv = torch.randn(rows, heads + 2 * kv_heads, head_dim, generator=g)
    angles = torch.rand(rows, head_dim // 2, generator=g) * 100
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qk = qkv[:, : heads + kv_heads]  # as llama_forward rotates it: q and k heads, v untouched
    v_before = qkv[:, heads + kv_heads :].clone()
    expected = TORCH.rope(qk.clone(), cos, sin)
    got = ops.rope(qk, cos, sin)
    assert got.data_ptr() == qkv.data_ptr()  # in place
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    assert torch.equal(qkv[:, heads + kv_heads :], v_before)


@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(ops: LayerOps, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=g) * 4
    gate_up[0, :4] = torch.tensor([-120.0, -88.0, 90.0, 0.0])  # far tails of exp
    expected = TORCH.silu_mul(gate_up, 1536)
    torch.testing.assert_close(ops.silu_mul(gate_up, 1536), expected, rtol=1e-6, atol=1e-6)


def test_refuses_what_does_not_fit(ops: LayerOps) -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="norm weight"):
        ops.add_rms_norm(x, None, torch.ones(63), 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        ops.add_rms_norm(x, torch.randn(3, 64), torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="float32"):
        ops.add_rms_norm(x.to(torch.bfloat16), None, torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="rope table"):
        ops.rope(torch.randn(4, 2, 64), torch.randn(3, 64), torch.randn(3, 64))
    with pytest.raises(ValueError, match="narrower"):
        ops.silu_mul(torch.randn(4, 10), 6)
    with pytest.raises(ValueError, match="float64"):
        ops.add_rms_norm(x, None, torch.ones(64, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="overlap"):  # an in-place add into one row, 4 times
        ops.add_rms_norm(torch.randn(1, 64).expand(4, 64), torch.randn(4, 64), torch.ones(64), 1e-6)
    with pytest.raises(ValueError, match="overlap"):
        ops.rope(torch.randn(1, 2, 64).expand(3, 2, 64), torch.randn(3, 64), torch.randn(3, 64))


def test_silu_passes_nan_through(ops: LayerOps) -> None:
    gate_up = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    got = ops.silu_mul(gate_up, 2)
    assert got[0, 0].isnan() and torch.isfinite(got[0, 1])
