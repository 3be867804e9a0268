"""The one error hierarchy of lenscache: every error a user can cause is a `LensCacheError`.

The CLI prints these as one line (``error: …``) with a non-zero exit and no traceback; messages
name the problem (the file, array, layer or value) and, where the API and the CLI differ, both
the argument and its option (``topk (--topk)``).
"""


class LensCacheError(Exception):
    """Base class: anything the user can fix by changing input or options."""


class DataError(LensCacheError):
    """The text data cannot be read, is empty, or is too short; or a build option is out of range."""


class ModelError(LensCacheError):
    """The model cannot be loaded, is not a causal LM, or its architecture is unsupported."""


class StoreError(LensCacheError):
    """A store is missing, malformed, of an unknown schema, corrupt, or not safe to open."""


class StoreLocked(StoreError):
    """Another writer holds the store's writer lock (or left a lock that must be cleared first)."""


class ResumeMismatch(StoreError):
    """`--resume` would mix a different model, tokenizer, data or settings into an existing store."""


class SelectionError(LensCacheError, IndexError):
    """Sequences, positions or layers asked for that the store or lens does not have."""


class LensError(LensCacheError):
    """A lens file is malformed, or does not belong to the store it is applied to."""


class BasisError(LensError):
    """A causal basis file is malformed, or does not belong to the store or lens it is used with."""


class DeviceError(LensCacheError):
    """A device was asked for that this machine does not have."""
