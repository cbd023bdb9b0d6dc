"""A store's files: the low-level API below the format, for the code that works on files and zarr nodes.

The same code serves a local path and any fsspec URL (``s3://``, ``gs://``,
``memory://``, read-only ``http://``): zarr talks to the data, fsspec answers the
questions zarr does not (does this chunk file exist, remove a half-written group).

Paths are relative to the store's root and ``/``-separated, as zarr's keys are
(``train/part-00000/pairs/zarr.json``); ``""`` is the root. A reader or writer
of the store holds one :class:`StoreFiles` as ``store.files``: ``store verify``
lists and reads files with it, the streaming reader fetches chunk files in one
request, ``store cp`` copies files, and ``store info``/``ls`` measure them.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterable, Mapping

import fsspec
import zarr

from .errors import StoreError
from .locations import is_url, redact_url

__all__ = ["StoreFiles", "quiet_zarr", "READ_ONLY_PROTOCOLS", "refuse_read_only"]

#: protocols fsspec reads but cannot write (a plain web server answers PUT with 501)
READ_ONLY_PROTOCOLS = ("http", "https")

# Format 1-3 stores' log-prob codecs come from numcodecs; zarr warns on every open that other
# zarr implementations may lack them. The format description says so once. (Format 4 uses none.)
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr.*")


@contextmanager
def quiet_zarr():
    """Silence zarr's warnings about the numcodecs codecs of format 1-3 stores (see above) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr.*")
        warnings.filterwarnings("ignore", message=".*numcodecs.zarr3.*")
        yield


def refuse_read_only(location: str) -> None:
    """StoreError naming ``location`` (without credentials) when it is a read-only kind of location (HTTP):
    what writes a store calls it before anything else, so that the refusal comes before any work."""
    protocol = str(location).split("://", 1)[0].lower() if is_url(str(location)) else ""
    if protocol in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{redact_url(str(location))}: HTTP locations are read-only (a store is read over "
                         f"HTTP, never written): write to a local path or an object store (s3://, gs://, ...), "
                         f"then serve that folder")


class StoreFiles:
    """The files under a store's root at ``location`` (a path or an fsspec URL).

    ``fs`` is the fsspec filesystem, ``root`` the root as ``fs`` names it (no trailing ``/``),
    ``zarr_store`` the zarr store over the same files (read-only with ``read_only``).
    """

    def __init__(self, location: str, *, read_only: bool = True, storage_options: Mapping | None = None):
        self.location = str(location)
        self.read_only = read_only
        if not read_only:
            refuse_read_only(self.location)
        options = dict(storage_options or {})
        if is_url(self.location):
            self.fs, root = fsspec.core.url_to_fs(self.location, **options)
            self.zarr_store = zarr.storage.FsspecStore.from_url(self.location, storage_options=options or None,
                                                                 read_only=read_only)
            self.is_local = False
        else:
            path = self.location[len("file://"):] if self.location.startswith("file://") else self.location
            self.fs = fsspec.filesystem("file")
            root = os.path.abspath(path)
            self.zarr_store = zarr.storage.LocalStore(root, read_only=read_only)
            self.is_local = True
        self.root = root.rstrip("/")

    def path(self, relative: str = "") -> str:
        """``relative`` (a path under the root) as ``fs`` names it."""
        return f"{self.root}/{relative}" if relative else self.root

    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (the whole store by default), relative to the root, sorted."""
        root = self.root + "/"
        return sorted(path[len(root):] for path in self.fs.find(self.path(prefix)) if path.startswith(root))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every file under ``prefix``: relative path -> bytes (one listing; where it gives no sizes, as a plain
        HTTP index does, the sizes are asked for all at once)."""
        base = self.path(prefix).rstrip("/")
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        unknown = [path for path, info in found.items() if info.get("size") is None]
        asked = dict(zip(unknown, self.fs.sizes(unknown))) if unknown else {}
        root = self.root + "/"
        return {path[len(root):] if path.startswith(root) else path:
                int(info["size"] if info.get("size") is not None else asked.get(path) or 0)
                for path, info in found.items()}

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def read(self, relative: str) -> bytes:
        """One file's bytes (fsspec's error where it is absent or unreadable)."""
        return self.fs.cat_file(self.path(relative))

    def read_many(self, relatives: Iterable[str]) -> dict[str, bytes | BaseException | None]:
        """Several files in one call (concurrent requests on a remote store): relative path -> its bytes, or
        the exception reading it raised (absent, unreadable), or None where fsspec returned nothing for it."""
        relatives = list(relatives)
        full = [self.path(relative) for relative in relatives]
        if len(full) > 1:
            fetched = self.fs.cat(full, on_error="return")
        else:  # fsspec's cat of one path returns its bytes or raises, not a mapping
            fetched = {path: _cat_or_error(self.fs, path) for path in full}
        return {relative: fetched.get(path) for relative, path in zip(relatives, full)}

    def write(self, relative: str, data: bytes) -> None:
        """Write one file (its folders made as needed on a local file system)."""
        self._require_writable()
        full = self.path(relative)
        if self.is_local:
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(full, data)

    def remove(self, relative: str) -> None:
        """Remove the file or the folder (with everything in it) at ``relative``."""
        self._require_writable()
        self.fs.rm(self.path(relative), recursive=True)

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.location}: opened read-only")

    def open_group(self, relative: str) -> zarr.Group | None:
        """The zarr group at ``relative``, opened read-only; None where there is no readable group."""
        with quiet_zarr():
            try:
                return zarr.open_group(self.zarr_store, path=relative, mode="r", zarr_format=3)
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError):
                return None

    def open_array(self, relative: str) -> zarr.Array:
        """The zarr array at ``relative``, opened read-only (its group's metadata is not needed)."""
        with quiet_zarr():
            return zarr.open_array(self.zarr_store, path=relative, mode="r")

    @staticmethod
    def chunk_keys(array_path: str, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[str]:
        """The chunk files of the array at ``array_path`` (zarr's default chunk key encoding, ``/``)."""
        grid = [max(1, -(-s // c)) if s else 0 for s, c in zip(shape, chunks)]
        keys = [()]
        for n in grid:
            keys = [k + (i,) for k in keys for i in range(n)]
        return [f"{array_path}/c/" + "/".join(str(i) for i in k) for k in keys if len(k) == len(shape)]


def _cat_or_error(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - absent or unreadable: the caller treats both as no file
        return exc
