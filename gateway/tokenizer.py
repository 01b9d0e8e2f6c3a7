"""The served model's tokenizer: transformers' own loading, on a process without torch.

``AutoTokenizer`` picks the tokenizer class from the model's files as it does everywhere, so the
gateway encodes prompts and chat templates exactly as the reference does. In the gateway process
torch is hidden first (:mod:`server_runtime.torch_guard`), so this loads no libtorch.
"""

from __future__ import annotations

from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.errors import ModelLoadError


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the model folder ``path`` (local files only)."""
    from transformers import AutoTokenizer  # its import loads torch where torch is not hidden

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}") from exc
    return tokenizer
