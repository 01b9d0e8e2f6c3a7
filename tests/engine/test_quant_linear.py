"""engine.kernels.quant_linear: linear layers from GGUF blocks (Q8_0, Q4_0, Q4_1), no model.

The kernel's invariant: its output is bit for bit what the float kernel (linear.c) computes
from the de-quantized weights, on every path (fused rows M <= 4 chunks and panel groups, tiled
M > 4, short and long K slices), any N (a partial last panel), with or without bias; the
de-quantization is gguf's reference arithmetic on the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.kernels import KernelBuildError, LinearKernel, load_linear
from engine.kernels.quant_linear import (
    BLOCK,
    QuantFormat,
    QuantizedWeight,
    QuantLinearKernel,
    load_quant_linear,
)
from engine.linear import NativeLinear, QuantLinear, pack_linear

FORMATS = list(QuantFormat)
GGUF_TYPES = {
    QuantFormat.Q8_0: GGMLQuantizationType.Q8_0,
    QuantFormat.Q4_0: GGMLQuantizationType.Q4_0,
    QuantFormat.Q4_1: GGMLQuantizationType.Q4_1,
}
# (M, N, K): every M of {1, 2, 3, 4, 5, 7, 8, 18, 19, 24, 64}, N of {1, 15, 16, 17, 100, 576}
# and K of {32, 96, 576, 1536} at least twice; K 1536 spans several short (64) and long (1,024)
# slices; N 576 many panels (the fused path's panel groups), 1 / 15 / 17 a partial panel
SHAPES = [
    (1, 1, 32),
    (1, 576, 576),
    (1, 100, 1536),
    (2, 17, 96),
    (2, 576, 1536),
    (3, 15, 576),
    (3, 16, 32),
    (4, 100, 96),
    (4, 576, 576),
    (5, 17, 1536),
    (5, 1, 96),
    (7, 100, 576),
    (7, 16, 32),
    (8, 576, 96),
    (8, 16, 1536),
    (18, 100, 1536),
    (18, 15, 576),
    (19, 576, 1536),
    (19, 1, 96),
    (24, 17, 1536),
    (24, 576, 576),
    (64, 100, 1536),
    (64, 576, 32),
    (64, 15, 96),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def quant(cache: Path) -> QuantLinearKernel:
    try:
        return load_quant_linear(cache)
    except KernelBuildError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def linear_kernel(cache: Path) -> LinearKernel:
    try:
        return load_linear(cache)
    except KernelBuildError as exc:
        pytest.skip(str(exc))


def random_weight(fmt: QuantFormat, n: int, k: int, seed: int) -> QuantizedWeight:
    """Random quants under valid float16 scales (and, for Q4_1, minimums) of either sign, some
    of them zero or subnormal."""
    gen = torch.Generator().manual_seed(seed)
    blocks = k // BLOCK
    rows = torch.randint(0, 256, (n, blocks, fmt.block_bytes), dtype=torch.uint8, generator=gen)
    d = torch.randn(n, blocks, generator=gen) * 0.02
    if fmt is QuantFormat.Q4_1:
        d = d.abs()  # (max - min) / 15
    d.view(-1)[::37] = 0.0
    d.view(-1)[5::41] = 3e-7  # a float16 subnormal
    rows[..., 0:2] = d.to(torch.float16).unsqueeze(-1).view(torch.uint8)
    if fmt is QuantFormat.Q4_1:
        m = (torch.randn(n, blocks, generator=gen) * 0.1).to(torch.float16)
        rows[..., 2:4] = m.unsqueeze(-1).view(torch.uint8)
    return QuantizedWeight(fmt, rows.reshape(n, -1).contiguous(), k)


def run_quant(
    quant: QuantLinearKernel,
    weight: QuantizedWeight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    out = torch.full((x.shape[0], weight.out_features), float("nan"))
    quant(x, weight.format, quant.pack(weight), bias, out)
    return out


def run_float(
    kernel: LinearKernel, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    kernel(x, kernel.pack(w), bias, out)
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES, ids=lambda v: str(v))
def test_bit_for_bit_the_float_kernel_on_the_dequantized_weight(
    quant: QuantLinearKernel,
    linear_kernel: LinearKernel,
    fmt: QuantFormat,
    m: int,
    n: int,
    k: int,
) -> None:
    seed = m * 1_000_003 + n * 1009 + k + fmt.value
    weight = random_weight(fmt, n, k, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen)
    with_bias = (m + n + fmt.value) % 2 == 0
    bias = torch.randn(n, generator=gen) if with_bias else None
    w = weight.dequantize()
    got = run_quant(quant, weight, x, bias)
    expected = run_float(linear_kernel, w, x, bias)
    assert torch.equal(got, expected), (
        f"max abs diff {float((got - expected).abs().max()):.3g} (bias {with_bias})"
    )
    reference = x.double() @ w.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-4 * k**0.5)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 100, 576), (3, 576, 96), (19, 17, 1536)])
def test_bias_and_no_bias_agree_with_the_float_kernel(
    quant: QuantLinearKernel,
    linear_kernel: LinearKernel,
    fmt: QuantFormat,
    m: int,
    n: int,
    k: int,
) -> None:
    weight = random_weight(fmt, n, k, seed=7 + m)
    x = torch.randn(m, k)
    w = weight.dequantize()
    for bias in (None, torch.randn(n)):
        assert torch.equal(run_quant(quant, weight, x, bias), run_float(linear_kernel, w, x, bias))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2, 6, 24])
def test_same_bits_on_any_number_of_threads(
    quant: QuantLinearKernel, linear_kernel: LinearKernel, threads: int, m: int
) -> None:
    weight = random_weight(QuantFormat.Q4_1, 576, 1536, seed=m)
    x = torch.randn(m, 1536)
    expected = run_float(linear_kernel, weight.dequantize(), x, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_quant(quant, weight, x, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)


def test_reads_strided_rows_and_writes_views(quant: QuantLinearKernel) -> None:
    weight = random_weight(QuantFormat.Q8_0, 40, 64, seed=3)
    wide = torch.randn(6, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    packed = quant.pack(weight)
    out = torch.full((6, 45), float("nan"))
    quant(x, weight.format, packed, None, out[:, :40])  # a row stride of 45
    assert torch.equal(out[:, :40], run_quant(quant, weight, x.contiguous(), None))
    assert out[:, 40:].isnan().all()  # nothing written past the view's columns


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize(("n", "k"), [(1, 32), (17, 96), (64, 1536)])
def test_dequantize_is_gguf_reference(fmt: QuantFormat, n: int, k: int) -> None:
    weight = random_weight(fmt, n, k, seed=n + k)
    expected = gguf_dequantize(weight.rows.numpy(), GGUF_TYPES[fmt])
    assert expected.shape == (n, k)
    got = weight.dequantize()
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_quantize_q8_0_round_trip_is_within_half_a_scale() -> None:
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(48, 256, generator=gen) * torch.logspace(-3, 1, 256)
    w[3, 32:64] = 0.0  # a block of zeros: scale 0, every weight back to 0
    q = QuantizedWeight.quantize_q8_0(w)
    assert q.format is QuantFormat.Q8_0 and (q.out_features, q.in_features) == (48, 256)
    blocks = q.rows.view(48, 256 // BLOCK, QuantFormat.Q8_0.block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (48, 8, 1)
    err = (q.dequantize() - w).abs().view(48, -1, BLOCK)
    bound = d / 2 * (1 + 1e-3) + 1e-12
    assert (err <= bound).all(), f"worst error / scale {float((err / d.clamp_min(1e-30)).max())}"
    assert torch.equal(q.dequantize()[3, 32:64], torch.zeros(32))
    assert (d[3, 1] == 0).all()
    assert torch.equal(
        q.dequantize(), torch.from_numpy(gguf_dequantize(q.rows.numpy(), GGUF_TYPES[q.format]))
    )
    with pytest.raises(ValueError, match="blocks of 32"):
        QuantizedWeight.quantize_q8_0(torch.randn(4, 48))


def test_select_rows_and_concat() -> None:
    a = random_weight(QuantFormat.Q4_1, 8, 64, seed=1)
    b = random_weight(QuantFormat.Q4_1, 4, 64, seed=2)
    order = torch.tensor([3, 0, 7, 1, 2, 6, 5, 4])
    assert torch.equal(a.select_rows(order).dequantize(), a.dequantize()[order])
    both = QuantizedWeight.concat([a, b])
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match="share format"):
        QuantizedWeight.concat([a, random_weight(QuantFormat.Q8_0, 4, 64, seed=3)])
    with pytest.raises(ValueError, match="share format"):
        QuantizedWeight.concat([a, random_weight(QuantFormat.Q4_1, 4, 96, seed=3)])


def test_call_refuses_what_does_not_fit(quant: QuantLinearKernel) -> None:
    weight = random_weight(QuantFormat.Q4_0, 40, 64, seed=5)
    packed = quant.pack(weight)
    fmt = weight.format
    x, out = torch.randn(4, 64), torch.empty(4, 40)
    with pytest.raises(ValueError, match="expected"):  # packed one byte short
        quant(x, fmt, packed[:-1], None, out)
    with pytest.raises(ValueError, match="expected"):  # packed for another format
        quant(x, QuantFormat.Q4_1, packed, None, out)
    with pytest.raises(ValueError, match="expected"):  # another K
        quant(torch.randn(4, 96), fmt, packed, None, out)
    with pytest.raises(ValueError, match="do not fit"):  # K not a multiple of 32
        quant(torch.randn(4, 48), fmt, packed, None, out)
    with pytest.raises(ValueError, match="float64"):
        quant(x.double(), fmt, packed, None, out)
    with pytest.raises(ValueError, match="bfloat16"):
        quant(x.bfloat16(), fmt, packed, None, out)
    with pytest.raises(ValueError, match="float16"):
        quant(x, fmt, packed, None, out.half())
    with pytest.raises(ValueError, match="do not fit"):  # bias length
        quant(x, fmt, packed, torch.zeros(39), out)
    with pytest.raises(ValueError, match="do not fit"):  # rows of out
        quant(x, fmt, packed, None, torch.empty(3, 40))
    with pytest.raises(ValueError, match="do not fit"):  # no rows
        quant(torch.empty(0, 64), fmt, packed, None, torch.empty(0, 40))
    with pytest.raises(ValueError, match="strides"):  # overlapping rows
        quant(torch.randn(1, 64).expand(4, 64), fmt, packed, None, out)
    with pytest.raises(ValueError, match="do not fit"):
        quant(x, fmt, packed.view(torch.int8), None, out)


@pytest.mark.parametrize(
    ("fmt", "shape", "dtype", "in_features"),
    [
        (QuantFormat.Q8_0, (4, 34), torch.uint8, 64),  # one block's bytes for two blocks
        (QuantFormat.Q4_0, (4, 36), torch.uint8, 48),  # 48 inputs: not whole blocks
        (QuantFormat.Q4_1, (4, 36), torch.uint8, 64),  # Q4_0's row bytes for Q4_1
        (QuantFormat.Q4_1, (160,), torch.uint8, 64),  # not rows
        (QuantFormat.Q8_0, (4, 68), torch.int8, 64),  # not bytes
    ],
)
def test_weights_of_bad_shape_are_refused(
    fmt: QuantFormat, shape: tuple[int, ...], dtype: torch.dtype, in_features: int
) -> None:
    with pytest.raises(ValueError, match="do not hold"):
        QuantizedWeight(fmt, torch.zeros(shape, dtype=dtype), in_features)


def test_pack_refuses_empty_weights(quant: QuantLinearKernel) -> None:
    with pytest.raises(ValueError, match="cannot pack"):
        quant.pack(QuantizedWeight(QuantFormat.Q8_0, torch.zeros((0, 68), dtype=torch.uint8), 64))
    with pytest.raises(ValueError, match="cannot pack"):
        quant.pack(QuantizedWeight(QuantFormat.Q4_1, torch.zeros((5, 0), dtype=torch.uint8), 0))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quant_linear_module_is_native_linear_on_the_dequantized_weight(
    quant: QuantLinearKernel, linear_kernel: LinearKernel, fmt: QuantFormat
) -> None:
    weight = random_weight(fmt, 100, 96, seed=9)
    linear = torch.nn.Linear(96, 100)
    with torch.no_grad():
        linear.weight.copy_(weight.dequantize())
    module = pack_linear(linear, linear_kernel, weight, quant)
    assert isinstance(module, QuantLinear)
    assert pack_linear(linear, linear_kernel) is not module
    native = NativeLinear(linear, linear_kernel)
    x = torch.randn(2, 7, 96)
    with torch.inference_mode():
        assert torch.equal(module(x), native(x))
        assert torch.equal(module.rows(x[0].contiguous()), native(x[0]))
        assert module(torch.empty(0, 96)).shape == (0, 100)
        with pytest.raises(RuntimeError, match="float32"):
            module(x.double())
    with pytest.raises(ValueError, match="does not fit"):
        QuantLinear(torch.nn.Linear(96, 99), weight, quant)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quant_linear_rows_are_the_same_bits_on_either_side_of_max_rows(
    quant: QuantLinearKernel, linear_kernel: LinearKernel, fmt: QuantFormat
) -> None:
    """Few rows compute from the blocks, more through the float kernel over their
    de-quantization: which one ran must not show in the result (batch invariance)."""
    weight = random_weight(fmt, 72, 64, seed=11)
    linear = torch.nn.Linear(64, 72)
    with torch.no_grad():  # not the de-quantized weight: the module must not read it
        linear.weight.normal_()
    module = QuantLinear(linear, weight, quant, linear_kernel, max_rows=3)
    blocks_only = QuantLinear(linear, weight, quant)
    assert blocks_only.max_rows > 1 << 32  # without a float kernel: always the blocks
    x = torch.randn(16, 64)
    with torch.inference_mode():
        for m in range(1, 17):
            expected = run_quant(quant, weight, x[:m], linear.bias)
            assert torch.equal(module.rows(x[:m].contiguous()), expected), m
            assert torch.equal(blocks_only.rows(x[:m].contiguous()), expected), m
