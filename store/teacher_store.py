"""Opening, writing and reading a teacher-signal store (format in :mod:`store.format`).

The same code serves a local path and any fsspec URL (``s3://``, ``gs://``,
``memory://``, read-only ``http://``): zarr talks to the data, fsspec answers the
questions zarr does not (does this chunk file exist, remove a half-written group).

Writing is by parts. A part's section is written once: arrays first, then (local
filesystems) every file is fsynced, then each array is read back and hashed, and
only then is ``complete: true`` written with the hashes into the section's group
attributes. A writer killed at any moment leaves either a complete section or one
that is not marked complete, which the next run deletes and writes again. Writers
of different parts never touch the same file, so processes can share a store.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping

import fsspec
import numpy as np
import zarr

from . import format as fmt
from .format import SectionRef, array_checksum
from .provenance import DatasetRecord, PassRecord, TokenizerRecord, read_passes

# Our log-prob codecs come from numcodecs; zarr warns on every open that other
# zarr implementations may lack them. The format description says so once.
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr.*")

__all__ = [
    "StoreError",
    "FormatMismatch",
    "TokenizerMismatchError",
    "ProvenanceMismatch",
    "IncompleteSection",
    "TeacherStore",
    "package_version",
]


class StoreError(Exception):
    """Anything wrong with a store; the message names the store and what is wrong."""


class FormatMismatch(StoreError):
    pass


class TokenizerMismatchError(StoreError):
    pass


class ProvenanceMismatch(StoreError):
    pass


class IncompleteSection(StoreError):
    pass


#: a local writer builds sections in ``<store><STAGING_SUFFIX>/`` and renames them into place
STAGING_SUFFIX = ".partial"

# what identifies the rows behind a split (other dataset keys are counts of a run)
IDENTITY_KEYS = ("name", "revision", "kind", "fingerprint")


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("distill-cache")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr.*")
        warnings.filterwarnings("ignore", message=".*numcodecs.zarr3.*")
        yield


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class TeacherStore:
    """A teacher-signal store at ``location`` (a path or an fsspec URL)."""

    def __init__(self, location: str, *, mode: str = "r", storage_options: Mapping | None = None):
        self.location = str(location)
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        if _is_url(self.location):
            self.fs, self._root = fsspec.core.url_to_fs(self.location, **self.storage_options)
            self._zstore = zarr.storage.FsspecStore.from_url(
                self.location, storage_options=self.storage_options or None, read_only=(mode == "r")
            )
            self.is_local = False
        else:
            path = self.location[len("file://"):] if self.location.startswith("file://") else self.location
            self.fs = fsspec.filesystem("file")
            self._root = os.path.abspath(path)
            self._zstore = zarr.storage.LocalStore(self._root, read_only=(mode == "r"))
            self.is_local = True
        self._root = self._root.rstrip("/")
        self._root_group: zarr.Group | None = None
        self._attrs_cache: dict | None = None

    # -- opening -------------------------------------------------------------

    @classmethod
    def create(cls, location: str, *, tokenizer: Mapping, vocab_size: int, examples_per_part: int,
               storage_options: Mapping | None = None, provenance: Mapping | None = None) -> "TeacherStore":
        """Create a store, or open an existing one for writing after checking it matches.

        ``tokenizer`` is ``{"name": ..., "hash": ...}``. An existing store with
        another format version, tokenizer or part size is refused.
        """
        store = cls(location, mode="a", storage_options=storage_options)
        if not store.exists():
            store._refuse_foreign_location()
            attributes = {
                "format": {"name": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION},
                "format_description": fmt.DESCRIPTION,
                "created_with": {"package": "distill-cache", "version": package_version(),
                                 "zarr": zarr.__version__},
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tokenizer": dict(tokenizer),
                "vocab_size": int(vocab_size),
                "token_id_dtype": fmt.token_id_dtype(vocab_size).name,
                "layout": {"examples_per_part": int(examples_per_part), "splits": {}},
                "provenance": dict(provenance or {}),
                "passes": {},
                "manifest": {},
            }
            try:
                with _quiet():  # one write: the root's metadata and attributes together
                    zarr.create_group(store._zstore, attributes=attributes, zarr_format=3)
            except zarr.errors.ContainsGroupError:
                # another writer created it meanwhile (checked below), or a killed creation left a bare group
                if not store.exists():
                    with _quiet():
                        zarr.open_group(store._zstore, mode="a", zarr_format=3).attrs.put(attributes)
            except OSError as exc:
                raise StoreError(f"{store.location}: cannot create a store here "
                                 f"({exc.strerror or exc})") from exc
            store._root_group = None
            store._attrs_cache = None
        store.check(tokenizer_hash=tokenizer.get("hash"))
        store.clean_leftovers()
        layout = store.attrs["layout"]
        if layout["examples_per_part"] != examples_per_part:
            raise ProvenanceMismatch(
                f"{store.location}: written with {layout['examples_per_part']} examples per part, "
                f"asked for {examples_per_part}; use the same --examples-per-part or another --out"
            )
        return store

    def _refuse_foreign_location(self) -> None:
        """Refuse to create a store where a file, or a folder holding other things, already is."""
        try:
            if self.fs.isfile(self._root):
                raise StoreError(f"{self.location}: is a file, not a store; choose a folder path for --out")
            entries = [e for e in self.fs.ls(self._root, detail=False)
                       if e.rstrip("/").rsplit("/", 1)[-1] != "zarr.json"] if self.fs.isdir(self._root) else []
        except (FileNotFoundError, NotADirectoryError):
            return
        except PermissionError as exc:
            raise StoreError(f"{self.location}: cannot read this location ({exc})") from exc
        if entries:
            shown = ", ".join(e.rstrip("/").rsplit("/", 1)[-1] for e in sorted(entries)[:3])
            raise StoreError(f"{self.location}: a folder that holds other things ({shown}"
                             f"{', ...' if len(entries) > 3 else ''}) and is not a teacher-signal store; "
                             f"choose a new or empty folder for --out")

    @classmethod
    def open(cls, location: str, *, tokenizer_hash: str | None = None, mode: str = "r",
             storage_options: Mapping | None = None) -> "TeacherStore":
        """Open an existing store, refusing an unknown format or a different tokenizer."""
        store = cls(location, mode=mode, storage_options=storage_options)
        if not store.exists():
            root_meta = f"{store._root}/zarr.json"
            if store.fs.exists(root_meta):
                raise StoreError(f"{location}: zarr.json (root) is unreadable or has no format attribute: "
                                 f"the store's root metadata is damaged, or this is not a teacher-signal store")
            raise StoreError(f"{location}: no teacher-signal store here (no zarr.json with a format attribute)")
        store.check(tokenizer_hash=tokenizer_hash)
        return store

    def exists(self) -> bool:
        try:
            return "format" in self._load_attrs(refresh=True)
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
                f"reads; to add passes, write a new store (another --out)"
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
    def root(self) -> zarr.Group:
        """The root group, opened for writing in a writable store (it must exist: see :meth:`create`)."""
        if self._root_group is None:
            with _quiet():
                self._root_group = zarr.open_group(self._zstore, mode="r" if self.mode == "r" else "r+",
                                                   zarr_format=3)
        return self._root_group

    def _load_attrs(self, refresh: bool = False) -> dict:
        """The root attributes, read without writing anything (opening never creates a group)."""
        if refresh or self._attrs_cache is None:
            self._root_group = None
            with _quiet():
                group = zarr.open_group(self._zstore, mode="r", zarr_format=3)
            self._attrs_cache = dict(group.attrs.asdict())
        return self._attrs_cache

    @property
    def attrs(self) -> dict:
        return self._load_attrs()

    def update_attrs(self, mutate: Callable[[dict], None], *, retries: int = 20) -> dict:
        """Read-modify-write the root attributes; re-reads to survive a concurrent writer."""
        self._require_writable()
        for attempt in range(retries):
            current = self._load_attrs(refresh=True)
            before = json.dumps(current, sort_keys=True)
            mutate(current)
            if json.dumps(current, sort_keys=True) == before:
                return current  # nothing changes: write nothing (a finished store may be read-only)
            self.root.attrs.put(current)
            check = self._load_attrs(refresh=True)
            if json.dumps(check, sort_keys=True) == json.dumps(current, sort_keys=True):
                return check
            time.sleep(0.05 * (attempt + 1))
        raise StoreError(f"{self.location}: could not update root attributes (concurrent writers)")

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

    def set_split(self, split: str, num_examples: int, *, dataset: Mapping | None = None) -> None:
        """Declare a split's size and where its rows came from; refuses other rows.

        ``dataset`` keys in :data:`IDENTITY_KEYS` (name, revision, fingerprint)
        must match what the store holds; other keys (counts of a run) are merged.
        Keys other writers put on the split entry are kept.
        """

        def mutate(attrs):
            splits = attrs["layout"]["splits"]
            old = dict(splits.get(split) or {})
            if old and old["num_examples"] != num_examples:
                raise ProvenanceMismatch(
                    f"{self.location}: split {split!r} has {old['num_examples']} examples, "
                    f"this run has {num_examples}"
                )
            stored = dict(old.get("dataset") or {})
            if dataset is not None:
                mine = {k: v for k, v in dict(dataset).items() if k in IDENTITY_KEYS}
                theirs = {k: v for k, v in stored.items() if k in IDENTITY_KEYS}
                if theirs and mine != theirs:
                    raise ProvenanceMismatch(f"{self.location}: split {split!r} was made from other rows: "
                                             f"{_diff_keys(theirs, mine)}")
                stored.update(dict(dataset))
            splits[split] = {**old, "num_examples": int(num_examples), "dataset": stored or None}

        self.update_attrs(mutate)

    def pass_conflict(self, name: str, provenance: Mapping) -> str | None:
        """What differs between ``provenance`` and the record of pass ``name`` in the store (None: nothing).

        Models are compared by the sha256 of their weights, not by name or path:
        the same weights in another folder are the same model.
        """
        old = self.attrs["passes"].get(name)
        if old is None:
            return None
        new = json.loads(json.dumps(dict(provenance)))
        return _diff_keys(_without_model_names(old), _without_model_names(new)) or None

    def register_pass(self, name: str, provenance: Mapping, *, may_replace: bool = False) -> None:
        """Record what a pass depends on; refuse it if the store holds the pass with other settings.

        ``may_replace``: the caller knows that nothing the old record describes was
        written (no part of the pass is complete), so other settings replace it.
        """
        provenance = json.loads(json.dumps(dict(provenance)))

        def mutate(attrs):
            old = attrs["passes"].get(name)
            if old is not None and not may_replace:
                diff = _diff_keys(_without_model_names(old), _without_model_names(provenance))
                if diff:
                    raise ProvenanceMismatch(
                        f"{self.location}: pass {name!r} is already in this store with other settings: "
                        f"{diff}. Write to another --out, or delete the store")
                return  # the same pass: keep the record (and the model name) as first written
            attrs["passes"][name] = provenance

        self.update_attrs(mutate)

    # -- sections ------------------------------------------------------------

    def _require_writable(self):
        if self.mode == "r":
            raise StoreError(f"{self.location}: opened read-only")

    def _group(self, ref: SectionRef) -> zarr.Group | None:
        with _quiet():
            try:
                return zarr.open_group(self._zstore, path=ref.path, mode="r", zarr_format=3)
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError, json.JSONDecodeError):
                return None

    def section_attrs(self, split: str, part: int, sequence_set: str, section: str = fmt.BASE) -> dict | None:
        """A section's group attributes, or None where there is no readable group."""
        return self._attrs_of([SectionRef(split, part, sequence_set, section)])[0]

    def _attrs_of(self, refs: list[SectionRef]) -> list[dict | None]:
        """Group attributes of many sections, their ``zarr.json`` files fetched in one call (concurrently on a
        remote store: one request each, where going through zarr would probe several keys per group)."""
        if not refs:
            return []
        paths = [f"{self._root}/{ref.path}/zarr.json" for ref in refs]
        fetched = self.fs.cat(paths, on_error="return") if len(paths) > 1 else {paths[0]: _cat_or_error(self.fs,
                                                                                                       paths[0])}
        out = []
        for path in paths:
            raw = fetched.get(path)
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

    def write_section(self, split: str, part: int, sequence_set: str, section: str,
                      arrays: Mapping[str, np.ndarray], attrs: Mapping | None = None) -> dict | None:
        """Write one section of one part, atomically as far as readers are concerned.

        ``arrays`` must hold exactly the arrays :mod:`store.format` declares for
        this set and section, with consistent lengths. Returns the checksums, or
        None when the section was already complete (another writer finished it:
        writers of one store compute the same numbers, so the first one stays).

        On a local file system the section is built beside the store and renamed
        into place complete, so independent processes can write one store at
        once; on a remote store it is written in place and marked complete last.
        """
        self._require_writable()
        ref = SectionRef(split, part, sequence_set, section)
        specs = fmt.arrays_of(sequence_set, section)
        rows = _check_arrays(ref, specs, arrays)
        if section == fmt.BASE:
            # the response axis has no base array of its own: record its length so that
            # sections with response rows are checked against it
            rows[fmt.AXIS_RESPONSE] = _check_offsets(ref, arrays)
        else:
            base_attrs = self.section_attrs(split, part, sequence_set, fmt.BASE)
            if not (base_attrs and base_attrs.get("complete")):
                raise IncompleteSection(f"{self.location}: {ref} needs its set's base arrays written first")
            for axis, n in rows.items():
                expected = base_attrs.get("rows", {}).get(axis)
                if expected is not None and expected != n:
                    raise StoreError(f"{ref}: {n} rows along the {axis} axis, the set has {expected}")
        # every value checked and converted before anything touches the store
        prepared = []
        for spec in specs:
            if spec.optional and spec.name not in arrays:
                continue  # the format says what a reader does without it
            dtype = self.token_dtype if spec.dtype == "token_id" else np.dtype(spec.dtype)
            values = fmt.prepare_values(spec, np.asarray(arrays[spec.name]))
            if values.size and spec.dtype == "token_id" and (values.min() < 0 or values.max() >= self.attrs["vocab_size"]):
                raise StoreError(f"{ref}/{spec.name}: token ids outside the vocabulary "
                                 f"[0, {self.attrs['vocab_size']})")
            values = values.astype(dtype, copy=False)
            chunks = (fmt.chunk_rows(spec.axis, values.shape[0]),) + values.shape[1:]
            prepared.append((spec, dtype, values, chunks))
        if self.is_complete(split, part, sequence_set, section):
            return None  # another writer finished it meanwhile: the same numbers are there already
        start, stop = self.part_range(split, part)
        names = [spec.name for spec, *_rest in prepared]
        final_attrs = {**dict(attrs or {}), "rows": rows, "example_start": start, "example_stop": stop}
        self.ensure_part_group(split, part)
        if not self.is_local:
            return self._write_in_place(ref, prepared, names, final_attrs)
        staging = self._staging_dir() / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            checksums = _write_group(zarr.storage.LocalStore(str(staging)), "", prepared, names, final_attrs)
            _fsync_tree(str(staging))
            return checksums if self._move_into_place(ref, staging) else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def ensure_part_group(self, split: str, part: int) -> None:
        """The part's group (and its split's), with the example range; other writers may make it at the
        same instant."""
        start, stop = self.part_range(split, part)
        with _quiet():
            group = _open_or_create_group(self._zstore, f"{split}/{fmt.part_name(part)}")
            if "example_start" not in group.attrs:
                group.attrs.update({"example_start": start, "example_stop": stop})

    def _write_in_place(self, ref: SectionRef, prepared: list, names: list[str], final_attrs: dict) -> dict:
        """Remote stores (no rename): write where the section belongs, marking it complete last."""
        if self._group(ref) is not None or self.fs.exists(f"{self._root}/{ref.path}"):
            self.fs.rm(f"{self._root}/{ref.path}", recursive=True)  # a killed writer's leftover, whole
        return _write_group(self._zstore, ref.path, prepared, names, final_attrs)

    def _staging_dir(self) -> Path:
        """Where a local writer builds a section before renaming it into place: beside the store, not in it.

        Outside the hierarchy, so that plain zarr never lists a half-written group;
        on the same file system, so that the rename is atomic.
        """
        path = Path(f"{self._root}{STAGING_SUFFIX}")
        path.mkdir(exist_ok=True)
        return path

    def _move_into_place(self, ref: SectionRef, staging: Path) -> bool:
        """Rename a complete staged section to its place; False when another writer's complete one is there."""
        target = Path(self._root) / ref.path
        if target.exists() and not self.is_complete(ref.split, ref.part, ref.sequence_set, ref.section):
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of an in-place writer
        try:
            os.rename(staging, target)
        except OSError:  # the target appeared meanwhile (ENOTEMPTY, EEXIST)
            if self.is_complete(ref.split, ref.part, ref.sequence_set, ref.section):
                return False
            raise
        _fsync_file(str(target.parent))
        return True

    def clean_leftovers(self, older_than_s: float = 600.0) -> int:
        """Remove what killed local writers left: their staging folders and zarr's ``*.partial`` files.

        A staging folder of a process of this host that is no longer running goes at
        once; anything else only when older than ``older_than_s`` (another host's
        writer may still be at work). Returns the number of entries removed.
        """
        if not self.is_local:
            return 0
        removed, now, host = 0, time.time(), socket.gethostname()
        staging = Path(f"{self._root}{STAGING_SUFFIX}")
        for entry in (staging.iterdir() if staging.is_dir() else ()):
            owner_host, _, rest = entry.name.rpartition("-")[0].rpartition("-")
            pid = int(rest) if rest.isdigit() else None
            dead = owner_host == host and pid is not None and not _pid_alive(pid)
            if dead or now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        for directory, _dirs, files in os.walk(self._root):
            for name in files:
                path = os.path.join(directory, name)
                if name.endswith(".partial") and now - os.stat(path).st_mtime > older_than_s:
                    try:
                        os.unlink(path)
                        removed += 1
                    except OSError:  # a read-only store: leave it to a writer
                        pass
        try:
            staging.rmdir()  # only when empty: nothing beside the store once every writer is done
        except OSError:
            pass
        return removed

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
            jobs.append((SectionRef(split, part, sequence_set, section),
                         list(names) if names is not None
                         else [s.name for s in fmt.arrays_of(sequence_set, section)]))
        # an optional array (store.format) that a section lacks is left out of what is returned
        optional = {s.name for specs in fmt.SECTION_ARRAYS.values() for s in specs if s.optional}
        return _read_groups(self._zstore, [(ref.path, names) for ref, names in jobs], location=self.location,
                            optional=optional)

    # -- manifest, verification, information ---------------------------------

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

    def refresh_manifest(self) -> dict:
        """Copy every complete section's checksums into the root attributes (and its content key, where it
        records one, into ``content_keys``: what a catalog reads to find sections by key in one request)."""
        from .keys import ATTR

        complete = list(self.complete_sections())
        manifest = {ref.path: attrs["checksums"] for ref, attrs in complete}
        content_keys = {ref.path: attrs[ATTR] for ref, attrs in complete if attrs.get(ATTR)}

        def mutate(root_attrs):
            root_attrs["manifest"] = manifest
            if content_keys or "content_keys" in root_attrs:
                root_attrs["content_keys"] = content_keys

        self.update_attrs(mutate)
        return manifest

    # -- content keys (see store.keys) -----------------------------------------

    def key_layout(self) -> dict:
        """What every content key of this store shares: format version, token id dtype, tokenizer hash."""
        from .keys import layout

        return layout(self.format_version, self.attrs["token_id_dtype"], self.tokenizer.hash)

    def content_keys(self, splits: Iterable[str] | None = None) -> dict[str, str]:
        """Section path -> content key of every complete section that records one."""
        from .keys import ATTR

        return {ref.path: attrs[ATTR] for ref, attrs in self.complete_sections(splits) if attrs.get(ATTR)}

    def chunk_keys(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[str]:
        grid = [max(1, -(-s // c)) if s else 0 for s, c in zip(shape, chunks)]
        keys = [()]
        for n in grid:
            keys = [k + (i,) for k in keys for i in range(n)]
        return [f"{path}/c/" + "/".join(str(i) for i in k) for k in keys if len(k) == len(shape)]

    def verify(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Every damage of the store, one line each (empty when intact): see :mod:`store.verify`."""
        from .verify import verify_store

        return verify_store(self, progress)

    def file_sizes(self, prefix: str = "") -> dict[str, int]:
        """Every file under ``prefix``: path relative to the store -> bytes (one listing; where it gives no
        sizes, as a plain HTTP index does, the sizes are asked for all at once)."""
        base = f"{self._root}/{prefix}".rstrip("/")
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, detail=True)
        unknown = [path for path, info in found.items() if info.get("size") is None]
        asked = dict(zip(unknown, self.fs.sizes(unknown))) if unknown else {}
        root = self._root.rstrip("/") + "/"
        return {path[len(root):] if path.startswith(root) else path:
                int(info["size"] if info.get("size") is not None else asked.get(path) or 0)
                for path, info in found.items()}

    def nbytes_on_disk(self, prefix: str = "") -> int:
        return sum(self.file_sizes(prefix).values())


def _cat_or_error(fs, path: str):
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - absent or unreadable: the caller treats both as no group
        return exc


def _open_or_create_group(zstore, path: str, tries: int = 5):
    """The group at ``path``, created when absent. Independent writers of one store may create the same
    part group at the same instant: the one that loses the race opens the winner's group."""
    for attempt in range(tries):
        try:
            return zarr.open_group(zstore, path=path, mode="a", zarr_format=3)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            if attempt == tries - 1:
                raise
            time.sleep(0.05 * (attempt + 1))  # the winner's metadata is being written: open it next time
    raise AssertionError("unreachable")


def _write_group(zstore, path: str, prepared: list, names: list[str], final_attrs: dict) -> dict:
    """Create a group at ``path`` of ``zstore``, write its arrays, read them back, hash them, then mark it
    complete (the attributes are the last write). Returns the checksums."""
    with _quiet():
        group = zarr.open_group(zstore, path=path, mode="w", zarr_format=3)
        group.attrs.put({"complete": False})
        _write_arrays(zstore, path, prepared)
        if isinstance(zstore, zarr.storage.LocalStore):
            _fsync_tree(os.path.join(str(zstore.root), path))
        reread = _read_groups(zstore, [(path, names)], require_complete=False)[0]
        checksums = {name: array_checksum(values) for name, values in reread.items()}
        group.attrs.put({**final_attrs, "complete": True, "checksums": checksums,
                         "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return checksums


def _write_arrays(zstore, path: str, prepared: list) -> None:
    """Create and fill a group's arrays concurrently (one trip through zarr's event loop)."""
    import asyncio

    import zarr.api.asynchronous as zasync
    from zarr.core.sync import sync

    async def write_all():
        group = await zasync.open_group(store=zstore, path=path, mode="r+", zarr_format=3)

        async def one(spec, dtype, values, chunks):
            arr = await group.create_array(spec.name, shape=values.shape, chunks=chunks, dtype=dtype,
                                           fill_value=0, config={"write_empty_chunks": True},
                                           **fmt.codecs_for(spec, dtype))
            if values.size:
                await arr.setitem(Ellipsis, values)

        await asyncio.gather(*(one(*item) for item in prepared))

    with _quiet():
        sync(write_all())


def _read_groups(zstore, jobs: list[tuple[str, list[str]]], *, require_complete: bool = True,
                 location: str = "", optional: frozenset | set = frozenset()) -> list[dict[str, np.ndarray]]:
    """Decode the named arrays of the groups at the given paths, all in one trip through zarr's event loop.

    A group that is missing (or, with ``require_complete``, not marked complete)
    raises IncompleteSection; a missing array StoreError, unless its name is in
    ``optional`` (then it is left out of the result).
    """
    import asyncio

    import zarr.api.asynchronous as zasync
    from zarr.core.sync import sync

    async def one_group(path: str, names: list[str]) -> dict[str, np.ndarray]:
        try:
            group = await zasync.open_group(store=zstore, path=path, mode="r", zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError, json.JSONDecodeError):
            group = None
        if group is None or (require_complete and not group.attrs.get("complete")):
            raise IncompleteSection(f"{location}: {path} is missing or not complete")

        async def one_array(name: str) -> np.ndarray | None:
            try:
                arr = await group.getitem(name)
            except KeyError:
                if name in optional:
                    return None
                raise StoreError(f"{location}: {path} has no array {name!r}")
            return np.asarray(await arr.getitem(Ellipsis))

        values = await asyncio.gather(*(one_array(n) for n in names))
        return {name: value for name, value in zip(names, values) if value is not None}

    async def all_groups():
        return await asyncio.gather(*(one_group(path, names) for path, names in jobs))

    with _quiet():
        return list(sync(all_groups()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _without_model_names(provenance: Mapping) -> dict:
    """A pass record with its model's name left out (a model is its weights' sha256)."""
    out = dict(provenance)
    if isinstance(out.get("model"), Mapping):
        out["model"] = {k: v for k, v in out["model"].items() if k != "name"}
    return out


def _diff_keys(old: Mapping, new: Mapping, prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            inner = _diff_keys(a, b, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key}: stored {a!r}, asked {b!r}")
    return "; ".join(diffs)


def _check_arrays(ref: SectionRef, specs, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    names = {s.name for s in specs}
    missing = set(fmt.required_names(specs)) - set(arrays)
    extra = set(arrays) - names
    if missing or extra:
        raise StoreError(f"{ref}: arrays {sorted(missing)} missing, {sorted(extra)} not in the format")
    lengths: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name not in arrays:
            continue  # an optional array left out
        values = np.asarray(arrays[spec.name])
        ndim = 1 if spec.width is None else 2
        if values.ndim != ndim:
            raise StoreError(f"{ref}/{spec.name}: expected {ndim}-D, got shape {values.shape}")
        axis = spec.axis
        n = values.shape[0]
        if axis.endswith("+1"):
            axis, n = axis[:-2], n - 1
        if axis in lengths and lengths[axis][0] != n:
            raise StoreError(f"{ref}/{spec.name}: {n} rows along the {axis} axis, "
                             f"but {lengths[axis][1]} has {lengths[axis][0]}")
        lengths.setdefault(axis, (n, spec.name))
    return {axis: n for axis, (n, _name) in lengths.items()}


def _check_offsets(ref: SectionRef, arrays: Mapping[str, np.ndarray]) -> int:
    """Check a set's CSR offsets against its lengths; returns the number of response rows."""
    prompt = np.asarray(arrays[fmt.ARRAY_PROMPT_LENGTH], dtype=np.int64)
    response = np.asarray(arrays[fmt.ARRAY_RESPONSE_LENGTH], dtype=np.int64)
    tok_off = np.asarray(arrays[fmt.ARRAY_TOKEN_OFFSETS], dtype=np.int64)
    resp_off = np.asarray(arrays[fmt.ARRAY_RESPONSE_OFFSETS], dtype=np.int64)
    tokens = np.asarray(arrays[fmt.ARRAY_INPUT_IDS]).shape[0]
    if tok_off.shape[0] == 0 or resp_off.shape[0] == 0:
        raise StoreError(f"{ref}: offsets need one entry more than there are sequences (a leading 0)")
    if tok_off[0] != 0 or tok_off[-1] != tokens or not np.array_equal(np.diff(tok_off), prompt + response):
        raise StoreError(f"{ref}/token_offsets: must start at 0, step by prompt_length + response_length "
                         f"and end at the {tokens} tokens of input_ids")
    if resp_off[0] != 0 or not np.array_equal(np.diff(resp_off), response):
        raise StoreError(f"{ref}/response_offsets: must start at 0 and step by response_length")
    if fmt.ARRAY_GROUP_OFFSETS in arrays:
        grp_off = np.asarray(arrays[fmt.ARRAY_GROUP_OFFSETS], dtype=np.int64)
        if grp_off[0] != 0 or grp_off[-1] != prompt.shape[0] or np.any(np.diff(grp_off) < 0):
            raise StoreError(f"{ref}/group_offsets: must start at 0, never decrease and end at the "
                             f"{prompt.shape[0]} sequences")
    return int(resp_off[-1])


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(dirpath, name))
        _fsync_file(dirpath)
