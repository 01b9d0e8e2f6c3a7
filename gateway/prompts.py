"""Prompt inputs as the gateway's domain types, and their tokenization.

A request's prompt is exactly one of three shapes (:data:`PromptInput`): plain text, token ids
the client tokenized itself, or a chat conversation rendered with the model's chat template.
:class:`PromptTokenizer` turns any of them into the token ids the engine sees, rejecting bad
input with :class:`~core.errors.InvalidRequestError` whose message names the problem.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from core.errors import InvalidRequestError


class ChatRole(enum.Enum):
    """Roles a chat message may have."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


ALLOWED_ROLES = tuple(role.value for role in ChatRole)


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation; ``role`` is checked against :class:`ChatRole` on encode."""

    role: str
    content: str


@dataclass(frozen=True)
class TextPrompt:
    """Raw text, tokenized as ``tokenizer(text)["input_ids"]`` would (special-token defaults)."""

    text: str


@dataclass(frozen=True)
class TokenPrompt:
    """Token ids the client produced itself; each must lie in ``[0, vocab_size)``."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the model's chat template (plus the generation prompt,
    the assistant turn's opening, unless ``add_generation_prompt`` is False)."""

    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True


PromptInput = TextPrompt | TokenPrompt | ChatPrompt


class PromptTokenizer:
    """Turns a :data:`PromptInput` into prompt token ids for one model.

    ``vocab_size`` bounds client-given token ids; it defaults to ``len(tokenizer)`` (base
    vocabulary plus added tokens), the ids the tokenizer can decode. Every returned prompt is
    non-empty and shorter than ``max_model_len``, so at least one token can be generated.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_model_len: int,
        vocab_size: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._vocab_size = len(tokenizer) if vocab_size is None else vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, inp: PromptInput) -> list[int]:
        """Token ids for ``inp``; raises InvalidRequestError if it cannot be served."""
        token_ids = self.tokenize(inp)
        if len(token_ids) >= self._max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens, but the model's context length is "
                f"{self._max_model_len}: the prompt must be shorter to leave room for output"
            )
        return token_ids

    def tokenize(self, inp: PromptInput) -> list[int]:
        """Token ids for ``inp``, whatever their number (``encode`` bounds it by the context)."""
        match inp:
            case TextPrompt(text=text):
                return self._encode_text(text)
            case TokenPrompt(token_ids=given):
                return self._check_token_ids(given)
            case ChatPrompt(messages=messages, add_generation_prompt=generation_prompt):
                return self._encode_chat(messages, generation_prompt)
            case _:
                raise InvalidRequestError(f"unsupported prompt type {type(inp).__name__}")

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            raise InvalidRequestError("prompt text is empty")
        token_ids = list(self._tokenizer(text)["input_ids"])
        if not token_ids:
            raise InvalidRequestError("prompt text tokenizes to no tokens")
        return token_ids

    def _check_token_ids(self, token_ids: tuple[int, ...]) -> list[int]:
        if not token_ids:
            raise InvalidRequestError("prompt token list is empty")
        for position, token_id in enumerate(token_ids):
            if not 0 <= token_id < self._vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {token_id} at position {position} is outside the "
                    f"vocabulary [0, {self._vocab_size})"
                )
        return list(token_ids)

    def _encode_chat(
        self, messages: tuple[ChatMessage, ...], add_generation_prompt: bool = True
    ) -> list[int]:
        if not messages:
            raise InvalidRequestError("chat prompt has no messages")
        for index, message in enumerate(messages):
            if message.role not in ALLOWED_ROLES:
                raise InvalidRequestError(
                    f"chat message {index} has unknown role {message.role!r}; "
                    f"allowed roles: {', '.join(ALLOWED_ROLES)}"
                )
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; send a text or token-id prompt instead"
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            rendered = self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except TemplateError as exc:  # includes the template's own raise_exception(...)
            raise InvalidRequestError(f"chat template rejected the messages: {exc}") from exc
        token_ids = _as_token_list(rendered)
        if not token_ids:
            raise InvalidRequestError("chat prompt renders to no tokens")
        return token_ids


def _as_token_list(rendered: Any) -> list[int]:
    """Flatten ``apply_chat_template``'s result to a list of ints.

    transformers 5.x returns a ``BatchEncoding`` (a mapping with ``input_ids``) by default for
    ``tokenize=True``; older versions returned a plain list.
    """
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    return [int(token_id) for token_id in rendered]
