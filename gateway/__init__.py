"""Gateway tier: the public ``pdserve.v1.Generation`` service.

- ``prompts``, ``validation``: turn a request into prompt token ids, or a clear error.
- ``detokenizer``, ``stop_strings``: incremental text that never splits a character.
- ``worker_clients``: calls to the prefill and decode tiers (the gateway's proto boundary
  towards workers); ``router``: which workers serve a request.
- ``generation``: one request's flow across the tiers, as domain events.
- ``servicer``: the public gRPC servicer; ``server``: the entry point (``pdserve gateway``).
"""
