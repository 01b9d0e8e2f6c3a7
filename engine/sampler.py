"""Batched token sampling: logits processors, greedy, temperature, min-p, top-k, top-p, seeds.

Order, as vLLM documents it: on the raw logits first the structured-output mask (the tokens
the request's grammar disallows go to -inf, see :mod:`engine.structured`), then ``logit_bias``,
the ``min_tokens`` mask, the repetition penalty, then the presence and frequency penalties;
greedy rows take the argmax of that. Sampled rows then go through temperature, ``min_p``,
top-k, top-p and the draw. Each processor is one tensor operation over the rows of the batch
that use it, skipped entirely when no request in the batch does, so a batch of plain requests
costs what it did before.

Log-probabilities (``SamplingParams.logprobs``): for the rows that ask, one batched
``log_softmax`` of the processed logits divided by the temperature (greedy rows: 1), before
``min_p``/top-k/top-p, and one ``topk`` for the alternatives; nothing when no row asks.

Reproducibility: a seeded request draws its n-th token from a generator seeded with
``(seed, position)``, so the same seed gives the same output whichever worker or tier samples
which position (a prefill worker samples the first token, a decode worker the rest).

Device: everything runs where the logits are; the draws use generators made on that device
(:mod:`engine.token_draw`), and the batch's tokens (greedy, drawn, failure codes) come to the
host in one copy per step. A row that fails to draw costs no sync and no exception.

Unusable rows: a row whose processed logits have no finite maximum (NaN or +inf anywhere, or
every token at -inf), or whose maximum over its temperature is not finite, cannot be sampled
(its softmax is NaN). The greedy ``max`` already gives each row's maximum (it propagates NaN),
so the check is one ``isfinite`` over ``(S,)`` folded into the tokens' one copy to the host;
only when a row fails does the sampler look further, and that row alone gets a negative token,
:data:`BAD_PARAMS_TOKEN` (its model logits were finite: its sampling parameters broke them,
the request's fault) or :data:`BAD_LOGITS_TOKEN` (the model's own logits for it were not
finite: the server's fault), while the other rows sample as if it were not there (a sampled
row that fails is still drawn for, on the device, so the unseeded rows' shared generator
advances as if it had not failed; seeded rows do not depend on it). :data:`SAMPLING_FAILURES`
says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from core.sampling import SamplingParams, TokenLogprob
from engine.structured import TokenMask, apply_token_mask
from engine.token_draw import GeneratorFactory, Generators, device_generator, draw_rows
from engine.token_draw import filtered_probs as filtered_probs

_UNUSABLE = -3  # on the device: the row failed the greedy check (classified on the host)

BAD_PARAMS_TOKEN = -1
"""The token of a row whose processing (sampling parameters, grammar) left nothing to sample."""
BAD_LOGITS_TOKEN = -2
"""The token of a row whose logits came out of the model not finite."""
SAMPLING_FAILURES: dict[int, tuple[str, bool]] = {
    BAD_PARAMS_TOKEN: (
        "sampling failed: this request's sampling parameters make its logits unusable "
        "(NaN/inf, or no token left to sample)",
        True,
    ),
    BAD_LOGITS_TOKEN: (
        "sampling failed: the logits of this request are not finite (NaN/inf)",
        False,
    ),
}
"""Failed token -> (error message, whether it is the request's own fault)."""


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler needs of one row of logits."""

    params: SamplingParams
    position: int  # index of the token being sampled in the sequence
    token_ids: Sequence[int] = ()
    """The sequence's tokens so far, prompt then output (by reference; penalties read it)."""
    output_start: int | None = None
    """Index in ``token_ids`` of the first generated token; None: ``position`` (none yet)."""
    eos_token_ids: frozenset[int] = frozenset()

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated before this one."""
        return 0 if self.output_start is None else self.position - self.output_start

    @property
    def prompt_ids(self) -> Sequence[int]:
        return self.token_ids[: self._start]

    @property
    def output_ids(self) -> Sequence[int]:
        return self.token_ids[self._start :]

    @property
    def _start(self) -> int:
        return self.position if self.output_start is None else self.output_start

    def min_tokens_banned(self) -> tuple[int, ...]:
        """Token ids masked now by ``min_tokens``: the stop tokens, EOS unless ignored."""
        params = self.params
        if self.num_output_tokens >= params.min_tokens:
            return ()
        eos = () if params.ignore_eos else tuple(sorted(self.eos_token_ids))
        return tuple(dict.fromkeys((*params.stop_token_ids, *eos)))


class Sampler:
    """Turns logits ``(S, V)`` into one token id per row, on the logits' device.

    ``seed`` seeds the unseeded rows' generator (one per device); ``make_generator`` makes every
    generator, on the device it is given (the logits'); tests replace it to watch that."""

    def __init__(
        self, seed: int | None = None, make_generator: GeneratorFactory = device_generator
    ) -> None:
        self._generators = Generators(seed, make_generator)

    def sample(
        self,
        logits: torch.Tensor,
        requests: Sequence[SampleRequest],
        mask: TokenMask | None = None,
    ) -> list[int]:
        return self.sample_with_logprobs(logits, requests, mask)[0]

    def sample_with_logprobs(
        self,
        logits: torch.Tensor,
        requests: Sequence[SampleRequest],
        mask: TokenMask | None = None,
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row, and its logprobs for the rows whose request asks (else None);
        ``mask``: the allowed tokens of the constrained rows. A row that cannot be sampled gets
        a negative token (a key of :data:`SAMPLING_FAILURES`) and no logprobs; the other rows
        sample as if it were not there."""
        raw = logits
        logits = process_logits(logits.float(), requests, mask)
        tokens: list[int] = self._choose(logits, requests).tolist()  # the one host copy
        unusable = {row: BAD_PARAMS_TOKEN for row, t in enumerate(tokens) if t == _UNUSABLE}
        if unusable:
            for row, code in classify_failures(raw, unusable).items():
                tokens[row] = code
        return tokens, compute_logprobs(logits, requests, tokens)

    def _choose(self, logits: torch.Tensor, requests: Sequence[SampleRequest]) -> torch.Tensor:
        """``(S,)`` on the logits' device: the greedy rows' argmax, the random rows' draws,
        :data:`BAD_PARAMS_TOKEN` where a draw failed, ``_UNUSABLE`` where the greedy check
        did."""
        tokens, ok = greedy_or_unusable(logits, requests)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not random_rows:
            return tokens
        min_p_rows = [i for i in random_rows if requests[i].params.min_p > 0.0]
        if min_p_rows:
            logits = apply_min_p(
                logits,
                min_p_rows,
                [requests[i].params.temperature for i in min_p_rows],
                [requests[i].params.min_p for i in min_p_rows],
            )
        dev = logits.device
        draws = draw_rows(
            logits,
            random_rows,
            [requests[i].params for i in random_rows],
            [self._generator_for(requests[i], dev) for i in random_rows],
        )
        index = torch.tensor(random_rows, dtype=torch.long, device=dev)
        drawn = torch.where(draws.valid, draws.tokens, BAD_PARAMS_TOKEN)
        drawn = torch.where(ok.index_select(0, index), drawn, _UNUSABLE)
        return tokens.index_copy(0, index, drawn)

    def _generator_for(
        self, request: SampleRequest, device: torch.device | None = None
    ) -> torch.Generator:
        """The generator of ``request``'s draw, on ``device`` (CPU when None)."""
        where = torch.device("cpu") if device is None else device
        return self._generators.for_row(request.params, request.position, where)


def compute_logprobs(
    logits: torch.Tensor, requests: Sequence[SampleRequest], tokens: Sequence[int]
) -> list[TokenLogprob | None]:
    """For each row whose request sets ``logprobs``: ``tokens[row]``'s log-probability under
    ``log_softmax(logits / temperature)`` (greedy: temperature 1) and the ``logprobs``
    likeliest tokens; None for the other rows. ``logits`` are the processed ones."""
    out: list[TokenLogprob | None] = [None] * len(requests)
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None and tokens[i] >= 0]
    if not rows:
        return out
    dev = logits.device
    index = torch.tensor(rows, dtype=torch.long, device=dev)
    temps = [r.params.temperature for r in (requests[i] for i in rows)]
    scale = torch.tensor([t if t > 0 else 1.0 for t in temps], dtype=logits.dtype, device=dev)
    logp = torch.log_softmax(logits.index_select(0, index) / scale[:, None], dim=-1)  # (R, V)
    chosen_ids = torch.tensor([tokens[i] for i in rows], dtype=torch.long, device=dev)
    chosen = logp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k = min(max(requests[i].params.logprobs or 0 for i in rows), logp.shape[-1])
    top_v: list[list[float]] = [[] for _ in rows]
    top_i: list[list[int]] = [[] for _ in rows]
    if k:
        values, ids = torch.topk(logp, k, dim=-1)
        top_v, top_i = values.tolist(), ids.tolist()
    for j, row in enumerate(rows):
        n = requests[row].params.logprobs or 0
        top = tuple(zip(top_i[j][:n], top_v[j][:n], strict=True))
        out[row] = TokenLogprob(tokens[row], chosen[j], top)
    return out


class GreedyTokens(NamedTuple):
    tokens: torch.Tensor  # (S,) long: each row's argmax, or _UNUSABLE where not ``ok``
    ok: torch.Tensor  # (S,) bool: the row can be sampled


def greedy_or_unusable(logits: torch.Tensor, requests: Sequence[SampleRequest]) -> GreedyTokens:
    """Each row's greedy token of the processed ``logits`` (S, V), on their device, and whether
    the row can be sampled at all: its maximum (NaN if any logit is NaN) is finite, and finite
    over the row's temperature (else its softmax is NaN). No host copy."""
    best = logits.max(dim=-1)
    temps = [r.params.temperature if not r.params.greedy else 1.0 for r in requests]
    scale = torch.tensor(temps, dtype=best.values.dtype, device=logits.device)
    ok = torch.isfinite(best.values / scale)
    return GreedyTokens(torch.where(ok, best.indices, _UNUSABLE), ok)


def classify_failures(raw: torch.Tensor, failed: dict[int, int]) -> dict[int, int]:
    """``failed`` with :data:`BAD_LOGITS_TOKEN` for the rows whose model logits ``raw`` (S, V)
    were already not finite (NaN or inf): the server's fault, not the request's."""
    rows = sorted(failed)
    index = torch.tensor(rows, dtype=torch.long, device=raw.device)
    finite = torch.isfinite(raw.index_select(0, index).float()).all(dim=-1).tolist()
    return {
        row: BAD_PARAMS_TOKEN if ok else BAD_LOGITS_TOKEN
        for row, ok in zip(rows, finite, strict=True)
    }


def process_logits(
    logits: torch.Tensor, requests: Sequence[SampleRequest], mask: TokenMask | None = None
) -> torch.Tensor:
    """``logits`` (S, V) after the processors that act on raw logits (and so on greedy rows):
    the grammar ``mask``, logit_bias, the min_tokens mask, then the penalties. Returns
    ``logits`` itself when no request uses any of them; never writes into it."""
    if mask is not None:
        logits = apply_token_mask(logits, mask)
    if any(r.params.logit_bias for r in requests):
        logits = apply_logit_bias(logits, [r.params.logit_bias for r in requests])
    if any(r.params.min_tokens for r in requests):
        banned = [r.min_tokens_banned() if r.params.min_tokens else () for r in requests]
        if any(banned):
            logits = apply_banned_tokens(logits, banned)
    rows = [i for i, r in enumerate(requests) if r.params.penalized]
    if rows:
        logits = apply_penalties(
            logits,
            rows,
            [requests[i].prompt_ids for i in rows],
            [requests[i].output_ids for i in rows],
            [requests[i].params.repetition_penalty for i in rows],
            [requests[i].params.presence_penalty for i in rows],
            [requests[i].params.frequency_penalty for i in rows],
        )
    return logits


def apply_logit_bias(
    logits: torch.Tensor, biases: Sequence[Sequence[tuple[int, float]]]
) -> torch.Tensor:
    """Add each row's ``(token id, bias)`` pairs to its logits (ids inside the vocabulary)."""
    rows = [i for i, bias in enumerate(biases) for _ in bias]
    cols = [token for bias in biases for token, _ in bias]
    values = [value for bias in biases for _, value in bias]
    dev = logits.device
    index = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
    bias_t = torch.tensor(values, dtype=logits.dtype, device=dev)
    return logits.index_put(index, bias_t, accumulate=True)


def apply_banned_tokens(logits: torch.Tensor, banned: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set each row's ``banned`` token ids to -inf (ids outside the vocabulary are ignored)."""
    vocab = logits.shape[-1]
    pairs = [(i, t) for i, ids in enumerate(banned) for t in ids if 0 <= t < vocab]
    if not pairs:
        return logits
    dev = logits.device
    index = (
        torch.tensor([i for i, _ in pairs], device=dev),
        torch.tensor([t for _, t in pairs], device=dev),
    )
    return logits.index_put(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))


def token_counts(ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``(len(ids), vocab)`` float counts of each token id in each row's ``ids``."""
    width = max(1, max(len(row) for row in ids))
    padded = [[*row, *([vocab] * (width - len(row)))] for row in ids]  # pad id: one past the end
    index = torch.tensor(padded, dtype=torch.long, device=device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def apply_penalties(
    logits: torch.Tensor,
    rows: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    repetition: Sequence[float],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """Penalties on ``rows`` of ``logits``, as vLLM applies them: the repetition penalty over
    prompt and output tokens (a seen token's logit divided by it when positive, multiplied when
    not), then OpenAI's ``logit -= frequency * count + presence * (count > 0)`` over output
    tokens only."""
    dev = logits.device
    vocab = logits.shape[-1]
    index = torch.tensor(rows, dtype=torch.long, device=dev)
    sub = logits.index_select(0, index)  # (R, V)
    output = token_counts(output_ids, vocab, dev)
    seen = (token_counts(prompt_ids, vocab, dev) + output) > 0
    rep = torch.tensor(repetition, dtype=sub.dtype, device=dev)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor(frequency, dtype=sub.dtype, device=dev)[:, None]
    pres = torch.tensor(presence, dtype=sub.dtype, device=dev)[:, None]
    sub = sub - freq * output - pres * (output > 0).to(sub.dtype)
    return logits.index_copy(0, index, sub)


def apply_min_p(
    logits: torch.Tensor,
    rows: Sequence[int],
    temperatures: Sequence[float],
    min_ps: Sequence[float],
) -> torch.Tensor:
    """Mask (-inf) on ``rows`` the tokens whose probability after temperature is below
    ``min_p`` times the likeliest token's (which always stays)."""
    dev = logits.device
    index = torch.tensor(rows, dtype=torch.long, device=dev)
    sub = logits.index_select(0, index)
    temps = torch.tensor(temperatures, dtype=sub.dtype, device=dev)[:, None]
    probs = torch.softmax(sub / temps, dim=-1)
    threshold = torch.tensor(min_ps, dtype=sub.dtype, device=dev)[:, None]
    threshold = threshold * probs.max(dim=-1, keepdim=True).values
    sub = sub.masked_fill(probs < threshold, float("-inf"))
    return logits.index_copy(0, index, sub)
