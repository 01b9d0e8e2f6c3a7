"""Speculative decoding through the whole engine on tiny random models, in-process.

Greedy output is token-identical to transformers whatever the drafts: prompt lookup, a draft that
is always right (everything kept), one that is always wrong (nothing kept), under chunked
prefill and preemption. Seeded sampled output (with penalties and logprobs) is identical to the
output without speculation; unseeded sampled output follows the same distribution (a
chi-square test over token triples). Stop tokens and ``max_tokens`` end a sequence inside a
kept draft, and the pool is whole afterwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from pathlib import Path

import pytest
import torch

from core.sampling import SamplingParams
from engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    SpeculativeMethod,
)
from engine.engine import Engine, RequestOutput
from engine.model_files import ModelSpec
from engine.model_loader import load_model
from engine.sequence import Sequence
from engine.speculative import DraftRequest, SpecState, Speculator
from tests.engine.tiny_engine import greedy_reference
from tests.support.tiny_models import build_tiny_model

REPEATING = [11, 12, 13, 14, 15, 16, 11, 12, 13, 14, 15, 16, 11, 12, 13]
PROMPTS = [
    REPEATING,
    [5, 17, 99, 3, 250, 42, 7, 5, 17, 99],
    list(range(10, 60)),
    [int(x) for x in torch.randint(3, 500, (37,), generator=torch.Generator().manual_seed(3))],
]
MAX_TOKENS = [24, 17, 30, 9]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, ModelSpec, list[list[int]]]:
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, 512, seed=2)
    model, spec = load_model(ModelConfig(model=str(path)))
    expected = [greedy_reference(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    return model, spec, expected


def make_engine(
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    method: SpeculativeMethod = SpeculativeMethod.NGRAM,
    num_blocks: int = 256,
    budget: int = 2048,
    max_seqs: int = 16,
) -> Engine:
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        speculative=SpeculativeConfig(method, num_tokens=4, ngram_min=1, max_seqs=max_seqs),
    )
    return Engine(config, model, spec, sink=lambda outputs: None)


class Oracle:
    """Proposes the known continuation of each prompt (``wrong``: a token off, every time)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], wrong: bool = False):
        self.continuations = continuations
        self.wrong = wrong

    def new_state(self, k: int) -> SpecState:
        return SpecState(k)

    def propose(self, requests: Seq[DraftRequest]) -> list[tuple[int, ...]]:
        return [self._one(seq.token_ids, k) for seq, k in requests]

    def _one(self, tokens: Seq[int], k: int) -> tuple[int, ...]:
        for prompt, rest in self.continuations.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                draft = rest[done : done + k]
                return tuple((t + 1) % 512 if self.wrong else t for t in draft)
        return ()


def use(engine: Engine, proposer: Oracle) -> None:
    engine.scheduler.speculator = Speculator(engine.config.speculative, proposer)
    state = engine.scheduler.speculator.new_state()
    assert state is not None and state.pause == 0


def run(engine: Engine, seqs: list[Sequence], steps: int = 3000) -> dict[str, list[int]]:
    for seq in seqs:
        engine.add(seq)
    outputs: list[RequestOutput] = []
    for _ in range(steps):
        if not engine.scheduler.has_work():
            break
        outputs.extend(engine.step())
    assert not engine.scheduler.has_work(), "engine did not finish"
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks, "a block leaked"
    tokens: dict[str, list[int]] = {}
    for o in outputs:
        tokens.setdefault(o.request_id, []).extend(o.token_ids)
        assert len(o.logprobs) in (0, len(o.token_ids))
    return tokens


def greedy_seqs(spec: ModelSpec, **sampling: object) -> list[Sequence]:
    return [
        Sequence(
            f"r{i}",
            list(p),
            len(p),
            SamplingParams(max_tokens=n, temperature=0, **sampling),  # type: ignore[arg-type]
            spec.eos_token_ids,
        )
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))
    ]


@pytest.mark.parametrize(
    ("budget", "num_blocks"),
    [(2048, 256), (7, 256), (64, 30)],
    ids=["one-shot", "chunked", "preempting"],
)
def test_greedy_with_prompt_lookup_matches_transformers(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], budget: int, num_blocks: int
) -> None:
    model, spec, expected = tiny
    engine = make_engine(model, spec, budget=budget, num_blocks=num_blocks)
    got = run(engine, greedy_seqs(spec))
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"request {i}"
    assert engine.scheduler.speculator.counters.proposed > 0
    if num_blocks == 30:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("wrong", [False, True], ids=["always-right", "always-wrong"])
def test_greedy_with_a_perfect_or_useless_draft_matches_transformers(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], wrong: bool
) -> None:
    model, spec, expected = tiny
    engine = make_engine(model, spec)
    use(engine, Oracle({tuple(p): e for p, e in zip(PROMPTS, expected, strict=True)}, wrong))
    got = run(engine, greedy_seqs(spec))
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"request {i}"
    counters = engine.scheduler.speculator.counters
    assert counters.proposed > 0
    assert counters.accepted == (0 if wrong else counters.proposed)
    if not wrong:  # whole drafts kept: far fewer steps than tokens
        assert counters.verify_steps < sum(MAX_TOKENS) // 2


def seeded(spec: ModelSpec, **extra: object) -> list[Sequence]:
    return [
        Sequence(
            f"s{i}",
            list(p),
            len(p),
            SamplingParams(  # type: ignore[arg-type]
                max_tokens=n, temperature=0.9, top_p=0.95, seed=100 + i, logprobs=2, **extra
            ),
            spec.eos_token_ids,
        )
        for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))
    ]


@pytest.mark.parametrize(
    "extra", [{}, {"repetition_penalty": 1.3, "frequency_penalty": 0.5}], ids=["plain", "penalized"]
)
def test_seeded_sampling_is_identical_with_speculation(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], extra: dict[str, object]
) -> None:
    model, spec, _ = tiny
    off = make_engine(model, spec, method=SpeculativeMethod.OFF)
    want = run(off, seeded(spec, **extra))
    on = make_engine(model, spec)
    use(on, Oracle({tuple(p): want[f"s{i}"] for i, p in enumerate(PROMPTS)}))
    assert run(on, seeded(spec, **extra)) == want
    counters = on.scheduler.speculator.counters
    assert counters.accepted == counters.proposed > 0


def test_a_stop_token_inside_a_kept_draft_ends_the_sequence_there(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]],
) -> None:
    model, spec, expected = tiny
    stop = expected[0][9]
    want = expected[0][: expected[0].index(stop) + 1]
    engine = make_engine(model, spec)
    use(engine, Oracle({tuple(PROMPTS[0]): expected[0]}))
    seq = Sequence(
        "r0",
        list(PROMPTS[0]),
        len(PROMPTS[0]),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(stop,), logprobs=0),
    )
    assert run(engine, [seq])["r0"] == want
    short = Sequence(
        "r1", list(PROMPTS[0]), len(PROMPTS[0]), SamplingParams(max_tokens=6, temperature=0)
    )
    assert run(engine, [short])["r1"] == expected[0][:6]


def chi_square_p(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> float:
    """Two-sample chi-square test of homogeneity; cells expected below 5 are pooled."""
    total_a, total_b = sum(a.values()), sum(b.values())
    cells = sorted(set(a) | set(b), key=lambda c: -(a[c] + b[c]))
    rows: list[tuple[int, int]] = []
    pool = [0, 0]
    for c in cells:
        if (a[c] + b[c]) * min(total_a, total_b) / (total_a + total_b) >= 5:
            rows.append((a[c], b[c]))
        else:
            pool[0] += a[c]
            pool[1] += b[c]
    if sum(pool):
        rows.append((pool[0], pool[1]))
    n = total_a + total_b
    stat = 0.0
    for x, y in rows:
        for observed, total in ((x, total_a), (y, total_b)):
            expected = (x + y) * total / n
            stat += (observed - expected) ** 2 / expected
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def test_unseeded_sampling_keeps_its_distribution(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, "llama", 512, seed=5)
    model, spec = load_model(ModelConfig(model=str(path)))
    prompt = [7, 8, 9, 10]
    greedy = greedy_reference(model, prompt, 3)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3)

    def sample(method: SpeculativeMethod, n: int) -> Counter[tuple[int, ...]]:
        engine = make_engine(model, spec, method=method, max_seqs=64)
        if method is SpeculativeMethod.NGRAM:  # always the greedy path: kept as often as drawn
            use(engine, Oracle({tuple(prompt): greedy}))
        seqs = [Sequence(f"u{i}", list(prompt), len(prompt), params) for i in range(n)]
        got = run(engine, seqs, steps=20_000)
        if method is SpeculativeMethod.NGRAM:
            counters = engine.scheduler.speculator.counters
            assert 0 < counters.accepted < counters.proposed
        return Counter(tuple(t) for t in got.values())

    off = sample(SpeculativeMethod.OFF, 1500)
    on = sample(SpeculativeMethod.NGRAM, 1500)
    assert len(off) > 8  # many distinct triples: the test can tell distributions apart
    assert chi_square_p(on, off) > 1e-3, (on.most_common(5), off.most_common(5))
    # and the test itself rejects a different distribution
    skewed = Counter({k: v * (3 if i % 2 else 1) for i, (k, v) in enumerate(off.items())})
    assert chi_square_p(skewed, off) < 1e-3


def draft_engine(spec: ModelSpec, model: torch.nn.Module, draft: Path, **kw: int) -> Engine:
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=4, num_blocks=kw.get("num_blocks", 256)),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=kw.get("budget", 2048)),
        speculative=SpeculativeConfig(
            SpeculativeMethod.DRAFT, num_tokens=3, max_seqs=16, draft_model=str(draft)
        ),
    )
    return Engine(config, model, spec, sink=lambda outputs: None)


@pytest.mark.parametrize(
    ("budget", "num_blocks"), [(2048, 256), (64, 30)], ids=["one-shot", "preempting"]
)
def test_the_target_as_its_own_draft_keeps_every_token(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], budget: int, num_blocks: int
) -> None:
    model, spec, expected = tiny
    engine = draft_engine(spec, model, spec.path, budget=budget, num_blocks=num_blocks)
    got = run(engine, greedy_seqs(spec))
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"request {i}"
    counters = engine.scheduler.speculator.counters
    assert counters.accepted == counters.proposed > 0
    if num_blocks == 30:
        assert engine.scheduler.num_preemptions > 0


def test_another_model_as_draft_changes_no_token(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], tmp_path: Path
) -> None:
    model, spec, expected = tiny
    other = build_tiny_model(tmp_path, spec.family, 512, seed=9)  # same vocabulary, other weights
    engine = draft_engine(spec, model, other)
    got = run(engine, greedy_seqs(spec))
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"request {i}"
    counters = engine.scheduler.speculator.counters
    assert counters.proposed > 0 and counters.accepted < counters.proposed


def test_a_draft_with_another_vocabulary_is_refused(
    tiny: tuple[torch.nn.Module, ModelSpec, list[list[int]]], tmp_path: Path
) -> None:
    model, spec, _ = tiny
    other = build_tiny_model(tmp_path, spec.family, 300, seed=9)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        draft_engine(spec, model, other)
