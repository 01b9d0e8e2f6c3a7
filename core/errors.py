"""Named domain failures raised by the engine and mapped to gRPC codes by each servicer."""


class EngineError(Exception):
    """Base class for pdserve engine failures."""


class InvalidRequestError(EngineError):
    """The request cannot be served as given (maps to INVALID_ARGUMENT)."""


class OutOfBlocksError(EngineError):
    """The KV block pool cannot satisfy an allocation (maps to RESOURCE_EXHAUSTED)."""


class BlockPoolCorruptedError(EngineError):
    """The block pool's integrity check failed: an internal bug, never the caller's fault."""


class ModelLoadError(EngineError):
    """``--model`` does not name a loadable model of a supported family."""


class EngineStoppedError(EngineError):
    """The engine is shutting down or has died (maps to UNAVAILABLE)."""
