"""engine.linear: the engine's CPU linear layers compute what ``nn.Linear`` does (no model).

NativeLinear runs the C kernel of engine/kernels/linear.c: as built for this CPU, and (on x86)
its portable paths built as for AVX2 and for SSE machines. PackedLinear runs oneDNN's matmul
(skipped without oneDNN)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from engine.kernels import KernelBuildError, LinearKernel, load_linear
from engine.linear import NativeLinear, PackedLinear, pack_linear, pack_linear_layers

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch"
)


# the vector paths of linear.c: this CPU's, and on x86 the generic vectors of AVX2 / SSE machines
VECTOR_PATHS = {"native": (), "avx2": ("-mno-avx512f",), "sse": ("-mno-avx",)}


def _load(flags: tuple[str, ...], cache: Path) -> LinearKernel:
    if flags and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 flags")
    try:
        return load_linear(cache, extra_flags=flags)
    except KernelBuildError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> LinearKernel:
    """As the engine builds it for this CPU."""
    return _load((), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", params=list(VECTOR_PATHS))
def any_kernel(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LinearKernel:
    """Each vector path of linear.c."""
    return _load(VECTOR_PATHS[request.param], tmp_path_factory.mktemp("cache"))


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
        (29, 2100, 70),  # several short K slices, a partial last one
        (100, 2100, 70),  # several long K slices
        (130, 40, 200),  # more row tiles than threads have panels: rows are split too
        (9, 32, 16),  # a panel or less of columns
        (7, 48, 96),  # whole panels only
        (2048, 96, 64),  # a prefill chunk
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_native_shapes(any_kernel: LinearKernel, rows: int, k: int, n: int, threads: int) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(k, n)
    module = NativeLinear(linear, any_kernel)
    x = torch.randn(rows, k)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(module(x), linear(x), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_native_takes_what_nn_linear_takes(any_kernel: LinearKernel) -> None:
    linear = torch.nn.Linear(64, 40)
    module = NativeLinear(linear, any_kernel)
    expanded = torch.randn(1, 64).expand(4, 64)  # rows 0 floats apart: copied first
    with torch.inference_mode():
        torch.testing.assert_close(module(expanded), linear(expanded), rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="float32"):
            module(torch.randn(4, 64, dtype=torch.float64))


def test_native_reads_strided_rows_and_writes_views(any_kernel: LinearKernel) -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 40, bias=False)
    module = NativeLinear(linear, any_kernel)
    wide = torch.randn(6, 50)
    x = wide[:, 10:42]  # rows 50 floats apart
    out = torch.full((6, 45), float("nan"))
    any_kernel(x, module.packed, None, out[:, :40])  # into a view with a row stride of 45
    torch.testing.assert_close(out[:, :40], x @ linear.weight.T, rtol=1e-5, atol=1e-5)
    assert out[:, 40:].isnan().all()  # nothing written past the view's columns
    with torch.inference_mode():
        assert module(torch.empty(0, 32)).shape == (0, 40)


def test_native_refuses_what_does_not_fit(any_kernel: LinearKernel) -> None:
    packed = any_kernel.pack(torch.randn(40, 32))
    with pytest.raises(ValueError, match="do not fit"):
        any_kernel(torch.randn(4, 31), packed, None, torch.empty(4, 40))  # K differs
    with pytest.raises(ValueError, match="do not fit"):
        any_kernel(torch.randn(4, 32), packed, torch.zeros(39), torch.empty(4, 40))  # bias length
    with pytest.raises(ValueError, match="cannot pack"):
        any_kernel.pack(torch.randn(40, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float64"):
        any_kernel(torch.randn(4, 32, dtype=torch.float64), packed, None, torch.empty(4, 40))
    with pytest.raises(ValueError, match="do not fit"):  # overlapping rows
        any_kernel(torch.randn(1, 32).expand(4, 32), packed, None, torch.empty(4, 40))


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
