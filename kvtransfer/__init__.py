"""KV page transfer between tiers.

- ``wire``: the versioned binary frame format (page, done, abort, ack), validated on arrival.
- ``zmq_transport``: :class:`KVSender` (prefill side) and :class:`KVReceiver` (decode side) over
  ZeroMQ tcp/ipc with zero-copy payload frames, acknowledged delivery and leases.

Control (which blocks, which transfer) travels in gRPC; page bytes travel only here.
"""
