"""OpenAI request fields -> the gateway's domain types (:class:`SamplingParams`, prompts).

Range checks stay where gRPC's are (:func:`gateway.validation.validate_sampling`, run by
:meth:`GenerationCore.prepare`); here only what is particular to the OpenAI shapes: options not
supported yet, vLLM's spellings (``top_k=-1``), ``logit_bias``'s string keys, content parts,
batched prompts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from gateway.fanout import validate_samples
from gateway.openai_api.errors import APIError
from gateway.openai_api.logprobs import chat_logprobs_of, completion_logprobs_of
from gateway.openai_api.protocol import (
    UNSUPPORTED,
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ResponseFormat,
    StructuredOutputs,
)
from gateway.prompts import ChatMessage, ChatPrompt, PromptInput, TextPrompt, TokenPrompt

MAX_SEED = 2**64  # seeds travel as uint64


@dataclass(frozen=True)
class ServedModel:
    """The model as the HTTP API names it."""

    names: tuple[str, ...]
    """Accepted ``model`` values; the first is the id ``/v1/models`` lists."""
    root: str
    max_model_len: int
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(
        cls, model: str, served: tuple[str, ...], max_model_len: int, fingerprint: str
    ) -> ServedModel:
        names = [*served, model, Path(model).name]
        unique = tuple(dict.fromkeys(n for n in names if n))
        return cls(unique, model, max_model_len, fingerprint)

    @property
    def id(self) -> str:
        return self.names[0]

    @property
    def system_fingerprint(self) -> str:
        return f"pdserve-{self.fingerprint}"

    def resolve(self, requested: str | None) -> str:
        """The name to answer with; an unknown model is a 404."""
        if requested is None or requested == "":
            return self.id
        if requested not in self.names:
            raise APIError(
                grpc.StatusCode.NOT_FOUND,
                f"the model {requested!r} does not exist; this server serves "
                f"{', '.join(repr(n) for n in self.names)}",
                param="model",
            )
        return requested


def invalid(message: str, param: str) -> APIError:
    """A 400 naming the request field at fault."""
    return APIError(grpc.StatusCode.INVALID_ARGUMENT, message, param=param)


unsupported = invalid  # an option set to a value pdserve cannot honour yet


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # type-exact: 0 and False are different values (an option may take either)
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def check_supported(request: BaseModel) -> None:
    """400 naming the first option set to a value the engine cannot honour yet."""
    for name in sorted(request.model_fields_set & UNSUPPORTED.keys()):
        value = getattr(request, name)
        if not _neutral(value, UNSUPPORTED[name]):
            raise unsupported(f"{name}={value!r} is not supported yet by pdserve", name)
    echo = getattr(request, "echo", None)
    if echo and isinstance(request, ChatCompletionRequest):
        raise unsupported("echo=True is not supported yet by pdserve for chat completions", "echo")
    if echo and getattr(request, "logprobs", None) is not None:
        raise unsupported(
            "echo with logprobs is not supported yet by pdserve (it needs the prompt tokens' "
            "logprobs, which the workers do not compute)",
            "echo",
        )
    options = getattr(request, "stream_options", None)
    if options is not None:
        if not request.stream:  # type: ignore[attr-defined]
            raise InvalidRequestError("stream_options is only allowed when stream is true")
        if options.continuous_usage_stats:
            raise unsupported(
                "stream_options.continuous_usage_stats is not supported yet by pdserve",
                "stream_options",
            )


def samples_of(request: CompletionRequest | ChatCompletionRequest) -> int:
    """``n``, checked (unset: 1)."""
    n = 1 if request.n is None else request.n
    try:
        validate_samples(n)
    except InvalidRequestError as exc:
        raise invalid(str(exc), "n") from None
    return n


def sampling_of(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None
) -> SamplingParams:
    """The request's sampling; ``max_tokens`` None is filled in later (the rest of the context)."""
    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    top_k = request.top_k if request.top_k is not None else 0
    seed = request.seed
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise InvalidRequestError(f"seed must be in [0, 2**64), got {seed}")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 1,
        temperature=request.temperature if request.temperature is not None else 1.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        top_k=0 if top_k == -1 else top_k,  # vLLM's -1: no top-k
        seed=seed,
        stop=stops,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        min_p=_or(request.min_p, 0.0),
        min_tokens=request.min_tokens or 0,
        logit_bias=logit_bias_of(request.logit_bias),
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
        logprobs=chat_logprobs_of(request)
        if isinstance(request, ChatCompletionRequest)
        else completion_logprobs_of(request),
        structured=structured_of(request.response_format, request.structured_outputs),
    )


def structured_of(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> StructuredOutput | None:
    """The one constraint ``response_format`` (OpenAI) or ``structured_outputs`` (vLLM) sets;
    None for plain text. Whether it compiles is checked later, with gRPC's checks."""
    from_format = _from_response_format(response_format)
    from_vllm = _from_structured_outputs(structured)
    if from_format is not None and from_vllm is not None:
        raise invalid("set response_format or structured_outputs, not both", "response_format")
    return from_format or from_vllm


def _from_response_format(fmt: ResponseFormat | None) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise InvalidRequestError(
                "response_format.json_schema is only allowed with type 'json_schema'",
                "response_format",
            )
        return None
    if fmt.type == "json_object":
        return StructuredOutput(GrammarKind.JSON_OBJECT)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise invalid(
            "response_format of type 'json_schema' needs json_schema.schema",
            "response_format",
        )
    return StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(fmt.json_schema.schema_))


def _from_structured_outputs(so: StructuredOutputs | None) -> StructuredOutput | None:
    if so is None:
        return None
    given = [
        name
        for name in ("json", "json_object", "regex", "choice", "grammar")
        if getattr(so, "json_" if name == "json" else name) not in (None, False)
    ]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise invalid(
            f"structured_outputs takes exactly one of json, json_object, regex, choice and "
            f"grammar, got {what}",
            "structured_outputs",
        )
    if so.json_ is not None:
        spec = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
        return StructuredOutput(GrammarKind.JSON_SCHEMA, spec)
    if so.json_object:
        return StructuredOutput(GrammarKind.JSON_OBJECT)
    if so.regex is not None:
        return StructuredOutput(GrammarKind.REGEX, so.regex)
    if so.choice is not None:
        return StructuredOutput(GrammarKind.CHOICE, choices=tuple(so.choice))
    return StructuredOutput(GrammarKind.LARK, so.grammar or "")


def _or(value: float | None, default: float) -> float:
    return default if value is None else float(value)


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted pairs; ranges are checked by validation."""
    pairs: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                param="logit_bias",
            ) from None
        if token_id in pairs:
            raise APIError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"logit_bias names token id {token_id} twice",
                param="logit_bias",
            )
        pairs[token_id] = float(value)
    return tuple(sorted(pairs.items()))


def completion_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> PromptInput:
    if isinstance(prompt, str):
        return TextPrompt(prompt)
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if all(isinstance(t, int) for t in prompt):
        return TokenPrompt(tuple(t for t in prompt if isinstance(t, int)))
    if len(prompt) > 1:
        raise unsupported(
            f"a batch of {len(prompt)} prompts is not supported yet by pdserve; send one "
            "prompt per request",
            "prompt",
        )
    return completion_prompt(prompt[0])  # type: ignore[arg-type]


def chat_messages(messages: list[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    out = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        for name in ("name", "tool_calls", "tool_call_id", "function_call", "audio"):
            if getattr(message, name):
                raise unsupported(f"{where}.{name} is not supported yet by pdserve", "messages")
        out.append(ChatMessage(message.role, _content(message.content, where)))
    return tuple(out)


def chat_prompt(request: ChatCompletionRequest) -> ChatPrompt:
    return ChatPrompt(chat_messages(request.messages), request.add_generation_prompt)


def _content(content: str | list[Any] | None, where: str) -> str:
    """A message's text: a string, or its text parts joined by newlines (as vLLM does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        data = part.model_dump() if isinstance(part, BaseModel) else part
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "text" or not isinstance(data.get("text"), str):
            raise unsupported(
                f"{where}.content[{index}]: content parts of type {kind!r} are not supported "
                "yet by pdserve (only 'text')",
                "messages",
            )
        texts.append(data["text"])
    return "\n".join(texts)
