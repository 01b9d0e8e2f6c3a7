"""pdserve engine: what the prefill and decode tiers share.

Map of modules (one idea each):
- ``config``: frozen configuration dataclasses built at each entry point.
- ``model_loader``: resolves ``--model`` to a local folder (converting the default GGUF once) and
  loads it; describes the model's KV geometry (:class:`ModelSpec`).
- ``block_pool``: ref-counted KV block allocator, pure Python.
- ``kv_cache``: the paged KV tensor and page gather/scatter.
- ``attention``: attention over pages, plugged into transformers' attention interface.
- ``llama_forward``: pdserve's own forward pass for Llama-family models (fused projections,
  no per-step module overhead); other families run transformers' modules.
- ``kernels``: native CPU kernels (paged decode attention in C), built on this machine at first
  use and called through ctypes.
- ``sequence``: per-request state (:class:`Sequence`) with its status enum, sampling parameters.
- ``sampler``: batched greedy / temperature / top-k / top-p sampling with per-request seeds.
- ``scheduler``: waiting and running queues, token budget, block reservation.
- ``model_runner``: turns a scheduled batch into tensors and runs one forward pass.
- ``engine``: the step loop (schedule -> run -> update) and its thread.
"""
