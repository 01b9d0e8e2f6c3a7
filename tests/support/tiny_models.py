"""Tiny random-weight causal LMs saved as complete local transformers model folders.

Each folder holds ``config.json``, ``generation_config.json``, safetensors weights and the
byte-level tokenizer from :mod:`tests.support.tokenizers`, so ``AutoModelForCausalLM`` and
``AutoTokenizer`` load it offline. Invariants:

* the model's vocabulary equals the tokenizer's (``len(tokenizer) == vocab_size``), so every
  sampled id decodes;
* the same ``(arch, vocab_size, seed)`` gives bit-identical weights (the global torch RNG is
  forked, not disturbed);
* ``initializer_range`` is large, so logits are peaked and greedy decoding has no near-ties that
  float reordering in another implementation could flip.

Load the tokenizer back with ``AutoTokenizer.from_pretrained(path)`` rather than reusing
``build_byte_level_tokenizer()``: for ``qwen2`` folders transformers 5.x ignores the saved
``tokenizer_class`` and builds ``Qwen2Tokenizer``, which adds an NFC normalizer and Qwen's
pre-tokenizer regex (digits split one by one), so its encodings can differ; decoding is the same.
"""

from __future__ import annotations

import enum
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.support.tokenizers import build_byte_level_tokenizer

MAX_POSITIONS = 1024  # context length of every tiny model
INITIALIZER_RANGE = 0.3  # std of random weights: large, so greedy argmax is far from ties


class TinyArch(enum.Enum):
    """Model families a tiny model can be built for."""

    LLAMA = "llama"
    QWEN2 = "qwen2"
    MISTRAL = "mistral"
    GPT2 = "gpt2"


def _config(arch: TinyArch, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """Config for a 2-layer, 4-head model with 64-wide hidden states."""
    if arch is TinyArch.GPT2:
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=64,
            n_layer=2,
            n_head=4,
            initializer_range=INITIALIZER_RANGE,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    decoder_only = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in the default model
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INITIALIZER_RANGE,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "tie_word_embeddings": False,
    }
    if arch is TinyArch.LLAMA:
        return LlamaConfig(**decoder_only)
    if arch is TinyArch.QWEN2:
        return Qwen2Config(**decoder_only)
    return MistralConfig(**decoder_only, sliding_window=None)


def _model_class(arch: TinyArch) -> type[PreTrainedModel]:
    return {
        TinyArch.LLAMA: LlamaForCausalLM,
        TinyArch.QWEN2: Qwen2ForCausalLM,
        TinyArch.MISTRAL: MistralForCausalLM,
        TinyArch.GPT2: GPT2LMHeadModel,
    }[arch]


def build_tiny_model(path: Path, arch: str, vocab_size: int, seed: int = 0) -> Path:
    """Build a tiny random model of family ``arch`` into ``path`` and return ``path``.

    ``arch`` is one of ``TinyArch``'s values ("llama", "qwen2", "mistral", "gpt2");
    ``vocab_size`` must be at least ``tests.support.tokenizers.MIN_VOCAB_SIZE``. The folder is
    created if needed; existing files in it are overwritten.
    """
    family = TinyArch(arch)
    tokenizer = build_byte_level_tokenizer(vocab_size)
    eos_id = tokenizer.eos_token_id
    config = _config(family, vocab_size, eos_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        do_sample=False,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
