"""The linear kernel (engine/kernels/linear.c) against oneDNN's packed matmul, side by side.

    .venv/bin/python benchmarks/linear_kernel.py                        # rows 1, 8, 24
    .venv/bin/python benchmarks/linear_kernel.py --rows 1,8,24,2048
    .venv/bin/python benchmarks/linear_kernel.py --flags=-mno-avx512f   # as on an AVX2 machine
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/linear_kernel.py --flags=-mno-avx512f

One "step" is the 121 linear products of one decode step of the default model (SmolLM2-135M:
30 layers of fused q/k/v 576->960, o 576->576, fused gate/up 576->3072, down 1536->576, and
the 576->49152 head; the head only up to 64 rows), on random float32 weights. Three copies of
the weights are cycled so each step streams its weights from memory, as a real step does (one
copy would sit in this machine's large L3 and flatter both sides). Reports the median step in
ms, the weight stream in GB/s and the arithmetic in GFLOP/s, for each path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.kernels import LinearKernel, load_linear

LAYER_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out)
HEAD = (576, 49152)
COPIES = 3


def shapes(rows: int) -> list[tuple[int, int]]:
    return LAYER_SHAPES * 30 + ([HEAD] if rows <= 64 else [])


def time_steps(step: Callable[[int], None], reps: int) -> float:
    step(0)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        step((i + 1) % COPIES)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


Packed = list[dict[tuple[int, int], torch.Tensor]]


def steps(
    kernel: LinearKernel,
    native: Packed,
    onednn: Packed,
    todo: list[tuple[int, int]],
    xs: dict[int, torch.Tensor],
    outs: dict[int, torch.Tensor],
) -> dict[str, Callable[[int], None]]:
    """One step of each path over weight copy ``c``."""

    def run_onednn(c: int) -> None:
        for k, n in todo:
            torch.ops.mkldnn._linear_pointwise(xs[k], onednn[c][(k, n)], None, "none", [None], "")

    def run_native(c: int) -> None:
        for k, n in todo:
            kernel(xs[k], native[c][(k, n)], None, outs[n])

    return {"oneDNN": run_onednn, "native": run_native}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,24", help="comma-separated row counts (M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--flags", default="", help="extra compiler flags for the kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = tuple(args.flags.split())
    with tempfile.TemporaryDirectory() as cache:
        kernel = load_linear(Path(cache), extra_flags=flags)
    rows_list = [int(r) for r in args.rows.split(",")]
    dims = sorted(set(shapes(1)))
    weights = [{d: torch.randn(d[1], d[0]) / 30 for d in dims} for _ in range(COPIES)]
    native = [{d: kernel.pack(w) for d, w in copy.items()} for copy in weights]
    onednn = [
        {d: torch.ops.mkldnn._reorder_linear_weight(w, None) for d, w in copy.items()}
        for copy in weights
    ]
    del weights
    print(f"threads={args.threads} flags={' '.join(flags) or '-'} panel={kernel.panel}")
    print(f"{'rows':>5} {'path':>7} {'step ms':>8} {'GB/s':>6} {'GFLOP/s':>8}")
    for rows in rows_list:
        todo = shapes(rows)
        weight_bytes = sum(k * n * 4 for k, n in todo)
        flops = sum(2 * rows * k * n for k, n in todo)
        xs = {k: torch.randn(rows, k) for k in {k for k, _ in todo}}
        outs = {n: torch.empty(rows, n) for n in {n for _, n in todo}}

        for name, step in steps(kernel, native, onednn, todo, xs, outs).items():
            t = time_steps(step, args.reps)
            print(
                f"{rows:>5} {name:>7} {t * 1e3:>8.1f} {weight_bytes / t / 1e9:>6.1f}"
                f" {flops / t / 1e9:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
