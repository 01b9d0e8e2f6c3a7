"""What every tier's server process stands on.

- ``grpc_runtime``: server start, health, reflection, drain on SIGTERM, admission
  (:class:`Lifecycle`), the exception-to-status table.
- ``interceptors``: bearer auth and per-call scope (request ids, admission) for every server.
- ``log_setup``: the structlog configuration of an entry point.
- ``metrics``, ``gpu``: Prometheus families (vLLM's names) and NVML gauges.
- ``proto_convert``: core objects to and from the internal protos.
- ``worker_runtime``, ``worker_servicer``: what the prefill and decode workers share (the
  engine's thread, load reports).

May import: kvtransfer, engine, core, protos. Never a tier or ``pdserve``. The modules the
gateway imports (all but the ``worker_*`` ones) never import torch.
"""
