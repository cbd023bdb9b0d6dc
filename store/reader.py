"""Reading a teacher-signal store (format in :mod:`store.format`): what it records and its sections' arrays.

:class:`StoreReader` is what every reader needs: opening with the format and
tokenizer checked, the root attributes (typed through :mod:`store.provenance`),
the layout of splits and parts, which sections are complete, and their arrays
decoded. Writing is :class:`store.teacher_store.TeacherStore`, which extends it.
Below the format, ``store.files`` (:class:`store.files.StoreFiles`) reads the
files themselves.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

import numpy as np
import zarr

from . import format as fmt
from .errors import FormatMismatch, IncompleteSection, StoreError, TokenizerMismatchError
from .files import StoreFiles, quiet_zarr
from .format import SectionRef
from .keys import ATTR, layout
from .provenance import DatasetRecord, PassRecord, TokenizerRecord, read_passes

__all__ = ["StoreReader", "read_arrays", "section_specs", "chunk_error", "failure_reason", "CRC_MISMATCH"]


class StoreReader:
    """A teacher-signal store at ``location`` (a path or an fsspec URL), for reading.

    ``mode`` is ``"r"`` here; a writer (:class:`store.teacher_store.TeacherStore`) passes ``"a"``.
    """

    def __init__(self, location: str, *, mode: str = "r", storage_options: Mapping | None = None):
        self.location = str(location)
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self.files = StoreFiles(self.location, read_only=(mode == "r"), storage_options=self.storage_options)
        self.is_local = self.files.is_local
        self._attrs_cache: dict | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, location: str, *, tokenizer_hash: str | None = None, mode: str = "r",
             storage_options: Mapping | None = None):
        """Open an existing store, refusing an unknown format or a different tokenizer."""
        store = cls(location, mode=mode, storage_options=storage_options)
        if not store.exists():
            if store.files.exists("zarr.json"):
                raise StoreError(f"{location}: zarr.json (root) is unreadable or has no format attribute: "
                                 f"the store's root metadata is damaged, or this is not a teacher-signal store")
            raise StoreError(f"{location}: no teacher-signal store here (no zarr.json with a format attribute)")
        store.check(tokenizer_hash=tokenizer_hash)
        return store

    def exists(self) -> bool:
        try:
            return "format" in self.refresh_attrs()
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError):
            return False

    def check(self, *, tokenizer_hash: str | None = None) -> None:
        attrs = self.attrs
        found = attrs.get("format", {})
        if found.get("name") != fmt.FORMAT_NAME or found.get("version") not in fmt.READABLE_VERSIONS:
            raise FormatMismatch(
                f"{self.location}: store format {found.get('name')!r} version {found.get('version')!r}; "
                f"this reader understands {fmt.FORMAT_NAME!r} version "
                f"{', '.join(str(v) for v in fmt.READABLE_VERSIONS)}"
            )
        if self.mode != "r" and found.get("version") != fmt.FORMAT_VERSION:
            raise FormatMismatch(
                f"{self.location}: store format version {found.get('version')}; this writer writes version "
                f"{fmt.FORMAT_VERSION} only ({fmt.VERSION_CHANGES.get(fmt.FORMAT_VERSION, '')}). It still "
                f"reads; to add passes, write a new store (another --out), or copy this one as version "
                f"{fmt.FORMAT_VERSION} first (store upgrade {self.location} NEW) and add them there"
            )
        if tokenizer_hash is not None:
            stored = attrs.get("tokenizer", {}).get("hash")
            if stored != tokenizer_hash:
                raise TokenizerMismatchError(
                    f"{self.location}: the store was written with tokenizer "
                    f"{attrs.get('tokenizer', {}).get('name')!r} (hash {stored}); the caller's tokenizer has "
                    f"hash {tokenizer_hash}. Token ids would not mean the same thing: use the store's "
                    f"tokenizer or recompute the store"
                )

    # -- root attributes -----------------------------------------------------

    @property
    def attrs(self) -> dict:
        """The root attributes, as last read (read once when first asked for)."""
        return self._attrs_cache if self._attrs_cache is not None else self.refresh_attrs()

    def refresh_attrs(self) -> dict:
        """Read the root attributes again (after another writer, or a file written by hand, changed them);
        reading never creates a group."""
        with quiet_zarr():
            group = zarr.open_group(self.files.zarr_store, mode="r", zarr_format=3)
        self._attrs_cache = dict(group.attrs.asdict())
        return self._attrs_cache

    # -- provenance, typed (see store.provenance) ----------------------------

    def passes(self) -> dict[str, PassRecord]:
        return read_passes(self.attrs)

    def pass_record(self, name: str) -> PassRecord | None:
        return self.passes().get(name)

    @property
    def tokenizer(self) -> TokenizerRecord:
        return TokenizerRecord.from_dict(self.attrs.get("tokenizer"))

    def dataset(self, split: str | None = None) -> DatasetRecord | None:
        """The dataset behind ``split`` (its rows' fingerprint and counts), or the store's dataset for None."""
        if split is None:
            return DatasetRecord.from_dict((self.attrs.get("provenance") or {}).get("dataset"))
        entry = self.attrs.get("layout", {}).get("splits", {}).get(split) or {}
        return DatasetRecord.from_dict(entry.get("dataset"))

    @property
    def format_version(self) -> int:
        return int(self.attrs["format"]["version"])

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.attrs["token_id_dtype"])

    # -- layout: splits and parts --------------------------------------------

    @property
    def examples_per_part(self) -> int:
        return int(self.attrs["layout"]["examples_per_part"])

    def splits(self) -> list[str]:
        return list(self.attrs["layout"]["splits"])

    def num_examples(self, split: str) -> int:
        try:
            return int(self.attrs["layout"]["splits"][split]["num_examples"])
        except KeyError:
            raise StoreError(f"{self.location}: no split {split!r}; splits: {', '.join(self.splits()) or 'none'}")

    def num_parts(self, split: str) -> int:
        n = self.num_examples(split)
        return (n + self.examples_per_part - 1) // self.examples_per_part

    def part_range(self, split: str, part: int) -> tuple[int, int]:
        start = part * self.examples_per_part
        return start, min(start + self.examples_per_part, self.num_examples(split))

    def part_of_example(self, split: str, example_index: int) -> int:
        if not 0 <= example_index < self.num_examples(split):
            raise IndexError(f"{self.location}: example {example_index} is outside split {split!r} "
                             f"(0..{self.num_examples(split) - 1})")
        return example_index // self.examples_per_part

    # -- sections ------------------------------------------------------------

    def section_attrs(self, split: str, part: int, sequence_set: str, section: str = fmt.BASE) -> dict | None:
        """A section's group attributes, or None where there is no readable group."""
        return self._attrs_of([SectionRef(split, part, sequence_set, section)])[0]

    def _attrs_of(self, refs: list[SectionRef]) -> list[dict | None]:
        """Group attributes of many sections, their ``zarr.json`` files fetched in one call (concurrently on a
        remote store: one request each, where going through zarr would probe several keys per group)."""
        paths = [f"{ref.path}/zarr.json" for ref in refs]
        fetched = self.files.read_many(paths)
        out = []
        for raw in (fetched.get(path) for path in paths):
            try:
                document = json.loads(raw) if isinstance(raw, (bytes, str)) else None
            except ValueError:
                document = None
            is_group = isinstance(document, dict) and document.get("node_type") == "group"
            out.append(dict(document.get("attributes") or {}) if is_group else None)
        return out

    def is_complete(self, split: str, part: int, sequence_set: str, section: str = fmt.BASE) -> bool:
        attrs = self.section_attrs(split, part, sequence_set, section)
        return bool(attrs and attrs.get("complete"))

    def complete_parts(self, split: str, sequence_set: str, section: str = fmt.BASE) -> list[int]:
        return [p for p in range(self.num_parts(split)) if self.is_complete(split, p, sequence_set, section)]

    def unfinished_section(self, split: str, part: int, sequence_set: str,
                           section: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """An unfinished section (``store.format`` ``"unfinished"``): its attributes and every array it records a
        checksum for, decoded; None where there is none, or where it is damaged (an array missing or with
        another checksum: what a writer then does over again)."""
        attrs = self.section_attrs(split, part, sequence_set, section)
        if not attrs or attrs.get("complete") or not attrs.get(fmt.ATTR_UNFINISHED):
            return None
        sums = attrs.get("checksums") or {}
        ref = SectionRef(split, part, sequence_set, section)
        try:
            arrays = read_arrays(self.files.zarr_store, [(ref.path, section_specs(ref, sums, self.location))],
                                 require_complete=False, location=self.location, version=self.format_version)[0]
        except (StoreError, OSError, ValueError):  # unreadable leftovers are work to redo, not a failed run
            return None
        if any(fmt.array_checksum(arrays[name]) != expected for name, expected in sums.items()):
            return None
        return attrs, arrays

    def unfinished_sections(self, splits: Iterable[str] | None = None):
        """Yield (SectionRef, attributes) of every unfinished section (``store.format`` ``"unfinished"``)."""
        for ref, attrs in self.walk_sections(splits):
            if attrs and not attrs.get("complete") and attrs.get(fmt.ATTR_UNFINISHED):
                yield ref, attrs

    def read_section(self, split: str, part: int, sequence_set: str, section: str = fmt.BASE,
                     names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays (all, or ``names``) of one complete section, decoded."""
        return self.read_sections([(split, part, sequence_set, section, names)])[0]

    def read_sections(self, requests: Iterable[tuple]) -> list[dict[str, np.ndarray]]:
        """Several :meth:`read_section` calls at once: ``(split, part, set, section[, names])`` each.

        Every array of every request is fetched and decoded concurrently in one
        trip through zarr's event loop, which saves most of zarr's per-call
        overhead on small arrays (and overlaps requests on a remote store). Same
        results and errors as calling :meth:`read_section` for each.
        """
        jobs = []
        for request in requests:
            request = tuple(request)
            split, part, sequence_set = request[:3]
            section = request[3] if len(request) > 3 else fmt.BASE
            names = request[4] if len(request) > 4 else None
            ref = SectionRef(split, part, sequence_set, section)
            jobs.append((ref.path, section_specs(ref, names, self.location)))
        return read_arrays(self.files.zarr_store, jobs, location=self.location, version=self.format_version)

    def walk_sections(self, splits: Iterable[str] | None = None,
                      sections: Iterable[str] = (fmt.BASE,) + fmt.SECTIONS,
                      sets: Iterable[str] = fmt.SEQUENCE_SETS):
        """Yield (SectionRef, group attributes or None when absent) for every place a section can be.

        Order: split, part, set, then ``sections`` in the order given (a set's base first by default).
        """
        sections, sets = tuple(sections), tuple(sets)
        for split in (self.splits() if splits is None else splits):
            refs = [SectionRef(split, part, sequence_set, section) for part in range(self.num_parts(split))
                    for sequence_set in sets for section in sections]
            yield from zip(refs, self._attrs_of(refs))  # one batched read per split

    def complete_sections(self, splits: Iterable[str] | None = None):
        """Yield (SectionRef, attributes) of every complete section, a set's sections only beside its complete base."""
        complete_bases = set()
        for ref, attrs in self.walk_sections(splits):  # a set's base comes before its sections
            if not (attrs and attrs.get("complete")):
                continue
            key = (ref.split, ref.part, ref.sequence_set)
            if ref.section == fmt.BASE:
                complete_bases.add(key)
            elif key not in complete_bases:
                continue
            yield ref, attrs

    # -- content keys (see store.keys) -----------------------------------------

    def key_layout(self) -> dict:
        """What every content key of this store shares: format version (as keys record it:
        :func:`store.format.key_format_version`), token id dtype, tokenizer hash."""
        return layout(fmt.key_format_version(self.format_version), self.attrs["token_id_dtype"], self.tokenizer.hash)

    def content_keys(self, splits: Iterable[str] | None = None) -> dict[str, str]:
        """Section path -> content key of every complete section that records one."""
        return {ref.path: attrs[ATTR] for ref, attrs in self.complete_sections(splits) if attrs.get(ATTR)}

    def nbytes_on_disk(self, prefix: str = "") -> int:
        return sum(self.files.sizes(prefix).values())


def section_specs(ref: SectionRef, names: Iterable[str] | None = None, location: str = "") -> list[fmt.ArraySpec]:
    """The format's specs of ``names`` (default: every array) of the section at ``ref``; StoreError for a name
    the format does not give that section."""
    specs = {spec.name: spec for spec in fmt.arrays_of(ref.sequence_set, ref.section)}
    if names is None:
        return list(specs.values())
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise StoreError(f"{location}: {ref.path} has no array {unknown[0]!r}")
    return [specs[name] for name in names]


def read_arrays(zarr_store, jobs: list[tuple[str, list[fmt.ArraySpec]]], *, require_complete: bool = True,
                location: str = "", version: int = fmt.FORMAT_VERSION) -> list[dict[str, np.ndarray]]:
    """Decode the arrays (given by their specs) of the groups at the given paths of ``zarr_store``, a store of
    format ``version``, all in one trip through zarr's event loop: name -> values, as
    :func:`store.format.decode_stored` gives them (named as the spec is, whatever the stored name).

    A group that is missing (or, with ``require_complete``, not marked complete)
    raises IncompleteSection; a missing array StoreError, unless its spec is
    optional (then it is left out of the result). A chunk that cannot be read or
    decoded (version 4: its crc32c differs) raises StoreError naming the chunk's
    file, ``<location>/<path>/<array>/c/<i>/0``.
    """
    import asyncio

    import zarr.api.asynchronous as zasync
    from zarr.core.sync import sync

    async def one_group(path: str, specs: list[fmt.ArraySpec]) -> dict[str, np.ndarray]:
        try:
            group = await zasync.open_group(store=zarr_store, path=path, mode="r", zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError, json.JSONDecodeError):
            group = None
        if group is None or (require_complete and not group.attrs.get("complete")):
            raise IncompleteSection(f"{location}: {path} is missing or not complete")

        async def one_array(spec: fmt.ArraySpec) -> np.ndarray | None:
            name = fmt.stored_name(spec, version)
            try:
                arr = await group.getitem(name)
            except KeyError:
                if spec.optional:
                    return None
                raise StoreError(f"{location}: {path} has no array {name!r}")
            try:
                stored = np.asarray(await arr.getitem(Ellipsis))
            except Exception as exc:  # noqa: BLE001 - a damaged chunk: find it and name it
                raise await _damaged_chunk(arr, "/".join(x for x in (location, path, name) if x), exc) from exc
            return fmt.decode_stored(spec, stored, version)

        values = await asyncio.gather(*(one_array(spec) for spec in specs))
        return {spec.name: value for spec, value in zip(specs, values) if value is not None}

    async def all_groups():
        return await asyncio.gather(*(one_group(path, specs) for path, specs in jobs))

    with quiet_zarr():
        return list(sync(all_groups()))


async def _damaged_chunk(arr, array_path: str, exc: BaseException) -> StoreError:
    """The error for an array that failed to decode, naming its first chunk that fails alone (zarr's own
    errors, a crc32c mismatch among them, name no chunk). Arrays here are chunked along rows only."""
    rows = arr.chunks[0] if arr.shape else 1
    for index in range(-(-arr.shape[0] // rows) if arr.shape and arr.shape[0] else 0):
        try:
            await arr.getitem(slice(index * rows, min((index + 1) * rows, arr.shape[0])))
        except Exception as chunk_exc:  # noqa: BLE001 - this chunk is the damaged one
            key = "/".join([str(index)] + ["0"] * (len(arr.shape) - 1))
            return StoreError(chunk_error(f"{array_path}/c/{key}", chunk_exc))
    return StoreError(f"{array_path}: cannot be read ({type(exc).__name__}: {exc}); `store verify` lists the damage")


#: what every reader says of a chunk whose crc32c does not match (zarr's own words vary and name no chunk)
CRC_MISMATCH = "its crc32c differs from its bytes"


def failure_reason(exc: BaseException) -> str:
    """Why a chunk failed to decode, in a few words: zarr's crc32c mismatch as :data:`CRC_MISMATCH`."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError) and "checksum do not match" in text:
        return CRC_MISMATCH
    return f"{type(exc).__name__}: {text or 'no message'}"


def chunk_error(chunk_path: str, exc: BaseException | str) -> str:
    """The one-line message for a chunk file that cannot be read or decoded."""
    reason = exc if isinstance(exc, str) else failure_reason(exc)
    return f"{chunk_path}: damaged chunk, cannot be decoded ({reason}); `store verify` lists all the damage"
