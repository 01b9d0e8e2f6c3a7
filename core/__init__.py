"""The torch-free core every layer stands on: plain data and pure functions, no I/O.

- ``errors``: the named domain failures servicers map to statuses.
- ``sampling``: sampling parameters, finish reasons, per-worker timings.
- ``ticket``: the transfer ticket and the fingerprint both ends of a KV transfer compare.
- ``prefix_hash``, ``prefix_summary``: chained block hashes and the prefix-cache summary the
  router reads.
- ``pool_stats``: what a worker reports about its KV pool.
- ``tls``, ``rich_errors``: gRPC channel credentials and ``google.rpc`` error details, shared
  by the servers and the client SDK.

May import: protos, grpc, the standard library. Never torch, never another pdserve package.
"""
