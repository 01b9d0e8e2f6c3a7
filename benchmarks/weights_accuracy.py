"""What quantized weights do to the default model's output: ``--weights gguf`` and ``int8``
against ``float``, side by side in one run.

    .venv/bin/python benchmarks/weights_accuracy.py                    # README + BENCHMARKS text
    .venv/bin/python benchmarks/weights_accuracy.py --text my.txt --max-new-tokens 64

For each format the model is loaded afresh and its linear layers swapped for the kernels the
engine runs (:mod:`engine.linear`; ``float``: the native float kernel, ``gguf``/``int8``: the
quantized kernel over :mod:`engine.quantized_weights`' blocks), then:

- **perplexity** of the text set (windows of ``--window`` tokens, teacher-forced);
- **top-1 agreement** with ``float``: the share of the text's positions whose most likely next
  token is the one ``float`` picks, and the largest absolute logit difference;
- **greedy agreement**: ``--max-new-tokens`` greedy tokens for each of the built-in prompts
  (transformers' ``generate``), the share of continuations identical to ``float``'s and the mean
  share of tokens before the first divergence.

``gguf`` computes from the same numbers as ``float`` (the GGUF file is what the float weights
were de-quantized from), so its rows should read 1.0 / 0.0 exactly; ``int8`` re-quantizes them.
The text set defaults to this repository's README.md and BENCHMARKS.md (technical English and
code, what is here without a download); pass ``--text`` for another.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig, WeightsChoice
from engine.kernels import load_linear
from engine.kernels.quant_linear import load_quant_linear
from engine.linear import pack_linear_layers
from engine.model_files import default_cache_dir
from engine.model_loader import load_model
from engine.quantized_weights import FLOAT_PLAN, plan_weights

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "Explain why the sky is blue in two sentences.",
    "def fibonacci(n):",
    "Here is a short story about a robot who learns to paint:",
    "The three primary colors are",
    "List five fruits that are red:",
    "Translate to French: I would like a cup of coffee.",
    "The main difference between TCP and UDP is",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The theory of relativity was proposed by",
    "Write a haiku about winter:",
    "SELECT name, age FROM users WHERE",
    "The human heart has four chambers:",
    "Photosynthesis is the process by which",
    "A good password should",
]


def _model(weights: str, model_name: str) -> tuple[torch.nn.Module, Any]:
    model, _ = load_model(ModelConfig(model=model_name, device="cpu"))
    cache = default_cache_dir()
    if weights == "float":
        plan = FLOAT_PLAN
        pack_linear_layers(model, load_linear(cache))
    else:
        plan = plan_weights(WeightsChoice(weights), model_name, model, True)
        pack_linear_layers(model, load_linear(cache), plan.quantized, load_quant_linear(cache))
    return model, plan.label


def _logits(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(w.unsqueeze(0)).logits[0] for w in windows]  # type: ignore[operator]


def _perplexity(logits: list[torch.Tensor], windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for lg, w in zip(logits, windows, strict=True):
        nll += float(torch.nn.functional.cross_entropy(lg[:-1], w[1:], reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def _greedy(model: torch.nn.Module, tokenizer: Any, max_new: int) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            gen = model.generate(  # type: ignore[operator]
                ids, max_new_tokens=max_new, do_sample=False, min_new_tokens=max_new
            )
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", nargs="+", default=["float", "gguf", "int8"])
    parser.add_argument(
        "--text", nargs="+", type=Path, default=[ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    )
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from engine.model_files import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(model=args.model)))
    ids = tokenizer("\n\n".join(p.read_text() for p in args.text), return_tensors="pt").input_ids[0]
    windows = [ids[i : i + args.window] for i in range(0, len(ids) - 1, args.window)]
    windows = [w for w in windows if len(w) > 1][: args.max_windows]
    tokens = sum(len(w) - 1 for w in windows)
    names = ", ".join(p.name for p in args.text)
    print(
        f"text: {names}: {tokens} scored tokens, {len(windows)} windows of <= {args.window}; "
        f"greedy: {len(PROMPTS)} prompts x {args.max_new_tokens}"
    )
    reference: tuple[list[torch.Tensor], list[list[int]]] | None = None
    rows = []
    header = f"{'weights':>16} {'ppl':>8} {'top-1 agree':>11} {'max |dlogit|':>12}"
    print(header + f" {'greedy same':>11} {'mean prefix':>11} {'s':>6}")
    for weights in args.weights:
        started = time.monotonic()
        model, label = _model(weights, args.model)
        logits = _logits(model, windows)
        greedy = _greedy(model, tokenizer, args.max_new_tokens)
        if reference is None:
            reference = (logits, greedy)
        ref_logits, ref_greedy = reference
        agree = sum(
            int((a.argmax(-1) == b.argmax(-1))[:-1].sum())
            for a, b in zip(logits, ref_logits, strict=True)
        )
        diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits, strict=True))
        same = sum(g == r for g, r in zip(greedy, ref_greedy, strict=True))
        prefixes = []
        for g, r in zip(greedy, ref_greedy, strict=True):
            n = next((i for i, (x, y) in enumerate(zip(g, r, strict=True)) if x != y), len(r))
            prefixes.append(n / len(r))
        row = {
            "weights": label,
            "perplexity": _perplexity(logits, windows),
            "top1_agreement": agree / tokens,
            "max_abs_logit_diff": diff,
            "greedy_identical": same / len(PROMPTS),
            "mean_prefix_share": sum(prefixes) / len(prefixes),
            "seconds": time.monotonic() - started,
        }
        rows.append(row)
        print(
            f"{label:>16} {row['perplexity']:8.3f} {row['top1_agreement']:11.4f} "
            f"{diff:12.4g} {same:>5}/{len(PROMPTS):<5} {row['mean_prefix_share']:11.3f} "
            f"{row['seconds']:6.1f}",
            flush=True,
        )
        del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
