"""Structured-output cost: an engine decode step unconstrained vs JSON-schema constrained.

    .venv/bin/python benchmarks/structured_output.py                 # 8 sequences, 24 steps
    .venv/bin/python benchmarks/structured_output.py --batch 16 --steps 48
    .venv/bin/python benchmarks/structured_output.py --quick --json /tmp/so.json   # seconds

One engine on the default model, in this process; after an untimed warm-up run, each round
runs the same batch twice, one mode after the other (the order alternates between rounds):
``--batch`` sequences with one chat prompt, sampled at temperature 1 (seeded), unconstrained,
then constrained to a JSON schema long enough not to close during the run. After the prompts
and ``--warmup`` steps, ``--steps`` calls of ``Engine.step`` (all decode, one token per
sequence) are timed; the figures are medians over every round's steps, as ms per step and per
token (step / batch). The mask alone: the constrained run's tokens are replayed through fresh
grammar states, timing what the runner's helper thread does for each step (sync the new token,
fill and unpack the batch's bitmask), without the forward pass beside it. ``added`` is the
constrained step minus the unconstrained one: what structured output costs on the critical
path (applying the mask to the logits, the matchers taking each sampled token, and the helper
thread's CPU time where it competes with the forward pass for cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from core.sampling import SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine import Engine
from engine.model_files import default_cache_dir, resolve_model_path
from engine.model_loader import load_model
from engine.sequence import Sequence
from engine.structured import GrammarManager, GrammarState

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 200,  # never closes within a run
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                    "in_stock": {"type": "boolean"},
                },
                "required": ["name", "qty", "in_stock"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PROMPT = "List the items of a small shop's inventory as JSON."


def run_mode(
    engine: Engine,
    prompt: list[int],
    batch: int,
    constraint: StructuredOutput | None,
    warmup: int,
    steps: int,
    tag: str,
) -> tuple[list[float], list[list[int]]]:
    """Step times (s) of ``steps`` all-decode steps, and each sequence's output tokens."""
    seqs = []
    for i in range(batch):
        sampling = SamplingParams(
            max_tokens=warmup + steps + 2,
            temperature=1.0,
            seed=i,
            ignore_eos=True,
            structured=constraint,
        )
        seq = Sequence(f"{tag}-{i}", list(prompt), len(prompt), sampling, engine.spec.eos_token_ids)
        engine.add(seq)
        seqs.append(seq)
    while any(s.num_completion_tokens == 0 for s in seqs):  # the prompts (and first tokens)
        engine.step()
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    failed = [s.error for s in seqs if s.error]
    if failed or any(s.is_finished for s in seqs):
        raise RuntimeError(f"a sequence ended during the timed steps: {failed}")
    for seq in seqs:
        engine.abort(seq.request_id)
    return times, [s.token_ids[s.output_start :] for s in seqs]


def mask_times(
    manager: GrammarManager, constraint: StructuredOutput, outputs: list[list[int]], skip: int
) -> list[float]:
    """The helper thread's work per step (sync one token, fill the bitmask), replayed."""
    states: list[GrammarState | None] = [manager.new_state(constraint) for _ in outputs]
    steps = min(len(o) for o in outputs)
    times = []
    for t in range(steps):
        tokens = [(o[:t], 0) for o in outputs]  # the output so far: the mask for token t
        start = time.perf_counter()
        manager.compute_masks(states, tokens)
        if t >= skip:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--quick", action="store_true", help="2 sequences, 4 steps (for tests)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup, args.rounds = 2, 4, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    config = EngineConfig(
        model=ModelConfig(model=path),
        cache=CacheConfig(block_size=16, num_blocks=64 + 8 * args.batch),
        scheduler=SchedulerConfig(max_num_seqs=max(8, args.batch)),
    )
    model, spec = load_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer.encode(chat, add_special_tokens=False))
    constraint = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    engine = Engine(config, model, spec, sink=lambda outputs: None)
    engine.grammars.tokenizer()  # built once, before anything is timed
    free: list[float] = []
    constrained: list[float] = []
    masks: list[float] = []
    sample = ""
    run_mode(engine, prompt, args.batch, constraint, args.warmup, args.steps, "warm")
    for r in range(args.rounds):
        for mode in ("free", "constrained") if r % 2 == 0 else ("constrained", "free"):
            given = constraint if mode == "constrained" else None
            times, outputs = run_mode(
                engine, prompt, args.batch, given, args.warmup, args.steps, f"{mode}{r}"
            )
            if given is None:
                free += times
                continue
            constrained += times
            masks += mask_times(engine.grammars, constraint, outputs, skip=args.warmup + 1)
            sample = tokenizer.decode(outputs[0])
    report = summarize(args.batch, free, constrained, masks)
    report["config"] = {
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(prompt),
        "model": spec.name,
    }
    report["sample"] = sample
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


def summarize(
    batch: int, free: list[float], constrained: list[float], masks: list[float]
) -> dict[str, Any]:
    free_ms = statistics.median(free) * 1e3
    con_ms = statistics.median(constrained) * 1e3
    mask_ms = statistics.median(masks) * 1e3
    return {
        "unconstrained": {"ms_per_step": free_ms, "ms_per_token": free_ms / batch},
        "constrained": {"ms_per_step": con_ms, "ms_per_token": con_ms / batch},
        "mask_alone": {"ms_per_step": mask_ms, "ms_per_token": mask_ms / batch},
        "added": {
            "ms_per_step": con_ms - free_ms,
            "ms_per_token": (con_ms - free_ms) / batch,
            "percent": 100 * (con_ms - free_ms) / free_ms,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"{cfg['model']}: {cfg['batch']} sequences, {cfg['prompt_tokens']}-token prompt, "
        f"median of {cfg['steps'] * cfg['rounds']} decode steps, {cfg['threads']} torch threads"
    )
    print(f"{'':<16}{'ms/step':>10}{'ms/token':>10}")
    for name in ("unconstrained", "constrained", "mask_alone", "added"):
        row = report[name]
        print(f"{name:<16}{row['ms_per_step']:>10.3f}{row['ms_per_token']:>10.3f}")
    print(f"added: {report['added']['percent']:+.1f}% per step")
    print(f"sample output: {report['sample'][:120]!r}")


if __name__ == "__main__":
    main()
