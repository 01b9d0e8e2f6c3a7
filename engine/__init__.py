"""pdserve engine: what the prefill and decode tiers run. May import core; never kvtransfer,
server_runtime, a tier or pdserve.

Map of modules (one idea each):
- ``config``, ``settings``: the frozen configuration and the flags it is built from (torch-free).
- ``model_files``: ``--model`` resolved to a local folder and described as a :class:`ModelSpec`
  (torch-free; the gateway reads it); ``model_loader``: weights loaded for serving, the default
  model's GGUF converted once.
- ``block_pool``: ref-counted KV block allocator with prefix hashes, pure Python.
- ``kv_cache``: the paged KV tensor and page gather/scatter; ``kv_memory``: the pool sized from a
  memory budget.
- ``kv_connector``: the seam through which a prompt's pages leave a prefill engine and enter a
  decode engine (the transfer layer implements the other side).
- ``attention``: attention over pages, plugged into transformers' attention interface.
- ``llama_forward``: pdserve's own forward pass for Llama-family models; ``linear``: linear
  layers over the native kernel; other families run transformers' modules.
- ``kernels``, ``native``: C kernels built on this machine at first use (paged attention, linear
  layers, layer ops) and the choice of which ones run.
- ``sequence``: per-request state (:class:`Sequence`) with its status enum, and its outputs.
- ``sampler``: batched greedy / temperature / top-k / top-p sampling with per-request seeds.
- ``scheduler``: waiting and running queues, token budget, block reservation, preemption.
- ``model_runner``: turns a scheduled batch into tensors and runs one forward pass.
- ``engine``: the step (schedule -> run -> update); ``async_engine``: its thread, for asyncio.
"""
