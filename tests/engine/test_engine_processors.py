"""The engine's logits processors on tiny random models, in-process: greedy output with
repetition_penalty, min_tokens, logit_bias and OpenAI's penalties equals transformers'
``generate`` with the same processors, in a batch with plain requests, chunked or not, and a
resumed sequence (failover) continues as the undisturbed one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from core.sampling import SamplingParams
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine import Engine, RequestOutput
from engine.model_loader import load_model
from engine.sequence import Sequence
from tests.support.tiny_models import build_tiny_model

PROMPT = [5, 17, 99, 3, 250, 42, 7, 17, 17, 99]
PLAIN = [300, 301, 302, 303]
MAX_TOKENS = 24


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the generated tokens, for ``generate``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, out, torch.ones_like(out, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, 512, seed=2)
    model, spec = load_model(ModelConfig(model=str(path)))
    plain = _reference(model, PLAIN, 10)
    stop_at = _reference(model, PROMPT, 3)[1]  # greedy's second token, a stop token below
    cases = {
        "repetition": (
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.3),
            _reference(model, PROMPT, MAX_TOKENS, repetition_penalty=1.3),
        ),
        "min_tokens": (  # the stop token is greedy's 2nd; masked until 6 tokens exist
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0, min_tokens=6, stop_token_ids=(stop_at,)
            ),
            _reference(
                model,
                PROMPT,
                MAX_TOKENS,
                min_new_tokens=6,
                eos_token_id=[*sorted(spec.eos_token_ids), stop_at],
            ),
        ),
        "logit_bias": (
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0, logit_bias=((stop_at, -100.0), (77, 4.0))
            ),
            _reference(model, PROMPT, MAX_TOKENS, sequence_bias={(stop_at,): -100.0, (77,): 4.0}),
        ),
        "all": (
            SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0,
                repetition_penalty=1.2,
                presence_penalty=0.5,
                frequency_penalty=0.7,
                logit_bias=((77, 2.0),),
                min_tokens=4,
            ),
            _reference(
                model,
                PROMPT,
                MAX_TOKENS,
                sequence_bias={(77,): 2.0},
                repetition_penalty=1.2,
                min_new_tokens=4,
                logits_processor=LogitsProcessorList([OpenAIPenalties(len(PROMPT), 0.5, 0.7)]),
            ),
        ),
    }
    plain_greedy = _reference(model, PROMPT, MAX_TOKENS)
    for name, (_, want) in cases.items():
        assert want != plain_greedy, f"{name}: the processor must change the output here"
    return model, spec, plain, cases


@torch.inference_mode()
def _reference(model: torch.nn.Module, prompt: list[int], n: int, **kwargs: object) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        **kwargs,
    )
    return out[0, len(prompt) :].tolist()


def _engine(model, spec, budget: int = 2048) -> Engine:
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=4, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
    )
    return Engine(config, model, spec, sink=lambda outputs: None)


def _run(engine: Engine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(2000):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def _generated(outputs: list[RequestOutput], request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for t in o.token_ids]


@pytest.mark.parametrize("budget", [2048, 5], ids=["one-shot", "chunked-5"])
def test_greedy_with_processors_matches_transformers(tiny, budget: int) -> None:
    model, spec, plain, cases = tiny
    engine = _engine(model, spec, budget)
    for name, (params, _) in cases.items():
        engine.add(Sequence(name, list(PROMPT), len(PROMPT), params, spec.eos_token_ids))
    plain_params = SamplingParams(max_tokens=10, temperature=0)
    engine.add(Sequence("plain", list(PLAIN), len(PLAIN), plain_params, spec.eos_token_ids))
    outputs = _run(engine)
    for name, (_, want) in cases.items():
        assert _generated(outputs, name) == want, name
    assert _generated(outputs, "plain") == plain  # batched with them, untouched
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_resumed_sequence_continues_the_undisturbed_one(tiny) -> None:
    """A failover resume: prompt + the k tokens received so far, ``resumed_tokens=k``, with
    max_tokens and min_tokens lowered by k (as the gateway sends it)."""
    model, spec, _, cases = tiny
    params, want = cases["all"]
    k = 5
    resumed = replace(params, max_tokens=len(want) - k, min_tokens=max(0, params.min_tokens - k))
    prompt = PROMPT + want[:k]
    engine = _engine(model, spec)
    seq = Sequence("r", prompt, len(prompt), resumed, spec.eos_token_ids, resumed_tokens=k)
    assert seq.output_start == len(PROMPT)
    engine.add(seq)
    assert _generated(_run(engine), "r") == want[k:]
