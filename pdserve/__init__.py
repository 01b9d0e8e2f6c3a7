"""pdserve: disaggregated LLM serving. This package holds the CLI, the local launcher, the Python
client SDK, and the runtime pieces every tier's entry point shares (logging, gRPC server set-up,
error mapping)."""

__version__ = "0.1.0"
