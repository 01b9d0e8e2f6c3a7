"""Linear layers as the engine runs them on CPU: same math as ``nn.Linear``, weights packed once.

- :class:`NativeLinear`: the C kernel of :mod:`engine.kernels.linear` (float32), for every row
  count: it keeps decode's few rows near the memory bound and matches MKL on prefill chunks.
- :class:`PackedLinear`: oneDNN's matmul over a pre-packed weight, where the native kernel is
  not available (no C compiler, or ``--layer-kernels torch``).
- :class:`QuantLinear`: the C kernel of :mod:`engine.kernels.quant_linear`, from quantized
  blocks (``--weights gguf|int8``); bit for bit :class:`NativeLinear` on the de-quantized weight.

Either keeps the original ``weight`` parameter (tied embeddings and transformers' modules share
it), so a layer holds its weight twice: once as loaded, once packed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels import LinearKernel
from engine.kernels.build import rows_apart
from engine.kernels.quant_linear import QuantizedWeight, QuantLinearKernel


class NativeLinear(torch.nn.Module):
    """``nn.Linear`` computed by :class:`~engine.kernels.linear.LinearKernel`."""

    def __init__(self, linear: torch.nn.Linear, kernel: LinearKernel) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kernel = kernel
        self.packed = kernel.pack(linear.weight)
        out = torch.empty((1, self.out_features))
        with torch.no_grad():  # the checks that forward() then skips: these tensors never change
            kernel(torch.zeros((1, self.in_features)), self.packed, self.bias, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":  # as nn.Linear refuses it
            raise RuntimeError(f"NativeLinear takes float32 CPU input, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features)
        if not rows_apart(rows):
            rows = rows.contiguous()  # e.g. an expanded (broadcast) input
        out = torch.empty(
            (rows.shape[0], self.out_features), dtype=torch.float32, device=rows.device
        )
        if rows.shape[0]:  # rows: float32 CPU, unit stride, not overlapping (above)
            self.kernel.run(rows, self.packed, self.bias, out)
        return out.view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for callers whose ``x`` is known to be float32 CPU rows (N >= 1,
        in_features), unit stride, not overlapping: no checks, no module call (each costs
        microseconds, 121 times per decode step)."""
        out = torch.empty((x.shape[0], self.out_features))
        self.kernel.run(x, self.packed, self.bias, out)
        return out


QUANT_MAX_ROWS = 4
"""Products of at most this many rows compute from the quantized blocks (memory-bound: fewer
bytes to stream wins); more rows, where the product is compute-bound and de-quantizing costs more
than it saves, run the float kernel over the de-quantized weight: the same numbers summed in the
same order, so the result does not depend on which one ran (measured in BENCHMARKS.md)."""


class QuantLinear(torch.nn.Module):
    """``nn.Linear`` computed from quantized blocks by :class:`QuantLinearKernel` at decode's
    few rows, and by the float ``dense`` kernel over their de-quantization (when given) above
    :data:`QUANT_MAX_ROWS`: bit for bit equal either way."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        weight: QuantizedWeight,
        kernel: QuantLinearKernel,
        dense: LinearKernel | None = None,
        max_rows: int = QUANT_MAX_ROWS,
    ) -> None:
        super().__init__()
        if (weight.out_features, weight.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"quantized weight {weight.out_features} x {weight.in_features} does not fit "
                f"a linear layer of {linear.out_features} x {linear.in_features}"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.format = weight.format
        self.bias = linear.bias
        self.kernel = kernel
        self.packed = kernel.pack(weight)
        self.dense = dense
        self.dense_packed = dense.pack(weight.dequantize()) if dense is not None else None
        self.max_rows = max_rows if dense is not None else 1 << 62
        with torch.no_grad():  # the checks that forward() then skips
            kernel(
                torch.zeros((1, self.in_features)),
                self.format,
                self.packed,
                self.bias,
                torch.empty((1, self.out_features)),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"QuantLinear takes float32 CPU input, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features)
        if not rows_apart(rows):
            rows = rows.contiguous()
        if rows.shape[0]:
            out = self.rows(rows)
        else:
            out = torch.empty((0, self.out_features), dtype=torch.float32)
        return out.view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`NativeLinear.rows`."""
        out = torch.empty((x.shape[0], self.out_features))
        if x.shape[0] <= self.max_rows:
            self.kernel.run(x, self.format, self.packed, self.bias, out)
        else:
            assert self.dense is not None and self.dense_packed is not None
            self.dense.run(x, self.dense_packed, self.bias, out)
        return out


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` whose weight is pre-packed for oneDNN's matmul (CPU).

    MKL's sgemm re-packs a linear layer's weight on every call; at the row counts of decode
    (2-64) that costs as much as the product itself. oneDNN packs once here. One-row inputs keep
    MKL's gemv, which is faster than either.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # kept for one-row inputs (and for tied embeddings)
        self.bias = linear.bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


def pack_linear(
    linear: torch.nn.Module,
    kernel: LinearKernel | None = None,
    quantized: QuantizedWeight | None = None,
    quant_kernel: QuantLinearKernel | None = None,
) -> torch.nn.Module:
    """``linear`` as the engine runs it: a float32 CPU ``nn.Linear`` becomes
    :class:`QuantLinear` when given ``quantized`` blocks and ``quant_kernel``, else
    :class:`NativeLinear` with ``kernel``, else :class:`PackedLinear` where oneDNN is available;
    anything else is returned unchanged."""
    if type(linear) is not torch.nn.Linear:
        return linear
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return linear
    if quantized is not None and quant_kernel is not None:
        return QuantLinear(linear, quantized, quant_kernel, kernel)
    if kernel is not None:
        return NativeLinear(linear, kernel)
    if not torch.backends.mkldnn.is_available():
        return linear
    return PackedLinear(linear)


def pack_linear_layers(
    model: torch.nn.Module,
    kernel: LinearKernel | None = None,
    quantize: Callable[[torch.nn.Module], QuantizedWeight | None] | None = None,
    quant_kernel: QuantLinearKernel | None = None,
) -> int:
    """Swap the model's float32 CPU ``nn.Linear`` layers as :func:`pack_linear` does (with the
    blocks ``quantize`` gives a layer); returns how many were swapped (0 off CPU, or with
    neither kernel nor oneDNN). Idempotent."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            blocks = quantize(child) if quantize is not None and quant_kernel else None
            packed = pack_linear(child, kernel, blocks, quant_kernel)
            if packed is not child:
                setattr(parent, name, packed)
                swapped += 1
    return swapped
