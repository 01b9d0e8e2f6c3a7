"""pdserve's own forward pass against transformers' modules, on tiny random models (no real
model): same logits for a packed batch of prompts, weights shared rather than copied, and only
Llama-family models taken over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.sampling import SamplingParams
from engine import llama_forward
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from tests.support.tiny_models import build_tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(10, 40)), [300, 301]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers(tmp_path: Path, arch: str) -> None:
    model, spec = load_model(ModelConfig(model=str(build_tiny_model(tmp_path, arch, 512, seed=4))))
    with torch.inference_mode():
        expected = [model(torch.tensor([p])).logits[0, -1] for p in PROMPTS]
    cache = KVCache(
        spec.num_layers, 64, 4, spec.num_kv_heads, spec.head_dim, torch.float32, torch.device("cpu")
    )
    runner = ModelRunner(model, cache, Sampler(seed=0))
    assert runner.fast is not None
    items, next_block = [], 0
    for i, prompt in enumerate(PROMPTS):
        seq = Sequence(f"s{i}", list(prompt), len(prompt), SamplingParams(temperature=0))
        blocks = -(-len(prompt) // 4)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        items.append(ScheduledSeq(seq, len(prompt), True))
    inputs = runner.prepare(ScheduledBatch(tuple(items)))
    with torch.inference_mode():
        logits = runner.fast(
            inputs.input_ids[0], inputs.position_ids[0], inputs.attention, inputs.logits_index
        )
    for row, i in enumerate(inputs.sample_items):
        torch.testing.assert_close(logits[row], expected[i], atol=1e-4, rtol=1e-4)
        assert int(logits[row].argmax()) == int(expected[i].argmax())


def test_projections_become_views_of_the_fused_weights(tmp_path: Path) -> None:
    model, _ = load_model(ModelConfig(model=str(build_tiny_model(tmp_path, "qwen2", 512))))
    fast = llama_forward.LlamaForward(model, lambda linear: linear)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gate_up = fast.layers[0].qkv, fast.layers[0].gate_up
    storage = qkv.weight.untyped_storage().data_ptr()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == storage
        assert proj.bias.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
    assert torch.equal(qkv.weight[: attn.q_proj.out_features], attn.q_proj.weight)
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == (
        gate_up.weight.untyped_storage().data_ptr()
    )


def test_only_llama_family_is_taken_over(tmp_path: Path) -> None:
    llama, _ = load_model(ModelConfig(model=str(build_tiny_model(tmp_path / "l", "llama", 512))))
    gpt2, _ = load_model(ModelConfig(model=str(build_tiny_model(tmp_path / "g", "gpt2", 512))))
    assert llama_forward.supports(llama)
    assert not llama_forward.supports(gpt2)
