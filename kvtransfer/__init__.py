"""KV page transfer from prefill to decode workers (control travels in gRPC, pages only here).

- ``sender``: :class:`KVSender`, the prefill side: one sending thread, transfers, acks.
- ``send_commands``: the typed commands the sender's calls queue (Open, SendPages, ...).
- ``send_peer``: a decode worker as the sender sees it: handshake states, its wire.
- ``send_budget``: the sender's open transfers and per-peer queued bytes; page checks.
- ``receiver``: :class:`KVReceiver`, the decode side: a ZeroMQ ROUTER, handshakes, acks.
- ``receive_peers``: the receiver's handshaken peers, their pair links and streams.
- ``page_writer``: what a decoded frame does to the KV pool and its reservations.
- ``reservations``: the decode side's leases on reserved blocks, and cancellation.
- ``out_of_band``: the decode side's reads of payloads off a pair's stream or group.
- ``handshake``: HELLO contents and the replay guard (:class:`HelloGuard`).
- ``wire``: the versioned binary frames (PAGE, DONE, ABORT, ACK, HELLO/WELCOME/REFUSE).
- ``frame_auth``: frame tags: AES-256-GMAC with the fleet key (AES-256-GCM encrypted pages
  with ``--kv-encrypt``), else XXH3-64 or none.
- ``keys``: keys derived from the fleet key (HKDF-SHA256, one per purpose) and nonces.
- ``modes``: the :class:`Backend` (zmq, stream, gloo, nccl) and :class:`Streaming` enums.
- ``datapath``: the backends' data paths and torch.distributed pair groups (a confined,
  authenticated rendezvous).
- ``pair_link``: the per-pair payload channel interface (:class:`PairLink`, :class:`PairHost`).
- ``stream_link``: the stream backend's sized records on a plain socket per pair.
- ``metrics``: per-endpoint transfer counters (:class:`TransferStats`).
- ``config``: how a worker's end of the channel is set up (:class:`TransferConfig`).
- ``settings``: the channel's flags and ``PDSERVE_*`` variables (torch-free).

May import: core, engine. Never a tier, ``server_runtime`` or ``pdserve``.
"""
