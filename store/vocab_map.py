"""The vocabulary map of a cross-tokenizer store: one root group, written once, read and verified.

A store whose teacher sections were aligned across tokenizers (:data:`store.format.DESCRIPTION`
``"cross_tokenizer"``) holds at its root the group ``vocab_map`` with one array,
``teacher_to_student`` (:data:`store.format.VOCAB_MAP_ARRAY`), and the root attribute
``cross_tokenizer`` recording both tokenizers, the alignment rule and the map's sha256 (of its
little-endian int32 values). :func:`write_vocab_map` writes the array first and the record last;
:func:`read_vocab_map` reads it back, :func:`verify_vocab_map` checks it against the record
(``store verify``), and ``store cp`` copies the group's files (:func:`vocab_map_files`).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import zarr

from . import format as fmt
from .errors import ProvenanceMismatch, StoreError
from .files import quiet_zarr

__all__ = ["map_sha256", "cross_tokenizer_record", "read_vocab_map", "write_vocab_map", "verify_vocab_map",
           "vocab_map_files"]

_PATH = f"{fmt.GROUP_VOCAB_MAP}/{fmt.VOCAB_MAP_TEACHER_TO_STUDENT}"


def map_sha256(values: np.ndarray) -> str:
    """sha256 of the map's little-endian int32 values."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i4").tobytes()).hexdigest()


def cross_tokenizer_record(store) -> dict | None:
    """The root attribute ``cross_tokenizer`` of ``store`` (None: a store of one tokenizer)."""
    record = store.attrs.get(fmt.ATTR_CROSS_TOKENIZER)
    return dict(record) if isinstance(record, Mapping) else None


def read_vocab_map(store) -> np.ndarray:
    """The store's ``teacher_to_student`` map, int32 (StoreError where it is missing or unreadable)."""
    try:
        with quiet_zarr():
            return np.asarray(zarr.open_array(store.files.zarr_store, path=_PATH, mode="r")[...], dtype=np.int32)
    except Exception as exc:  # noqa: BLE001 - a missing or damaged array: one line naming it
        raise StoreError(f"{store.location}: {_PATH} cannot be read ({type(exc).__name__}: {exc})") from exc


def write_vocab_map(store, values: np.ndarray, record: Mapping) -> None:
    """Write the map and record ``cross_tokenizer`` (``record`` plus the map's path, sha256 and counts).

    A store that records a map already keeps it when the sha256 is the same, and refuses another map
    (another teacher or student tokenizer) naming both records' tokenizers.
    """
    values = np.asarray(values, dtype=np.int32)
    full = {**dict(record), "vocab_map": {"path": _PATH, "sha256": map_sha256(values),
                                          "teacher_ids": int(values.shape[0]), "mapped": int((values >= 0).sum())}}
    old = cross_tokenizer_record(store)
    if old is not None:
        if (old.get("vocab_map") or {}).get("sha256") == full["vocab_map"]["sha256"]:
            return
        raise ProvenanceMismatch(
            f"{store.location}: its teacher signals were aligned from teacher tokenizer "
            f"{(old.get('teacher_tokenizer') or {}).get('name')!r} (hash {(old.get('teacher_tokenizer') or {}).get('hash')}) "
            f"to student tokenizer {(old.get('student_tokenizer') or {}).get('name')!r}; this run aligns from "
            f"{(full.get('teacher_tokenizer') or {}).get('name')!r} (hash {(full.get('teacher_tokenizer') or {}).get('hash')}), "
            f"another vocabulary map. A store holds one teacher tokenizer: write to another --out")
    spec = fmt.VOCAB_MAP_ARRAY
    dtype = np.dtype(spec.dtype)
    with quiet_zarr():
        group = zarr.open_group(store.files.zarr_store, path=fmt.GROUP_VOCAB_MAP, mode="a", zarr_format=3)
        array = group.create_array(spec.name, shape=values.shape, dtype=dtype, overwrite=True,
                                   chunks=(fmt.chunk_rows(spec.axis, values.shape[0]),), fill_value=-1,
                                   **fmt.codecs_for(spec, dtype))
        array[...] = values
        group.attrs.put({"checksum": fmt.array_checksum(values), "description": spec.description})
    back = read_vocab_map(store)
    if map_sha256(back) != full["vocab_map"]["sha256"]:
        raise StoreError(f"{store.location}: {_PATH} reads back other values than were written")
    store.update_attrs(lambda attrs: attrs.__setitem__(fmt.ATTR_CROSS_TOKENIZER, full))


def verify_vocab_map(store) -> list[str]:
    """``store verify``'s lines for the map: missing, unreadable, or another sha256 than the record's."""
    record = cross_tokenizer_record(store)
    if record is None:
        return []
    expected = (record.get("vocab_map") or {}).get("sha256")
    try:
        values = read_vocab_map(store)
    except StoreError as exc:
        return [str(exc).split(": ", 1)[-1]]
    if map_sha256(values) != expected:
        return [f"{_PATH}: sha256 differs from the root's {fmt.ATTR_CROSS_TOKENIZER} record (recorded "
                f"{str(expected)[:12]}, now {map_sha256(values)[:12]})"]
    return []


def vocab_map_files(relative_files) -> list[str]:
    """The files of the ``vocab_map`` group among a store's files (relative paths): what ``store cp`` copies."""
    prefix = fmt.GROUP_VOCAB_MAP + "/"
    return [f for f in relative_files if f.startswith(prefix)]
