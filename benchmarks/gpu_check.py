"""The CUDA path's first check on a lent GPU: one table of what pdserve does there.

    python benchmarks/gpu_check.py --out gpu-check-out            # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                      # any machine: the plan only
    python benchmarks/gpu_check.py --capabilities                 # versions and what torch offers

Runs the in-process :class:`~engine.engine.Engine` (no servers) on models built from configs
with seeded random weights (the default model's weights do not travel to the lent machine):
``default`` is SmolLM2-135M's shape, ``1b`` a Llama-3.2-1B-class shape for realistic figures.
Rows of the table (``--out``/table.md, also printed):

* greedy identity vs transformers on the same weights, bfloat16 and float32;
* sampled requests with seeds: all finish, and the same seed repeats its tokens;
* decode tok/s at batch 1/16/64 against the HBM bound (weight bytes / measured copy bandwidth);
* TTFT at 512 and 2,048 prompt tokens;
* KV D2H / H2D goodput against a plain pinned copy of the same bytes;
* CUDA graphs on vs off: decode tok/s at batch 1/16 with ``cuda_graphs`` on and off (the
  note says which buckets were captured; ``eager`` when none was).

Colocated and disaggregated serving on one GPU (two processes) are not run here: the table says
so. Every section checks the time left (``--budget-s``) and is reported ``skipped (time)`` when
none is; a section that raises is reported ``error`` with its message and the rest go on. On a
machine without CUDA only ``--dry-run``, ``--capabilities`` and ``--help`` do anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: benchmarks/ is on sys.path, the root is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_check_models import (
    SHAPES,
    attention_path,
    build_random_model,
    capabilities,
    copy_bandwidth,
    engine_has_graphs_setting,
    free_memory,
    generated,
    graph_path,
    greedy_reference,
    load,
    make_engine,
    run_to_completion,
    sequence,
    sync,
    weight_bytes,
)

SECTIONS = (
    ("identity", "greedy identity vs transformers on CUDA, bfloat16 and float32"),
    ("sampled", "sampled requests with seeds finish; the same seed repeats"),
    ("decode", "decode tok/s at batch 1/16/64 vs the HBM bandwidth bound"),
    ("ttft", "TTFT at 512 and 2,048 prompt tokens"),
    ("kv_copy", "KV D2H/H2D goodput vs a plain pinned copy of the same bytes"),
    ("graphs", "CUDA graphs on vs off: decode tok/s at batch 1/16, buckets captured"),
    ("serving", "colocated / disaggregated on one GPU (not run: in-process engine only)"),
)

DECODE_BATCHES = (1, 16, 64)
TTFT_LENGTHS = (512, 2048)
IDENTITY_PROMPTS = ([5, 17, 99, 3, 250, 42, 7], list(range(10, 80)), [300, 301, 302])
IDENTITY_TOKENS = 24


class Row(NamedTuple):
    """One line of the table."""

    check: str
    setting: str
    result: str
    note: str = ""


# -- the sections ---------------------------------------------------------------------------


class Context:
    """What the sections share: the model folders, the time left, the output folder."""

    def __init__(self, models: Path, shapes: list[str], deadline: float, device: str) -> None:
        self.models = models
        self.device = device
        self.shapes = shapes
        self.deadline = deadline
        self.folders: dict[str, Path] = {}
        self.bandwidth: float | None = None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def folder(self, shape: str, init_range: float = 0.1) -> Path:
        """The model folder of ``shape``, built on first use. The large init keeps logits
        peaked (no near-ties that kernel reordering could flip); speed does not depend on it."""
        key = f"{shape}-{init_range}"
        if key not in self.folders:
            self.folders[key] = build_random_model(
                self.models / key, shape, seed=0, init_range=init_range
            )
        return self.folders[key]


def section_identity(ctx: Context) -> list[Row]:
    rows = []
    for shape in ctx.shapes[:1]:
        folder = ctx.folder(shape)
        for dtype in ("bfloat16", "float32"):
            model, spec = load(folder, dtype, ctx.device)
            want = [greedy_reference(model, p, IDENTITY_TOKENS) for p in IDENTITY_PROMPTS]
            engine = make_engine(model, spec, pool_tokens=8192)
            for i, p in enumerate(IDENTITY_PROMPTS):
                engine.add(sequence(spec, f"r{i}", p, IDENTITY_TOKENS))  # both stop at EOS
            outputs = run_to_completion(engine)
            got = [generated(outputs, f"r{i}") for i in range(len(IDENTITY_PROMPTS))]
            same = sum(_common_prefix(a, b) for a, b in zip(got, want, strict=True))
            total = sum(len(w) for w in want)
            verdict = "identical" if got == want else "DIFFERS"
            note = f"{same}/{total} tokens, attention: {attention_path(engine)}"
            rows.append(Row("greedy identity", f"{shape} {dtype}", verdict, note))
            del engine, model
            free_memory()
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def section_sampled(ctx: Context) -> list[Row]:
    folder = ctx.folder(ctx.shapes[0])
    model, spec = load(folder, "bfloat16", ctx.device)
    engine = make_engine(model, spec, pool_tokens=8192)
    prompt = list(range(20, 60))
    for i in range(8):
        params = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 1000 + i % 4}
        engine.add(sequence(spec, f"s{i}", prompt, 16, ignore_eos=True, **params))
    outputs = run_to_completion(engine)
    tokens = [generated(outputs, f"s{i}") for i in range(8)]
    finished = sum(len(t) == 16 for t in tokens)
    repeat = all(tokens[i] == tokens[i + 4] for i in range(4))
    del engine, model
    free_memory()
    result = "ok" if finished == 8 and repeat else "FAILED"
    return [
        Row("sampled", "8 requests, 4 seeds", result, f"{finished}/8 done, seed repeats: {repeat}")
    ]


def section_decode(
    ctx: Context,
    overrides: dict[str, Any] | None = None,
    shapes: list[str] | None = None,
    batches: tuple[int, ...] = DECODE_BATCHES,
) -> list[Row]:
    """Decode tok/s of each shape at each batch (256-token contexts, 32 timed steps) against
    the weights-only HBM bound: B tokens per read of every weight byte at copy bandwidth."""
    if ctx.bandwidth is None:
        ctx.bandwidth = copy_bandwidth(ctx.device)
    rows = []
    for shape in shapes or ctx.shapes:
        if ctx.time_left() < 30:
            rows.append(Row("decode tok/s", shape, "skipped (time)"))
            continue
        model, spec = load(ctx.folder(shape), "bfloat16", ctx.device)
        wbytes = weight_bytes(model)
        bound_s = wbytes / ctx.bandwidth
        engine = make_engine(model, spec, **(overrides or {}))
        for batch in batches:
            tok_s = _decode_rate(engine, spec, batch, context=256, steps=32)
            rows.append(
                Row(
                    "decode tok/s",
                    f"{shape} bf16 B={batch} C=256",
                    f"{tok_s:,.0f}",
                    f"HBM bound {batch / bound_s:,.0f} tok/s "
                    f"({wbytes / 1e9:.3f} GB at {ctx.bandwidth / 1e12:.2f} TB/s): "
                    f"{100 * tok_s * bound_s / batch:.1f}%; attention: {attention_path(engine)}, "
                    f"{graph_path(engine)}",
                )
            )
        del engine, model
        free_memory()
    return rows


def _decode_rate(engine: Any, spec: Any, batch: int, context: int, steps: int) -> float:
    """Output tokens/s over ``steps`` decode steps of ``batch`` sequences at ``context``."""
    for i in range(batch):
        prompt = [(i * 7919 + p) % 400 + 3 for p in range(context)]
        engine.add(sequence(spec, f"d{batch}-{i}", prompt, steps + 8, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in _live(engine)):
        engine.step()  # prefill every prompt first
    for _ in range(3):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    run_to_completion(engine)
    return batch * steps / elapsed


def _live(engine: Any) -> list[Any]:
    sched = engine.scheduler
    return [*getattr(sched, "waiting", []), *getattr(sched, "running", [])]


def section_ttft(ctx: Context) -> list[Row]:
    rows = []
    for shape in ctx.shapes:
        if ctx.time_left() < 20:
            rows.append(Row("TTFT", shape, "skipped (time)"))
            continue
        model, spec = load(ctx.folder(shape), "bfloat16", ctx.device)
        engine = make_engine(model, spec)
        for length in TTFT_LENGTHS:
            times = [_ttft(engine, spec, length, k) for k in range(4)][1:]  # first: warm-up
            rows.append(
                Row(
                    "TTFT",
                    f"{shape} bf16 {length} tokens",
                    f"{1000 * statistics.median(times):.1f} ms",
                )
            )
        del engine, model
        free_memory()
    return rows


def _ttft(engine: Any, spec: Any, length: int, k: int) -> float:
    prompt = [(p * 31 + k + 7 * length) % 400 + 3 for p in range(length)]  # no prefix hits
    sync()
    start = time.perf_counter()
    engine.add(sequence(spec, f"t{length}-{k}", prompt, 1, ignore_eos=True))
    while True:
        if any(o.token_ids for o in engine.step()):
            break
    elapsed = time.perf_counter() - start
    run_to_completion(engine)
    return elapsed


def section_kv_copy(ctx: Context) -> list[Row]:
    import torch

    if ctx.device != "cuda":
        return [Row("KV D2H/H2D goodput", ctx.device, "skipped", "needs CUDA (pinned memory)")]
    model, spec = load(ctx.folder(ctx.shapes[0]), "bfloat16", ctx.device)
    engine = make_engine(model, spec)
    cache = engine.kv_cache
    block_ids = list(range(16384 // cache.block_size))  # a 16,384-token prompt's KV
    pages = cache.gather_pages(block_ids)
    nbytes = pages.numel() * pages.element_size()
    stager = _stager(nbytes)

    def d2h() -> None:
        if stager is not None:
            staged = stager.stage(cache.gather_pages(block_ids))
            staged.wait()
            staged.release()
        else:
            cache.gather_pages(block_ids).cpu()

    host = pages.cpu().pin_memory()

    def h2d() -> None:
        cache.scatter_pages(block_ids, host)
        torch.cuda.synchronize()

    plain_dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    plain_host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()

    def plain_d2h() -> None:
        plain_host.copy_(plain_dev, non_blocking=True)
        torch.cuda.synchronize()

    def plain_h2d() -> None:
        plain_dev.copy_(plain_host, non_blocking=True)
        torch.cuda.synchronize()

    rows = []
    how = "pinned staging, side stream" if stager is not None else "pages.cpu() (no stager)"
    for name, fn, plain in (("D2H", d2h, plain_d2h), ("H2D", h2d, plain_h2d)):
        rate, plain_rate = _rate(fn, nbytes), _rate(plain, nbytes)
        rows.append(
            Row(
                f"KV {name} goodput",
                f"{nbytes / 2**20:.0f} MiB, {len(block_ids)} blocks",
                f"{rate / 1e9:.1f} GB/s",
                f"plain pinned copy {plain_rate / 1e9:.1f} GB/s ({100 * rate / plain_rate:.0f}%)"
                + (f"; {how}" if name == "D2H" else ""),
            )
        )
    del engine, model
    free_memory()
    return rows


def _stager(nbytes: int) -> Any:
    try:
        from kvtransfer.staging import HostStager, StagingPool
    except ImportError:
        return None
    return HostStager(StagingPool(4 * nbytes + 2**20))


def _rate(fn: Callable[[], None], nbytes: int, reps: int = 10) -> float:

    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return nbytes * reps / (time.perf_counter() - start)


def section_graphs(ctx: Context) -> list[Row]:
    name = engine_has_graphs_setting()
    if name is None:
        return [Row("CUDA graphs", "on vs off", "n/a", "the engine has no CUDA-graph setting yet")]
    on, off = (
        section_decode(ctx, {name: value}, ctx.shapes[:1], (1, 16)) for value in (True, False)
    )
    rows = [r._replace(check="CUDA graphs on") for r in on]
    rows += [r._replace(check="CUDA graphs off") for r in off]
    for a, b in zip(on, off, strict=False):
        try:
            ratio = float(a.result.replace(",", "")) / float(b.result.replace(",", ""))
        except (ValueError, ZeroDivisionError):
            continue  # a section skipped for time
        rows.append(Row("CUDA graphs speedup", a.setting, f"{ratio:.2f}x", "decode tok/s on / off"))
    return rows


def section_serving(ctx: Context) -> list[Row]:
    return [
        Row(
            "colocated / disaggregated",
            "one GPU",
            "not run",
            "this check runs the in-process engine only",
        )
    ]


RUNNERS: dict[str, Callable[[Context], list[Row]]] = {
    "identity": section_identity,
    "sampled": section_sampled,
    "decode": section_decode,
    "ttft": section_ttft,
    "kv_copy": section_kv_copy,
    "graphs": section_graphs,
    "serving": section_serving,
}


# -- output ---------------------------------------------------------------------------------


def render(rows: list[Row], info: dict[str, Any]) -> str:
    head = (
        f"pdserve gpu_check: {info.get('gpu', 'no GPU')}, torch {info.get('torch')} "
        f"(CUDA {info.get('torch_cuda')}), transformers {info.get('transformers')}, "
        f"varlen_attn block_table: {info.get('varlen_block_table', False)}"
    )
    lines = [head, "", "| check | setting | result | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.setting} | {r.result} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="table, JSON")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path("/tmp/pdserve-gpu-check-models"),
        help="where the random models are written (not under --out: they are GBs)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="stop starting sections after"
    )
    parser.add_argument(
        "--sections",
        default=",".join(name for name, _ in SECTIONS),
        help="comma-separated subset of: " + ", ".join(name for name, _ in SECTIONS),
    )
    parser.add_argument("--shapes", default="default,1b", help="of: " + ", ".join(SHAPES))
    parser.add_argument(
        "--device", default="cuda", help="cpu: the sections' logic on the tiny shape, no figures"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; touch no GPU")
    parser.add_argument("--capabilities", action="store_true", help="print versions as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    root = str(Path(__file__).resolve().parent.parent)  # engine, tests.support as a script too
    if root not in sys.path:
        sys.path.insert(0, root)
    args = parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in sections if s not in RUNNERS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"gpu_check.py: unknown section or shape: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.dry_run:
        described = dict(SECTIONS)
        for name in sections:
            print(f"section {name}: {described[name]} (shapes: {', '.join(shapes)})")
        return 0
    info = capabilities()
    if args.capabilities:
        print(json.dumps(info, indent=2))
        return 0
    if args.device == "cuda" and not info["cuda_available"]:
        print("gpu_check.py: no CUDA device; use --dry-run here", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.models, shapes, time.monotonic() + args.budget_s, args.device)
    rows: list[Row] = []
    for name in sections:
        if ctx.time_left() <= 0 and name != "serving":
            rows.append(Row(name, "", "skipped (time)"))
            continue
        start = time.monotonic()
        try:
            rows.extend(RUNNERS[name](ctx))
        except Exception as exc:
            traceback.print_exc()
            rows.append(Row(name, "", "error", f"{type(exc).__name__}: {exc}"[:200]))
        print(f"section {name}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        (args.out / "table.md").write_text(render(rows, info))  # what is done, if killed later
    (args.out / "capabilities.json").write_text(json.dumps(info, indent=2))
    print(render(rows, info))
    failed = any(r.result in ("DIFFERS", "FAILED", "error") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
