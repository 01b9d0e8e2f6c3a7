"""The default model (SmolLM2-135M-Instruct) generating JSON under a schema at temperature 1, in
one engine batch: every output parses and validates. Needs the converted default model in the
usual cache (``pdserve up`` or ``make setup`` puts it there); skipped without it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from core.sampling import FinishReason, SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine import Engine, RequestOutput
from engine.model_files import default_cache_dir, default_model_dir, is_converted
from engine.model_loader import load_model
from engine.sequence import Sequence

MODEL_DIR: Path = default_model_dir(ModelConfig(cache_dir=default_cache_dir()))
pytestmark = pytest.mark.skipif(not is_converted(MODEL_DIR), reason="default model not converted")

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "sky": {"enum": ["sunny", "cloudy", "rain"]},
            "windy": {"type": "boolean"},
        },
        "required": ["city", "sky", "windy"],
        "additionalProperties": False,
    },
    "scores": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
        "additionalProperties": False,
    },
}
PROMPT = "Describe a {} as a JSON object."
MAX_TOKENS = 80


def _chat(tokenizer: AutoTokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(chat, add_special_tokens=False))  # type: ignore[attr-defined]


def test_json_at_temperature_one_parses_and_validates() -> None:
    model, spec = load_model(ModelConfig(model=str(MODEL_DIR)))
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    config = EngineConfig(
        model=ModelConfig(model=str(MODEL_DIR)),
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )
    engine = Engine(config, model, spec, sink=lambda outputs: None)
    for seed, (name, schema) in enumerate(SCHEMAS.items()):
        constraint = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(schema))
        sampling = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, structured=constraint
        )
        prompt = _chat(tokenizer, PROMPT.format(name))
        engine.add(Sequence(name, prompt, len(prompt), sampling, spec.eos_token_ids))
    outputs: list[RequestOutput] = []
    for _ in range(MAX_TOKENS + 2):
        if not engine.scheduler.has_work():
            break
        outputs.extend(engine.step())
    for name, schema in SCHEMAS.items():
        mine = [o for o in outputs if o.request_id == name]
        text = tokenizer.decode([t for o in mine for t in o.token_ids])
        assert mine[-1].finish_reason is FinishReason.STOP, (name, text)
        jsonschema.validate(json.loads(text), schema)
