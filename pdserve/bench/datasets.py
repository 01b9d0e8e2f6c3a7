"""Benchmark requests as exact token ids: random lengths, shared prefixes, ShareGPT files.

Every request carries its prompt as token ids and a target output length; the load generator
sends them with ``ignore_eos`` and ``max_tokens`` = that length, so prompt and output lengths
are exact (no re-tokenization drift, no early EOS). Random tokens are drawn from the tokenizer's
vocabulary without its special and added tokens. Everything is seeded: the same arguments give
the same requests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ShareGPT filters, as vLLM applies them: drop very short pairs and very long ones.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt as token ids and how many tokens to generate."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class LengthRange:
    """Inclusive ``[low, high]`` token counts, drawn uniformly."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"bad length range {self.low}..{self.high}: need 1 <= low <= high")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """``"16,256"``, ``"16-256"`` or ``"128"`` (a fixed length)."""
        parts = text.replace("-", ",").split(",")
        try:
            values = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ValueError(f"bad length range {text!r}: want MIN,MAX or N") from None
        if len(values) == 1:
            return cls(values[0], values[0])
        if len(values) != 2:
            raise ValueError(f"bad length range {text!r}: want MIN,MAX or N")
        return cls(values[0], values[1])

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def usable_token_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """Ids below both the model's and the tokenizer's vocabulary size, minus special and added
    tokens (``<|im_end|>`` in a random prompt would make it a different kind of request)."""
    excluded = set(tokenizer.all_special_ids)
    excluded.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in excluded]
    if not ids:
        raise ValueError("the tokenizer has no ordinary tokens to draw prompts from")
    return ids


def _random_tokens(rng: random.Random, vocab: Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(rng.choices(vocab, k=n))


def random_requests(
    vocab: Sequence[int],
    num_requests: int,
    input_len: LengthRange,
    output_len: LengthRange,
    seed: int,
) -> list[BenchRequest]:
    """Prompts of uniformly random length made of uniformly random tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        n_in = input_len.draw(rng)
        n_out = output_len.draw(rng)
        out.append(BenchRequest(_random_tokens(rng, vocab, n_in), n_out))
    return out


def shared_prefix_requests(
    vocab: Sequence[int],
    num_requests: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: LengthRange,
    output_len: LengthRange,
    seed: int,
) -> list[BenchRequest]:
    """``num_prefixes`` random prefixes of ``prefix_len`` tokens, each followed by about
    ``num_requests / num_prefixes`` random suffixes (request k uses prefix k mod N before the
    seeded shuffle that interleaves them, as vLLM's prefix-repetition dataset does)."""
    if num_prefixes < 1 or prefix_len < 1:
        raise ValueError("need at least one prefix of at least one token")
    rng = random.Random(seed)
    prefixes = [_random_tokens(rng, vocab, prefix_len) for _ in range(num_prefixes)]
    out = []
    for k in range(num_requests):
        suffix = _random_tokens(rng, vocab, suffix_len.draw(rng))
        out.append(BenchRequest(prefixes[k % num_prefixes] + suffix, output_len.draw(rng)))
    rng.shuffle(out)
    return out


def sharegpt_requests(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    num_requests: int,
    seed: int,
    output_len: int | None = None,
    max_model_len: int | None = None,
) -> list[BenchRequest]:
    """Conversations from a ShareGPT-format JSON file (a list of ``{"conversations": [{"from":
    "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``).

    As vLLM does: entries with fewer than two turns are dropped, the rest shuffled with
    ``seed``; the first turn is the prompt and the second turn's token count the output length
    (or ``output_len`` when given); pairs with fewer than 4 tokens on either side, prompts over
    1,024 tokens or prompt + output over 2,048 (or ``max_model_len``) are skipped.
    """
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    pairs = [
        (e["conversations"][0]["value"], e["conversations"][1]["value"])
        for e in entries
        if isinstance(e, dict) and len(e.get("conversations") or ()) >= 2
    ]
    random.Random(seed).shuffle(pairs)
    max_total = SHAREGPT_MAX_TOTAL_LEN
    if max_model_len is not None:
        max_total = min(max_total, max_model_len)
    out: list[BenchRequest] = []
    for prompt, completion in pairs:
        if len(out) == num_requests:
            break
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        n_out = output_len or len(tokenizer.encode(completion, add_special_tokens=False))
        too_short = len(prompt_ids) < SHAREGPT_MIN_LEN or (
            output_len is None and n_out < SHAREGPT_MIN_LEN
        )
        too_long = len(prompt_ids) > SHAREGPT_MAX_PROMPT_LEN or len(prompt_ids) + n_out > max_total
        if not (too_short or too_long):
            out.append(BenchRequest(tuple(prompt_ids), n_out))
    if len(out) < num_requests:
        raise ValueError(f"{path}: only {len(out)} usable conversations, {num_requests} requested")
    return out
