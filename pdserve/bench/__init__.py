"""``pdserve bench``: a load generator and a side-by-side comparison, with vLLM's metrics.

- ``datasets``: requests as exact token ids; ``load``: arrival schedules and the async runner;
- ``stream``: one timed streaming request; ``runner``: one gateway at one load;
- ``openai_http``: the same against any OpenAI-compatible server (``--backend openai``), SSE;
  ``sse``: its events parsed and timed per request;
- ``metrics``: TTFT, TPOT, ITL, E2E, throughput and goodput exactly as ``vllm bench serve``;
- ``baselines``, ``hf_continuous``: the same requests through ``transformers`` (``generate``
  serially and in static batches of 8; continuous batching); ``compare``: all in one run;
- ``report``: the table and the JSON file; ``plots``: the PNG plots;
- ``settings``: the flags, declared once; ``cli``: the ``pdserve bench`` entry point.
"""
