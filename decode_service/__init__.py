"""Decode tier: a gRPC server over a paged KV pool running continuous batching.

- ``worker``: :class:`DecodeWorker`, the engine plus the KV receiver, in domain terms.
- ``servicer``: the ``pdserve.v1.Decode`` gRPC servicer (the only module touching protos).
- ``server``: the entry point (``pdserve decode``).
"""
