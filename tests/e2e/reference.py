"""The reference every end-to-end test compares against: transformers' own greedy generate."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


@lru_cache(maxsize=4)
def _model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@lru_cache(maxsize=4)
def tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def greedy(
    path: Path,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    **processors: Any,
) -> list[int]:
    """Greedy continuation by ``generate`` (stops at the model's eos like pdserve does, and at
    ``stop_token_ids``); ``processors``: generate's own options (``repetition_penalty``,
    ``min_new_tokens``, ``sequence_bias``, ``logits_processor``...)."""
    model = _model(str(path))
    ids = torch.tensor([prompt_ids])
    if stop_token_ids:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        processors["eos_token_id"] = [*eos, *stop_token_ids]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        **processors,
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.inference_mode()
def greedy_logprobs(
    path: Path, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's float32 ``log_softmax`` of the raw logits (``generate``'s
    ``output_logits``), as pdserve's logprobs of a greedy request without processors."""
    model = _model(str(path))
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    return out.sequences[0, len(prompt_ids) :].tolist(), steps
