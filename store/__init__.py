"""The teacher-signal store: a chunked Zarr v3 hierarchy (format in :mod:`store.format`).

This package knows nothing of models or training; ``precompute`` writes stores
and ``train`` reads them, both through the classes exported here.
"""

from . import format
from .errors import FormatMismatch, IncompleteSection, ProvenanceMismatch, StoreError, TokenizerMismatchError
from .format import array_checksum
from .provenance import DatasetRecord, ModelRecord, PassRecord, TokenizerRecord
from .reader import StoreReader
from .stream import Example, ExampleReader, ExampleStream, Sequence, check_complete, load_part
from .teacher_store import TeacherStore

__all__ = [
    "format", "Example", "ExampleReader", "ExampleStream", "Sequence", "check_complete", "load_part",
    "FormatMismatch", "IncompleteSection", "ProvenanceMismatch", "StoreError", "StoreReader", "TeacherStore",
    "TokenizerMismatchError", "array_checksum", "DatasetRecord", "ModelRecord", "PassRecord", "TokenizerRecord",
]
