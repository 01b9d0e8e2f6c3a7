"""PromptTokenizer: each prompt shape encodes as transformers would; bad input is named."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from core.errors import InvalidRequestError
from gateway.prompts import (
    ChatMessage,
    ChatPrompt,
    PromptTokenizer,
    TextPrompt,
    TokenPrompt,
)
from tests.support.tokenizers import build_byte_level_tokenizer

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer(512)


@pytest.fixture(scope="module")
def prompts(tokenizer: PreTrainedTokenizerFast) -> PromptTokenizer:
    return PromptTokenizer(tokenizer, max_model_len=MAX_MODEL_LEN)


def test_text_matches_the_tokenizer_called_directly(
    tokenizer: PreTrainedTokenizerFast, prompts: PromptTokenizer
) -> None:
    text = "The capital of France is"
    token_ids = prompts.encode(TextPrompt(text))
    assert token_ids == tokenizer(text)["input_ids"]
    assert type(token_ids) is list and all(type(t) is int for t in token_ids)
    assert tokenizer.decode(token_ids) == text  # no BOS or other special token added


def test_token_ids_pass_through(prompts: PromptTokenizer) -> None:
    assert prompts.encode(TokenPrompt((0, 5, 511))) == [0, 5, 511]


def test_chat_renders_the_template_with_a_generation_prompt(
    tokenizer: PreTrainedTokenizerFast, prompts: PromptTokenizer
) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi 🙂"))
    token_ids = prompts.encode(ChatPrompt(messages))
    assert type(token_ids) is list and all(type(t) is int for t in token_ids)
    assert tokenizer.decode(token_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_every_allowed_role_is_accepted(prompts: PromptTokenizer, role: str) -> None:
    assert prompts.encode(ChatPrompt((ChatMessage(role, "x"),)))


def test_vocab_size_defaults_to_the_tokenizer_length(prompts: PromptTokenizer) -> None:
    assert prompts.vocab_size == 512


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (TextPrompt(""), "prompt text is empty"),
        (TokenPrompt(()), "prompt token list is empty"),
        (ChatPrompt(()), "chat prompt has no messages"),
        (TokenPrompt((1, 512)), "token id 512 at position 1 is outside the vocabulary [0, 512)"),
        (TokenPrompt((-1,)), "token id -1 at position 0 is outside the vocabulary [0, 512)"),
        (
            ChatPrompt((ChatMessage("user", "hi"), ChatMessage("robot", "beep"))),
            "chat message 1 has unknown role 'robot'; allowed roles: system, user, assistant, tool",
        ),
        (TokenPrompt(tuple(range(MAX_MODEL_LEN))), "prompt has 64 tokens"),
        (TextPrompt("word " * 100), "the model's context length is 64"),
    ],
)
def test_invalid_prompts_are_rejected_with_a_precise_message(
    prompts: PromptTokenizer, prompt: TextPrompt | TokenPrompt | ChatPrompt, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        prompts.encode(prompt)
    assert message in str(excinfo.value)


def test_a_model_without_a_chat_template_rejects_chat() -> None:
    tokenizer = build_byte_level_tokenizer(512)
    tokenizer.chat_template = None
    prompts = PromptTokenizer(tokenizer, max_model_len=MAX_MODEL_LEN)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        prompts.encode(ChatPrompt((ChatMessage("user", "hi"),)))
    assert prompts.encode(TextPrompt("hi"))  # text still works


def test_a_template_that_raises_becomes_an_invalid_request() -> None:
    tokenizer = build_byte_level_tokenizer(512)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    prompts = PromptTokenizer(tokenizer, max_model_len=MAX_MODEL_LEN)
    with pytest.raises(InvalidRequestError, match="tool messages are not supported"):
        prompts.encode(ChatPrompt((ChatMessage("tool", "42"),)))


class EmptyTokenizer:
    """Stands in for a tokenizer whose normalizer removes everything."""

    chat_template = "{{ '' }}"

    def __len__(self) -> int:
        return 10

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": []}

    def apply_chat_template(self, conversation: object, **kwargs: object) -> dict[str, list[int]]:
        return {"input_ids": []}


def test_prompts_that_tokenize_to_nothing_are_rejected() -> None:
    prompts = PromptTokenizer(EmptyTokenizer(), max_model_len=MAX_MODEL_LEN)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="prompt text tokenizes to no tokens"):
        prompts.encode(TextPrompt("\u200b"))
    with pytest.raises(InvalidRequestError, match="chat prompt renders to no tokens"):
        prompts.encode(ChatPrompt((ChatMessage("user", "hi"),)))


def test_explicit_vocab_size_bounds_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    prompts = PromptTokenizer(tokenizer, max_model_len=MAX_MODEL_LEN, vocab_size=600)
    assert prompts.encode(TokenPrompt((599,))) == [599]
    with pytest.raises(InvalidRequestError, match=r"\[0, 600\)"):
        prompts.encode(TokenPrompt((600,)))
