"""Keep torch out of a process that must not load it (the gateway).

:func:`forbid_torch` marks torch as absent for the rest of the process, before anything imports
it: ``import torch`` then raises ImportError, and transformers (which looks torch up before
importing it) takes the path it takes on a machine without torch, so tokenizers, chat templates
and configs load exactly as on a torch-free gateway image. Call it first thing at the entry
point; it refuses to run once torch is already loaded.
"""

from __future__ import annotations

import os
import sys

FORBIDDEN = ("torch",)


class TorchAlreadyLoadedError(RuntimeError):
    """torch was imported before the guard ran: an import-order bug at the entry point."""


def forbid_torch() -> None:
    """Make ``import torch`` fail in this process from now on."""
    for name in FORBIDDEN:
        if sys.modules.get(name) is not None:
            raise TorchAlreadyLoadedError(f"{name} is already imported; forbid it earlier")
        sys.modules[name] = None  # type: ignore[assignment]  # the documented import blocker
    # transformers caches whether torch is there; its "PyTorch was not found" notice is expected
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import_utils = sys.modules.get("transformers.utils.import_utils")
    if import_utils is not None:
        import_utils.is_torch_available.cache_clear()
