"""A byte-level BPE tokenizer built entirely in code, for tests that must not touch the hub.

The tokenizer is GPT-2 style (ByteLevel pre-tokenizer and decoder, no prefix space), trained in
memory on a small multilingual corpus so that multi-byte characters ("é", "日本語", emoji) are
split across tokens in interesting ways. Invariants of the result:

* ``len(tokenizer) == vocab_size`` exactly (BPE merges first, then reserved special tokens if the
  corpus runs out of merges), so a model built with the same ``vocab_size`` can never sample an
  id the tokenizer cannot decode.
* ids 0, 1, 2 are ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``.
* no BOS is added when encoding; a ChatML-style chat template is set.
* building twice with the same ``vocab_size`` gives the same vocabulary.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little model that generated one token at a time.",
    "def main() -> None:\n    print('hello, world')\n    return None\n",
    "Le café de la gare est fermé; l'élève a oublié son cahier près de la fenêtre.",
    "Voilà une phrase française avec des accents: à, â, ç, è, é, ê, ë, î, ï, ô, ù, û.",
    "Der Bär läuft über die Straße, und die Größe der Äpfel überrascht alle Kinder.",
    "El niño pequeño comió una piña en la mañana; ¿quién sabe por qué? ¡Qué día!",
    "日本語のテキストを分割します。東京は日本の首都です。今日はいい天気ですね。",
    "中文文本也需要测试：北京是中国的首都，我们今天学习自然语言处理。",  # noqa: RUF001
    "한국어 문장도 포함합니다. 서울은 대한민국의 수도입니다.",
    "Русский текст: Москва — столица России. Привет, как дела?",
    "Ελληνικά: η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Emoji time 🙂🚀🎉👍🏽 and flags 🇫🇷🇯🇵, hearts ❤️💙, math ∑∫√∞ ≤ ≥ ≠.",
    "Numbers 0123456789, symbols @#$%^&*()[]{}<>, and quotes “smart” ‘single’ «guillemets».",  # noqa: RUF001
)


def build_byte_level_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of exactly ``vocab_size`` entries and wrap it for transformers.

    Wraps the ``tokenizers`` object with ``PreTrainedTokenizerFast(tokenizer_object=...)``: in
    transformers 5.x, ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds an
    empty tokenizer, so the result is checked to round-trip a multilingual sample.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    missing = vocab_size - backend.get_vocab_size()
    if missing > 0:
        backend.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _check(tokenizer, vocab_size)
    return tokenizer


def _check(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> None:
    """Fail loudly if the wrapped tokenizer is empty or does not round-trip."""
    sample = "Hello, café 日本語 🙂!"
    ids = tokenizer(sample)["input_ids"]
    if not ids or tokenizer.decode(ids) != sample:
        raise RuntimeError(f"byte-level tokenizer does not round-trip: {sample!r} -> {ids}")
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    if tokenizer.eos_token_id != 0:
        raise RuntimeError(f"eos id is {tokenizer.eos_token_id}, expected 0")


def build_metaspace_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE (Metaspace, byte fallback), built in code.

    Its decoder strips the leading space of the first token it decodes (``"▁world"`` alone
    decodes to ``"world"``), the case incremental detokenizers must handle with context. The
    alphabet is limited, so rarer characters (CJK, emoji) fall back to ``<0xXX>`` byte tokens.
    ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` (eos); no BOS is added when encoding.
    """
    specials = ["<unk>", "<s>", "</s>"]
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, limit_alphabet=80, show_progress=False
    )
    trained.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for byte in range(NUM_BYTES):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    sample = "Hello, café 日本語 🙂!"
    if tokenizer.decode(tokenizer(sample)["input_ids"]) != sample:
        raise RuntimeError("metaspace tokenizer does not round-trip")
    return tokenizer
