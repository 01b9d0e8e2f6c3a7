"""The sampler's logits processors against transformers' own (and OpenAI's formula), on random
logits: repetition penalty, presence/frequency penalties, min_p, the min_tokens mask,
logit_bias; their order, and that a batch of plain requests skips them all."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

import engine.sampler as sampler_module
from core.sampling import SamplingParams
from engine.sampler import (
    Sampler,
    SampleRequest,
    apply_min_p,
    apply_penalties,
    process_logits,
)

VOCAB = 64
TOL = 1e-6


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, VOCAB), generator=generator) * 4


def random_ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, VOCAB // 4, (length,), generator=generator).tolist()  # many repeats


def request(prompt: list[int], output: list[int], **params: object) -> SampleRequest:
    tokens = prompt + output
    return SampleRequest(
        SamplingParams(**params),  # type: ignore[arg-type]
        position=len(tokens),
        token_ids=tokens,
        output_start=len(prompt),
        eos_token_ids=frozenset({VOCAB - 1}),
    )


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(4)
    prompts = [random_ids(9, seed=i) for i in range(4)]
    outputs = [random_ids(i * 3, seed=10 + i) for i in range(4)]  # the first: no output yet
    reqs = [
        request(p, o, repetition_penalty=penalty) for p, o in zip(prompts, outputs, strict=True)
    ]
    got = process_logits(logits, reqs)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for row, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        want = hf(torch.tensor([p + o]), logits[row : row + 1].clone())[0]
        torch.testing.assert_close(got[row], want, atol=TOL, rtol=0)
    assert not torch.equal(got, logits)


def openai_penalties(
    logits: torch.Tensor, output: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's documented formula, by hand:
    mu[j] -= c[j] * frequency_penalty + float(c[j] > 0) * presence_penalty."""
    out = logits.clone()
    for token in set(output):
        count = output.count(token)
        out[token] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 1.5), (-2.0, 2.0)])
def test_presence_and_frequency_follow_openais_formula(presence: float, frequency: float) -> None:
    logits = random_logits(3, seed=1)
    prompts = [random_ids(8, seed=20 + i) for i in range(3)]
    outputs = [random_ids(n, seed=30 + i) for i, n in enumerate((0, 5, 17))]
    reqs = [
        request(p, o, presence_penalty=presence, frequency_penalty=frequency)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    got = process_logits(logits, reqs)
    for row, o in enumerate(outputs):  # prompt tokens are not penalized
        want = openai_penalties(logits[row], o, presence, frequency)
        torch.testing.assert_close(got[row], want, atol=TOL, rtol=0)


def test_repetition_then_openai_penalties_as_vllm_orders_them() -> None:
    logits = random_logits(1, seed=2)
    prompt, output = random_ids(6, seed=3), random_ids(7, seed=4)
    req = request(
        prompt, output, repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2
    )
    got = process_logits(logits, [req])
    rep = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), logits.clone())
    want = openai_penalties(rep[0], output, 0.3, 0.2)
    torch.testing.assert_close(got[0], want, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("min_p", "temperature"), [(0.05, 1.0), (0.2, 0.7), (0.9, 1.5), (1.0, 1.0)]
)
def test_min_p_matches_transformers_after_temperature(min_p: float, temperature: float) -> None:
    logits = random_logits(5, seed=5)
    got = apply_min_p(logits, list(range(5)), [temperature] * 5, [min_p] * 5) / temperature
    ids = torch.zeros((5, 1), dtype=torch.long)
    scaled = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    want = MinPLogitsWarper(min_p)(ids, scaled)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=TOL, rtol=0)
    assert (finite.sum(dim=-1) >= 1).all()  # the likeliest token always stays


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_tokens_matches_transformers(generated: int) -> None:
    logits = random_logits(1, seed=6)
    prompt, output = random_ids(4, seed=7), random_ids(generated, seed=8)
    stop_ids = (3, 9)
    req = request(prompt, output, min_tokens=3, stop_token_ids=stop_ids)
    got = process_logits(logits, [req])
    hf = MinNewTokensLengthLogitsProcessor(
        prompt_length_to_skip=len(prompt), min_new_tokens=3, eos_token_id=[*stop_ids, VOCAB - 1]
    )
    want = hf(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert bool(torch.isinf(got[0, VOCAB - 1])) == (generated < 3)


def test_min_tokens_leaves_eos_alone_when_ignored() -> None:
    logits = random_logits(1, seed=9)
    req = request([1, 2], [], min_tokens=2, stop_token_ids=(5,), ignore_eos=True)
    got = process_logits(logits, [req])
    assert torch.isinf(got[0, 5]) and not torch.isinf(got[0, VOCAB - 1])


def test_logit_bias_matches_transformers_sequence_bias() -> None:
    logits = random_logits(3, seed=10)
    biases = [((0, 100.0), (7, -3.5)), (), ((63, -100.0), (1, 0.25))]
    got = process_logits(logits, [request([1], [], logit_bias=b) for b in biases])
    for row, bias in enumerate(biases):
        want = logits[row : row + 1].clone()
        if bias:
            hf = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})
            want = hf(torch.tensor([[1]]), want)
        torch.testing.assert_close(got[row], want[0], atol=TOL, rtol=0)


def test_mixed_batch_touches_only_the_rows_that_ask() -> None:
    logits = random_logits(4, seed=11)
    reqs = [
        request([1, 2, 2], [3], temperature=0.0),
        request([1, 2, 2], [3], repetition_penalty=1.4, temperature=0.0),
        request([4], [5, 5], frequency_penalty=1.0, logit_bias=((6, 2.0),)),
        request([1], [], min_tokens=1),
    ]
    got = process_logits(logits, reqs)
    assert torch.equal(got[0], logits[0])
    assert not torch.equal(got[1], logits[1])
    assert got[2, 5] == logits[2, 5] - 2.0 and got[2, 6] == logits[2, 6] + 2.0
    assert torch.isinf(got[3, VOCAB - 1])


def test_greedy_applies_processors_before_argmax() -> None:
    logits = torch.zeros((1, VOCAB))
    logits[0, 10] = 5.0  # the argmax, generated once already
    logits[0, 11] = 4.0
    req = request([1], [10], temperature=0.0, repetition_penalty=2.0)  # 5 / 2 < 4
    assert Sampler(seed=0).sample(logits, [req]) == [11]
    biased = request([1], [], temperature=0.0, logit_bias=((12, 100.0),))
    assert Sampler(seed=0).sample(logits, [biased]) == [12]
    early = request([1], [], temperature=0.0, min_tokens=1, stop_token_ids=(10,))
    assert Sampler(seed=0).sample(logits, [early]) == [11]


def test_min_p_restricts_what_sampling_draws() -> None:
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :3] = torch.tensor([3.0, 2.9, 0.0])  # token 2: p/p_max ~ 0.05
    req = request([1], [], temperature=1.0, min_p=0.5, seed=1)
    drawn = {Sampler(seed=0).sample(logits, [SampleRequest(req.params, p)])[0] for p in range(200)}
    assert drawn == {0, 1}


def test_plain_batches_skip_every_processor(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("processor ran on a plain batch")

    for name in ("apply_logit_bias", "apply_banned_tokens", "apply_penalties", "apply_min_p"):
        monkeypatch.setattr(sampler_module, name, boom)
    logits = random_logits(3, seed=12)
    plain = [SampleRequest(SamplingParams(temperature=t, seed=1), 5) for t in (0.0, 0.8, 1.0)]
    assert process_logits(logits, plain) is logits
    Sampler(seed=0).sample(logits, plain)


def test_seeded_draws_are_unchanged_by_the_new_fields_at_their_defaults() -> None:
    logits = random_logits(2, seed=13)
    bare = [SampleRequest(SamplingParams(temperature=0.9, seed=7), 3)] * 2
    full = [request([1, 2], [3], temperature=0.9, seed=7)] * 2
    full = [SampleRequest(r.params, 3, r.token_ids, r.output_start) for r in full]
    assert Sampler(seed=0).sample(logits, bare) == Sampler(seed=1).sample(logits, full)


def test_penalties_leave_unselected_rows_and_input_alone() -> None:
    logits = random_logits(3, seed=14)
    before = logits.clone()
    got = apply_penalties(logits, [1], [[1, 2]], [[2, 3]], [1.5], [0.5], [0.5])
    assert torch.equal(logits, before)  # never in place
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
