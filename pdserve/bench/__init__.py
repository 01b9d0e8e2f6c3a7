"""``pdserve bench``: a load generator and a side-by-side comparison, with vLLM's metrics.

Modules, one idea each:

- ``datasets``: requests as exact token ids (random lengths, shared prefixes, ShareGPT files);
- ``load``: when each request is sent (Poisson/gamma arrivals, closed loop) and the async runner;
- ``stream``: one timed streaming request against a gateway;
- ``runner``: one gateway at one load (warm-up, schedule, metrics);
- ``metrics``: TTFT, TPOT, ITL, E2E, throughput and goodput exactly as ``vllm bench serve``;
- ``baselines``: the same requests through ``transformers`` ``generate`` (one at a time, static
  batches of 8);
- ``hf_continuous``: the same requests through transformers' own continuous batching;
- ``compare``: baselines and pdserve clusters in one run, and the ratios between them;
- ``report``: the table and the JSON file; ``plots``: the PNG plots;
- ``cli``: the ``pdserve bench`` flags and entry point.
"""
