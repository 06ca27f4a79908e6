"""Errors pinfer raises for bad user input. All are ValueErrors, so callers that
already catch ValueError for bad arguments keep working."""


class PinferError(ValueError):
    """Base class: the message says what was wrong and what is accepted."""


class ModelNotFoundError(PinferError):
    """The model path or alias does not resolve to a checkpoint."""


class ModelLoadError(PinferError):
    """The checkpoint exists but cannot be read (corrupt, truncated, missing tensors)."""


class UnsupportedArchitectureError(PinferError):
    """The checkpoint's architecture has no model implementation in pinfer."""


class InvalidRequestError(PinferError):
    """A request (prompt or sampling parameters) cannot be served."""
