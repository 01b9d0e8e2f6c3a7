"""The gateway's tokenizer, loaded with torch hidden, encodes and decodes as the reference does.

Each check runs ``load_tokenizer`` in a child process whose torch is forbidden (as in the
gateway) and compares it with ``AutoTokenizer`` here, where torch is loaded: same class, same
prompt ids, same chat-template ids, same decoded text, for every supported family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.support.tiny_models import TinyArch, build_tiny_model

TEXTS = ("The capital of France is", "Le café 日本語 🙂 123456", "  spaced\n\ttabs  ")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]

CHILD = """
import json, sys
from server_runtime.torch_guard import forbid_torch
forbid_torch()
from pathlib import Path
from gateway.tokenizer import load_tokenizer
tok = load_tokenizer(Path(sys.argv[1]))
texts, messages = json.loads(sys.argv[2]), json.loads(sys.argv[3])
chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
chat = chat["input_ids"] if hasattr(chat, "keys") else chat
ids = [tok(t)["input_ids"] for t in texts]
print(json.dumps({
    "class": type(tok).__name__,
    "len": len(tok),
    "ids": ids,
    "chat": list(chat),
    "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
    "torch": sys.modules.get("torch") is not None,
}))
"""


def _in_gateway_process(path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(TEXTS), json.dumps(MESSAGES)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("arch", [a.value for a in TinyArch])
def test_tokenizer_without_torch_matches_auto_tokenizer(tmp_path: Path, arch: str) -> None:
    path = build_tiny_model(tmp_path / arch, arch, vocab_size=512)
    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    got = _in_gateway_process(path)
    assert got["torch"] is False
    assert got["class"] == type(reference).__name__
    assert got["len"] == len(reference)
    ids = [reference(t)["input_ids"] for t in TEXTS]
    assert got["ids"] == ids
    chat = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert got["chat"] == list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    assert got["decoded"] == [reference.decode(i, skip_special_tokens=True) for i in ids]
