"""A row that cannot be sampled (NaN/inf logits, or sampling parameters that break them) fails
alone: the sampler gives it a negative token, the engine finishes that request with ERROR (the
request's own fault when its model logits were finite, the server's when they were not) and
the other rows of the batch sample as they would alone; an all-finite batch is unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from core.sampling import FinishReason, SamplingParams
from engine.engine import Engine, RequestOutput
from engine.sampler import (
    BAD_LOGITS_TOKEN,
    BAD_PARAMS_TOKEN,
    SAMPLING_FAILURES,
    Sampler,
    SampleRequest,
    filtered_probs,
)
from engine.sequence import Sequence
from tests.engine.tiny_engine import engine_config, greedy_reference, tiny_model

VOCAB = 50
NAN = float("nan")


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


def _req(position: int = 0, **params: object) -> SampleRequest:
    return SampleRequest(SamplingParams(**params), position)  # type: ignore[arg-type]


def _mixed() -> list[SampleRequest]:
    return [
        _req(3, temperature=0.0, logprobs=2),
        _req(4, temperature=0.8, seed=11, top_k=10, logprobs=1),
        _req(5, temperature=1.2, seed=12, top_p=0.9, min_p=0.05),
        _req(6, temperature=0.0),
    ]


def _alone(logits: torch.Tensor, requests: list[SampleRequest], row: int) -> tuple[object, ...]:
    tokens, lps = Sampler(seed=0).sample_with_logprobs(logits[row : row + 1], [requests[row]])
    return tokens[0], lps[0]


def _reference_sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[int]:
    """The sampler before the guard: argmax, or filtered_probs and the seeded draw."""
    out = []
    for row, r in zip(logits, requests, strict=True):
        p = r.params
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        gen = Sampler(seed=0)._generator_for(r)
        probs = filtered_probs(row, p.temperature, p.top_k, p.top_p)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out


@pytest.mark.parametrize("row", [0, 1, 2, 3])
@pytest.mark.parametrize("poison", ["nan_one", "nan_all", "pos_inf", "all_neg_inf"])
def test_a_bad_model_row_fails_alone(row: int, poison: str) -> None:
    requests = _mixed()
    logits = _logits(4)
    bad = logits.clone()
    if poison == "nan_one":
        bad[row, 7] = NAN
    elif poison == "nan_all":
        bad[row] = NAN
    elif poison == "pos_inf":
        bad[row, 3] = math.inf
    else:
        bad[row] = -math.inf
    tokens, lps = Sampler(seed=0).sample_with_logprobs(bad, requests)
    assert tokens[row] == BAD_LOGITS_TOKEN and lps[row] is None
    for other in range(4):
        if other != row:
            assert (tokens[other], lps[other]) == _alone(logits, requests, other)


def test_parameters_that_break_finite_logits_fail_that_row_alone() -> None:
    logits = _logits(4, seed=3)
    requests = _mixed()
    requests[1] = _req(4, temperature=1e-45, seed=11, logprobs=1)  # max / t overflows
    requests[2] = _req(5, temperature=0.0, logit_bias=((9, NAN),))  # NaN after processing
    tokens, lps = Sampler(seed=0).sample_with_logprobs(logits, requests)
    assert tokens[1] == tokens[2] == BAD_PARAMS_TOKEN and lps[1] is None
    for other in (0, 3):
        assert (tokens[other], lps[other]) == _alone(logits, requests, other)
    message, own = SAMPLING_FAILURES[BAD_PARAMS_TOKEN]
    assert own and message.startswith("sampling failed")
    assert not SAMPLING_FAILURES[BAD_LOGITS_TOKEN][1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_all_finite_batch_samples_as_before(seed: int) -> None:
    logits = _logits(8, seed=seed)
    logits[0, :10] = -math.inf  # masked tokens are fine
    requests = [
        _req(i, temperature=0.0 if i % 2 else 0.7 + 0.1 * i, seed=100 + i, top_k=i * 3)
        for i in range(8)
    ]
    assert Sampler(seed=0).sample(logits, requests) == _reference_sample(logits, requests)
    greedy = [_req(i, temperature=0.0) for i in range(8)]
    assert Sampler(seed=0).sample(logits, greedy) == logits.argmax(dim=-1).tolist()


# -- through the engine, on a tiny model ------------------------------------------------------

PROMPT = list(range(10, 31))
TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    return model, spec, greedy_reference(model, PROMPT, TOKENS)


def _run(engine: Engine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(200):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def _seq(rid: str, **params: object) -> Sequence:
    sampling = SamplingParams(max_tokens=TOKENS, **params)  # type: ignore[arg-type]
    return Sequence(rid, list(PROMPT), len(PROMPT), sampling)


def _check(outputs: list[RequestOutput], rid: str, own: bool, tiny_ref: list[int]) -> None:
    (bad,) = [o for o in outputs if o.request_id == rid]
    assert bad.finish_reason is FinishReason.ERROR and bad.token_ids == ()
    assert bad.invalid_request is own
    assert bad.error is not None and bad.error.startswith("sampling failed")
    fine = [t for o in outputs if o.request_id == "fine" for t in o.token_ids]
    assert fine == tiny_ref
    assert [o.finish_reason for o in outputs if o.request_id == "fine"][-1] is FinishReason.LENGTH


def test_engine_fails_only_the_request_whose_parameters_break_its_logits(tiny) -> None:
    model, spec, reference = tiny
    engine = Engine(engine_config(spec), model, spec, sink=lambda outputs: None)
    engine.add(_seq("bad", temperature=0.0, logit_bias=((9, NAN),)))
    engine.add(_seq("fine", temperature=0.0))
    outputs = _run(engine)
    _check(outputs, "bad", True, reference)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_engine_fails_only_the_request_whose_model_logits_are_nan(tiny) -> None:
    model, spec, reference = tiny
    engine = Engine(engine_config(spec), model, spec, sink=lambda outputs: None)
    forward = engine.runner._forward

    def poisoned(inputs):  # the row of "bad" (added first) comes out NaN
        logits = forward(inputs)
        rows = [i for i, r in enumerate(inputs.sample_requests) if r.params.seed == 1]
        logits[rows] = NAN
        return logits

    engine.runner._forward = poisoned  # type: ignore[method-assign]
    engine.add(_seq("bad", temperature=0.9, seed=1))
    engine.add(_seq("fine", temperature=0.0))
    outputs = _run(engine)
    _check(outputs, "bad", False, reference)
    assert engine.pool.num_free == engine.pool.num_blocks
