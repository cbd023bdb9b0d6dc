"""What can be wrong with a store: one exception class per kind, each message naming the store and the problem."""

from __future__ import annotations

__all__ = ["StoreError", "FormatMismatch", "TokenizerMismatchError", "ProvenanceMismatch", "IncompleteSection"]


class StoreError(Exception):
    """Anything wrong with a store; the message names the store and what is wrong."""


class FormatMismatch(StoreError):
    """Another format, or a version this code does not read (or, to add passes, write)."""


class TokenizerMismatchError(StoreError):
    """The store's token ids come from another tokenizer than the caller's."""


class ProvenanceMismatch(StoreError):
    """The store holds a pass, split or layout made with other settings or from other rows."""


class IncompleteSection(StoreError):
    """A section that is missing or not marked complete."""
