"""Prefill tier: runs prompts, samples the first token, ships the prompt's KV pages.

- ``worker``: :class:`PrefillWorker`, the engine plus the KV sender, in domain terms.
- ``servicer``: the ``pdserve.v1.Prefill`` gRPC servicer (the only module touching protos).
- ``server``: the entry point (``pdserve prefill``).
"""
