"""PackedLinear: oneDNN-packed CPU linear layers compute what ``nn.Linear`` does (no model)."""

from __future__ import annotations

import pytest
import torch

from engine.model_runner import PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 7, 48), (5, 48), (1, 300, 48)])
def test_packed_linear_matches_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = linear(x)
        got = packed(x)
    assert got.shape == expected.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.bf16 = torch.nn.Linear(16, 16).to(torch.bfloat16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as small language models do


def test_pack_linear_layers_swaps_float32_cpu_layers_once() -> None:
    model = Tiny()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        before = model.head(model.proj(model.embed(ids)))
    assert pack_linear_layers(model) == 2  # proj and head; the bfloat16 layer stays
    assert isinstance(model.proj, PackedLinear) and isinstance(model.head, PackedLinear)
    assert type(model.bf16) is torch.nn.Linear
    assert model.head.weight is model.embed.weight  # still tied
    with torch.inference_mode():
        after = model.head(model.proj(model.embed(ids)))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert pack_linear_layers(model) == 0  # idempotent
