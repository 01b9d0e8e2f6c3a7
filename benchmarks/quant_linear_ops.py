"""One decode step's 121 linear products at the default model's shapes (random weights, each held
once: ~540 MB in float, streamed from memory), side by side at 1 / 4 / 24 rows: the float kernel,
the quantized kernel over Q8_0 blocks, and torch's own int8 weight-only CPU op
(``torch._weight_int8pack_mm``, per-channel scales: the maintained kernel to try first).

    .venv/bin/python benchmarks/quant_linear_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from engine.kernels.linear import load_linear
from engine.kernels.quant_linear import QuantFormat, QuantizedWeight, load_quant_linear
from engine.model_files import default_cache_dir

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * LAYERS + [(49152, 576)]


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 24])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    linear = load_linear(default_cache_dir())
    quant = load_quant_linear(default_cache_dir())
    gen = torch.Generator().manual_seed(0)
    dense, blocks, int8 = [], [], []
    for n, k in SHAPES:
        weight = QuantizedWeight.quantize_q8_0(torch.randn(n, k, generator=gen) * 0.02)
        exact = weight.dequantize()
        dense.append(linear.pack(exact))
        blocks.append(quant.pack(weight))
        scale = exact.abs().amax(1) / 127
        q = torch.round(exact / scale[:, None]).clamp(-127, 127).to(torch.int8)
        int8.append((q.contiguous(), scale.contiguous()))
    print(f"{len(SHAPES)} products, {args.threads} threads, ms per step")
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=gen) for k in (576, 1536)}
        outs = [torch.empty(m, n) for n, _ in SHAPES]

        def run_float(xs: dict[int, torch.Tensor] = xs, outs: list[torch.Tensor] = outs) -> None:
            for (_, k), packed, out in zip(SHAPES, dense, outs, strict=True):
                linear.run(xs[k], packed, None, out)

        def run_quant(xs: dict[int, torch.Tensor] = xs, outs: list[torch.Tensor] = outs) -> None:
            for (_, k), packed, out in zip(SHAPES, blocks, outs, strict=True):
                quant.run(xs[k], QuantFormat.Q8_0, packed, None, out)

        def run_torch(xs: dict[int, torch.Tensor] = xs) -> None:
            for (_, k), (q, scale) in zip(SHAPES, int8, strict=True):
                torch._weight_int8pack_mm(xs[k], q, scale)

        f, qk, t = (_time(fn, args.repeats) for fn in (run_float, run_quant, run_torch))
        print(
            f"rows={m:>3}: float kernel {f:7.1f}   quant Q8_0 {qk:7.1f}   "
            f"torch _weight_int8pack_mm {t:8.1f}"
        )


if __name__ == "__main__":
    main()
