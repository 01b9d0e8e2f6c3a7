"""Gateway tier: the public ``pdserve.v1.Generation`` service.

- ``prompts``, ``validation``: turn a request into prompt token ids, or a clear error.
- ``detokenizer``, ``stop_strings``: incremental text that never splits a character.
- ``worker_clients``: calls to the prefill and decode tiers (the gateway's proto boundary
  towards workers).
- ``discovery``, ``registry``: which workers exist (addresses, DNS names re-resolved) and their
  live state (health and load streams).
- ``router``: which workers serve a request (pluggable policies, conditional disaggregation).
- ``generation``: one request's flow across the tiers, as domain events, with failover.
- ``servicer``: the public gRPC servicer; ``server``: the entry point (``pdserve gateway``).
"""
