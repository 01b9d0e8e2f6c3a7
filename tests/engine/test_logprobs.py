"""Log-probabilities: the sampler's equal ``log_softmax`` of the processed logits over the
temperature (before min_p/top-k/top-p), only for the rows that ask; the engine's greedy ones
equal transformers' ``generate(output_logits/output_scores=True)`` on a tiny model."""

from __future__ import annotations

import pytest
import torch

from core.sampling import SamplingParams
from engine.engine import Engine, RequestOutput
from engine.sampler import Sampler, SampleRequest, compute_logprobs, process_logits
from engine.sequence import Sequence
from tests.engine.tiny_engine import engine_config, tiny_model

VOCAB = 50
PROMPT = [5, 17, 99, 3, 250, 42, 7, 17, 17, 99]
PLAIN = [300, 301, 302, 303]
MAX_TOKENS = 12


def _req(**params: object) -> SampleRequest:
    return SampleRequest(SamplingParams(**params), 3, (1, 2, 3, 4, 2), 2)  # type: ignore[arg-type]


def test_sampler_logprobs_are_log_softmax_of_processed_logits() -> None:
    logits = torch.randn((5, VOCAB), generator=torch.Generator().manual_seed(0)) * 3
    requests = [
        _req(temperature=0, logprobs=5, logit_bias=((7, 3.0),), repetition_penalty=1.3),
        _req(temperature=0.7, top_k=3, top_p=0.5, min_p=0.2, seed=1, logprobs=20),
        _req(temperature=0),  # asks for nothing
        _req(temperature=1.3, seed=2, presence_penalty=1.0, frequency_penalty=0.5, logprobs=0),
        _req(temperature=0.5, top_k=1, logprobs=2),  # greedy by top_k, scaled by 0.5
    ]
    tokens, logprobs = Sampler(seed=0).sample_with_logprobs(logits, requests)
    processed = process_logits(logits, requests)
    assert logprobs[2] is None
    for row, temperature in ((0, 1.0), (1, 0.7), (3, 1.3), (4, 0.5)):
        lp = logprobs[row]
        assert lp is not None
        want = torch.log_softmax(processed[row] / temperature, dim=-1)
        assert lp.token_id == tokens[row]
        assert abs(lp.logprob - float(want[tokens[row]])) < 1e-5
        n = requests[row].params.logprobs
        assert len(lp.top) == n
        values, ids = torch.topk(want, n) if n else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        for (_, got), value in zip(lp.top, values.tolist(), strict=True):
            assert abs(got - value) < 1e-5
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert logprobs[0] is not None and logprobs[0].token_id == int(processed[0].argmax())


def test_no_row_asking_costs_nothing() -> None:
    logits = torch.randn((3, VOCAB))
    assert compute_logprobs(logits, [_req(temperature=0)] * 3, [0, 1, 2]) == [None] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("lp"))
    refs = {
        "plain": _reference(model, PROMPT, {}, "logits"),
        "penalized": _reference(model, PROMPT, {"repetition_penalty": 1.3}, "scores"),
    }
    return model, spec, refs


@torch.inference_mode()
def _reference(
    model: torch.nn.Module, prompt: list[int], kwargs: dict[str, object], field: str
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the float32 log_softmax of each step's raw logits or scores."""
    ids = torch.tensor([prompt])
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    steps = out.logits if field == "logits" else out.scores
    logprobs = [torch.log_softmax(s[0].float(), dim=-1) for s in steps]
    return out.sequences[0, len(prompt) :].tolist(), logprobs


def _run(engine: Engine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(2000):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("budget", [2048, 5], ids=["one-shot", "chunked-5"])
def test_engine_greedy_logprobs_match_transformers(tiny, budget: int) -> None:
    model, spec, refs = tiny
    assert next(model.parameters()).dtype == torch.float32
    engine = Engine(engine_config(spec, budget=budget), model, spec, sink=lambda outputs: None)
    params = {
        "plain": SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=5),
        "penalized": SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.3, logprobs=3
        ),
    }
    for name, sampling in params.items():
        engine.add(Sequence(name, list(PROMPT), len(PROMPT), sampling, spec.eos_token_ids))
    other = SamplingParams(max_tokens=6, temperature=0)
    engine.add(Sequence("other", list(PLAIN), len(PLAIN), other, spec.eos_token_ids))
    outputs = _run(engine)
    assert all(not o.logprobs for o in outputs if o.request_id == "other")
    for name, (want_tokens, want) in refs.items():
        mine = [o for o in outputs if o.request_id == name and o.token_ids]
        tokens = [t for o in mine for t in o.token_ids]
        lps = [lp for o in mine for lp in o.logprobs]
        assert tokens == want_tokens, name
        assert len(lps) == len(tokens)
        n = params[name].logprobs
        for step, (lp, ref) in enumerate(zip(lps, want, strict=True)):
            assert lp.token_id == tokens[step]
            assert abs(lp.logprob - float(ref[lp.token_id])) < 1e-4, (name, step)
            ids = [t for t, _ in lp.top]
            values, ref_ids = torch.topk(ref, n or 0)
            assert ids[0] == ref_ids[0] == tokens[step]
            for (tid, got), value in zip(lp.top, values.tolist(), strict=True):
                assert abs(got - value) < 1e-4 and abs(float(ref[tid]) - got) < 1e-4
