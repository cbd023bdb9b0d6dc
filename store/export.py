"""Export a store to one HDF5 file, for tools that read HDF5 and not Zarr.

The HDF5 file mirrors the store: groups ``<split>/part-NNNNN/<set>[/<section>]``
with the same attributes and one dataset per array, every array decoded (token
ids as integers, log-probs as float32), gzip-compressed. Only complete sections
are exported (a set's sections only when its base arrays are complete), each
array checked against its recorded checksum first (format 4 stores' chunks
are checked on read too; this also catches a damaged format 1-3 chunk that
still decodes, and a missing chunk file, which zarr reads as zeros).
Attributes that are not scalars (mappings, lists) are stored as JSON strings;
the root attribute ``json_attributes`` says so.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from . import format as fmt
from .errors import StoreError
from .format import array_checksum
from .locations import redact_url
from .reader import StoreReader

__all__ = ["export_hdf5", "encode_attr", "decode_attr"]

JSON_NOTE = "attributes that are mappings or lists are JSON strings; decode with json.loads"


def encode_attr(value: Any):
    """An HDF5-storable form of an attribute value: scalars as they are, the rest as JSON."""
    if value is None:
        return json.dumps(None)
    if isinstance(value, (bool, int, float, str, np.generic)):
        return value
    return json.dumps(value, sort_keys=True)


def decode_attr(value: Any):
    """Inverse of :func:`encode_attr` for values read back with h5py."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and (value[:1] in ("{", "[") or value == "null"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _put_attrs(obj, attrs: Mapping) -> None:
    for key, value in attrs.items():
        obj.attrs[str(key)] = encode_attr(value)


def _dataset(group, name: str, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "f" and values.dtype != np.float32 and values.dtype.itemsize < 4:
        values = values.astype(np.float32)
    if values.size == 0:
        group.create_dataset(name, data=values)
        return
    # chunks of about 1 MB along the first axis, whole rows
    row_bytes = max(1, values.nbytes // max(1, values.shape[0]))
    rows = int(max(1, min(values.shape[0], (1 << 20) // row_bytes)))
    group.create_dataset(name, data=values, chunks=(rows,) + values.shape[1:],
                         compression="gzip", compression_opts=4, shuffle=values.dtype.itemsize > 1)


def export_hdf5(store: StoreReader, out_path: str, *,
                progress: Callable[[str], None] | None = None) -> dict:
    """Write every complete section of ``store`` to the HDF5 file ``out_path``.

    The file is written beside ``out_path`` under a temporary name and renamed
    when done, so a killed export never leaves a file that looks whole. Returns
    ``{"sections": n, "arrays": m, "bytes": size of the file}``.
    """
    import h5py

    out_path = os.fspath(out_path)
    tmp = f"{out_path}.partial-{os.getpid()}"
    sections = arrays = 0
    try:
        with h5py.File(tmp, "w") as h5:
            _put_attrs(h5, store.attrs)
            h5.attrs["json_attributes"] = JSON_NOTE
            h5.attrs["exported_from"] = redact_url(store.location)  # a file handed on: no credentials
            for split in store.splits():
                h5.require_group(split)
            for ref, attrs in store.complete_sections():
                part_name = f"{ref.split}/{fmt.part_name(ref.part)}"
                if part_name not in h5:
                    start, stop = store.part_range(ref.split, ref.part)
                    _put_attrs(h5.require_group(part_name), {"example_start": start, "example_stop": stop})
                if progress:
                    progress(ref.path)
                target = h5.require_group(ref.path)
                _put_attrs(target, attrs)
                recorded = attrs.get("checksums") or {}
                for name, array in store.read_section(ref.split, ref.part, ref.sequence_set, ref.section).items():
                    if name in recorded and array_checksum(array) != recorded[name]:
                        raise StoreError(f"{store.location}: {ref.path}/{name}: its values differ from their "
                                         f"recorded checksum; `store verify` lists the damage")
                    _dataset(target, name, array)
                    arrays += 1
                sections += 1
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"sections": sections, "arrays": arrays, "bytes": os.path.getsize(out_path)}
