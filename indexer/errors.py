"""The error hierarchy of clipdex. Errors carry data; the CLI decides how to show them."""

from __future__ import annotations


class ClipdexError(Exception):
    """Base of every error clipdex raises on purpose."""


class DecodeError(ClipdexError):
    """An image could not be turned into pixels; `reason` is a stable quarantine code."""

    def __init__(self, reason: str, message: str, path: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.path = path


class StoreError(ClipdexError):
    """The store cannot be opened or written as asked."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


class ModelMismatchError(StoreError):
    """The store was built with another model, weights, precision or preprocessing."""


class WeightsUnavailableError(ClipdexError):
    """Model weights could be neither read from a file nor fetched by open_clip."""


class IndexError_(ClipdexError):
    """The FAISS index is missing, corrupt or disagrees with the store."""


class QueryError(ClipdexError):
    """One query could not be answered (the others still are)."""


class ClassifierError(ClipdexError):
    """A detector file is missing, unsafe (e.g. a pickle) or incompatible with the store."""
