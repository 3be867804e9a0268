"""Errors that carry a message meant for the user; the CLI prints them without a traceback."""


class LensCacheError(Exception):
    """Base class: anything the user can fix by changing input or options."""


class DataError(LensCacheError):
    """The text data cannot be read, is empty, or is too short."""


class ModelError(LensCacheError):
    """The model cannot be loaded, is not a causal LM, or its architecture is unsupported."""


class StoreError(LensCacheError):
    """A store is missing, malformed, of an unknown schema, corrupt, or not safe to open."""


class ResumeMismatch(StoreError):
    """`--resume` would mix a different model, tokenizer, data or settings into an existing store."""
