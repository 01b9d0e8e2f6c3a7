"""The reference every end-to-end test compares against: transformers' own greedy generate."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


@lru_cache(maxsize=4)
def _model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@lru_cache(maxsize=4)
def tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by ``generate`` (stops at the model's eos like pdserve does)."""
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
    )
    return out[0, len(prompt_ids) :].tolist()
