"""engine.linear: the engine's CPU linear layers compute what ``nn.Linear`` does (no model).

NativeLinear runs the C kernel of engine/kernels/linear.c (AVX-512; skipped without it),
PackedLinear oneDNN's matmul (skipped without oneDNN)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import KernelBuildError, LinearKernel, load_linear
from engine.linear import NativeLinear, PackedLinear, pack_linear, pack_linear_layers

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch"
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> LinearKernel:
    try:
        return load_linear(tmp_path_factory.mktemp("cache"))
    except KernelBuildError as exc:
        pytest.skip(str(exc))


def _module(kind: str, linear: torch.nn.Linear, kernel: LinearKernel | None) -> torch.nn.Module:
    if kind == "native":
        assert kernel is not None
        return NativeLinear(linear, kernel)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not built into this torch")
    return PackedLinear(linear)


@pytest.fixture(params=["native", "onednn"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def maybe_kernel(kind: str, request: pytest.FixtureRequest) -> LinearKernel | None:
    return request.getfixturevalue("kernel") if kind == "native" else None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 7, 48), (5, 48), (1, 300, 48)])
def test_matches_linear(
    kind: str, maybe_kernel: LinearKernel | None, bias: bool, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    module = _module(kind, linear, maybe_kernel)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = linear(x)
        got = module(x)
    assert got.shape == expected.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [
        (1, 576, 960),  # one decode token, the default model's fused q/k/v
        (11, 17, 33),  # a partial row tile, odd K, a panel and one column
        (12, 1536, 576),  # one full row tile; K longer than the kernel's K slice
        (24, 64, 31),  # fewer columns than a panel
        (29, 2100, 70),  # several K slices, a partial last one
        (130, 40, 200),  # more row tiles than threads have panels: rows are split too
        (2048, 96, 64),  # a prefill chunk
    ],
)
def test_native_shapes(kernel: LinearKernel, rows: int, k: int, n: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(k, n)
    module = NativeLinear(linear, kernel)
    x = torch.randn(rows, k)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), linear(x), rtol=1e-4, atol=1e-4)


def test_native_reads_strided_rows_and_writes_views(kernel: LinearKernel) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 40, bias=False)
    module = NativeLinear(linear, kernel)
    wide = torch.randn(6, 50)
    x = wide[:, 10:42]  # rows 50 floats apart
    out = torch.full((6, 45), float("nan"))
    kernel(x, module.packed, None, out[:, :40])  # into a view with a row stride of 45
    torch.testing.assert_close(out[:, :40], x @ linear.weight.T, rtol=1e-5, atol=1e-5)
    assert out[:, 40:].isnan().all()  # nothing written past the view's columns
    with torch.inference_mode():
        assert module(torch.empty(0, 32)).shape == (0, 40)


def test_native_refuses_what_does_not_fit(kernel: LinearKernel) -> None:
    packed = kernel.pack(torch.randn(40, 32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(torch.randn(4, 31), packed, None, torch.empty(4, 40))  # K differs
    with pytest.raises(ValueError, match="do not fit"):
        kernel(torch.randn(4, 32), packed, torch.zeros(39), torch.empty(4, 40))  # bias length
    with pytest.raises(ValueError, match="cannot pack"):
        kernel.pack(torch.randn(40, 32, dtype=torch.bfloat16))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.bf16 = torch.nn.Linear(16, 16).to(torch.bfloat16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as small language models do


@needs_onednn
@pytest.mark.parametrize("use_kernel", [True, False], ids=["native", "onednn"])
def test_pack_linear_layers_swaps_float32_cpu_layers_once(
    use_kernel: bool, request: pytest.FixtureRequest
) -> None:
    kernel = request.getfixturevalue("kernel") if use_kernel else None
    expected_type = NativeLinear if use_kernel else PackedLinear
    model = Tiny()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        before = model.head(model.proj(model.embed(ids)))
    assert pack_linear_layers(model, kernel) == 2  # proj and head; the bfloat16 layer stays
    assert isinstance(model.proj, expected_type) and isinstance(model.head, expected_type)
    assert type(model.bf16) is torch.nn.Linear
    assert model.head.weight is model.embed.weight  # still tied
    with torch.inference_mode():
        after = model.head(model.proj(model.embed(ids)))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert pack_linear_layers(model, kernel) == 0  # idempotent
    assert pack_linear(model.bf16, kernel) is model.bf16


def test_kernel_is_built_once_per_cache(kernel: LinearKernel) -> None:
    again = load_linear(kernel.path.parent.parent)
    assert again.path == kernel.path
