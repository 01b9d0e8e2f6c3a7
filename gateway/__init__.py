"""Gateway tier: the public ``pdserve.v1.Generation`` service.

- ``tokenizer``: loads the model's tokenizer without torch; ``prompts``, ``validation``: turn a
  request into prompt token ids, or a clear error (``errors``: failures and their status codes).
- ``detokenizer``, ``stop_strings``: incremental text that never splits a character.
- ``worker_clients``: calls to the prefill and decode tiers (the proto boundary towards workers).
- ``discovery``, ``registry``: which workers exist (DNS names re-resolved) and their live state.
- ``router``: which workers serve a request; ``generation``: its flow across tiers, failover.
- ``servicer``: the public gRPC servicer; ``server``: the entry point (``pdserve gateway``);
  ``settings``: the gateway's flags, declared once.
"""
