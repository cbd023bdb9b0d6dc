"""Writing a teacher-signal store (format in :mod:`store.format`); reading is :class:`store.reader.StoreReader`'s.

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
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import zarr

from . import format as fmt
from .errors import IncompleteSection, ProvenanceMismatch, StoreError
from .files import quiet_zarr
from .format import SectionRef, array_checksum
from .keys import ATTR
from .provenance import DATASET_IDENTITY
from .reader import StoreReader, read_arrays
from .verify import verify_store

__all__ = ["TeacherStore", "STAGING_SUFFIX", "package_version", "write_arrays"]

#: a local writer builds sections in ``<store><STAGING_SUFFIX>/`` and renames them into place
STAGING_SUFFIX = ".partial"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("distill-cache")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


class TeacherStore(StoreReader):
    """A teacher-signal store at ``location`` (a path or an fsspec URL): :class:`StoreReader`'s reading, and
    writing where it is opened with ``mode="a"`` (:meth:`create`), and :meth:`verify`."""

    # -- creating --------------------------------------------------------------

    @classmethod
    def create(cls, location: str, *, tokenizer: Mapping, vocab_size: int, examples_per_part: int,
               storage_options: Mapping | None = None, provenance: Mapping | None = None) -> "TeacherStore":
        """Create a store, or open an existing one for writing after checking it matches.

        ``tokenizer`` is ``{"name": ..., "hash": ...}``. An existing store with
        another format version, tokenizer or part size is refused.
        """
        store = cls(location, mode="a", storage_options=storage_options)
        if not store.exists():
            store.refuse_foreign_location()
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
                with quiet_zarr():  # one write: the root's metadata and attributes together
                    zarr.create_group(store.files.zarr_store, attributes=attributes, zarr_format=3)
            except zarr.errors.ContainsGroupError:
                # another writer created it meanwhile (checked below), or a killed creation left a bare group
                if not store.exists():
                    with quiet_zarr():
                        zarr.open_group(store.files.zarr_store, mode="a", zarr_format=3).attrs.put(attributes)
            except OSError as exc:
                raise StoreError(f"{store.location}: cannot create a store here "
                                 f"({exc.strerror or exc})") from exc
            store.refresh_attrs()
        store.check(tokenizer_hash=tokenizer.get("hash"))
        store.clean_leftovers()
        layout = store.attrs["layout"]
        if layout["examples_per_part"] != examples_per_part:
            raise ProvenanceMismatch(
                f"{store.location}: written with {layout['examples_per_part']} examples per part, "
                f"asked for {examples_per_part}; use the same --examples-per-part or another --out"
            )
        return store

    def refuse_foreign_location(self) -> None:
        """Refuse to create a store where a file, or a folder holding other things, already is."""
        try:
            fs, root = self.files.fs, self.files.root
            if fs.isfile(root):
                raise StoreError(f"{self.location}: is a file, not a store; choose a folder path for --out")
            entries = [e for e in fs.ls(root, detail=False)
                       if e.rstrip("/").rsplit("/", 1)[-1] != "zarr.json"] if fs.isdir(root) else []
        except (FileNotFoundError, NotADirectoryError):
            return
        except PermissionError as exc:
            raise StoreError(f"{self.location}: cannot read this location ({exc})") from exc
        if entries:
            shown = ", ".join(e.rstrip("/").rsplit("/", 1)[-1] for e in sorted(entries)[:3])
            raise StoreError(f"{self.location}: a folder that holds other things ({shown}"
                             f"{', ...' if len(entries) > 3 else ''}) and is not a teacher-signal store; "
                             f"choose a new or empty folder for --out")

    # -- root attributes: layout and passes -----------------------------------

    def update_attrs(self, mutate: Callable[[dict], None], *, retries: int = 20) -> dict:
        """Read-modify-write the root attributes; re-reads to survive a concurrent writer."""
        self._require_writable()
        for attempt in range(retries):
            current = self.refresh_attrs()
            before = json.dumps(current, sort_keys=True)
            mutate(current)
            if json.dumps(current, sort_keys=True) == before:
                return current  # nothing changes: write nothing (a finished store may be read-only)
            with quiet_zarr():
                root = zarr.open_group(self.files.zarr_store, mode="r+", zarr_format=3)
            root.attrs.put(current)
            check = self.refresh_attrs()
            if json.dumps(check, sort_keys=True) == json.dumps(current, sort_keys=True):
                return check
            time.sleep(0.05 * (attempt + 1))
        raise StoreError(f"{self.location}: could not update root attributes (concurrent writers)")

    def set_split(self, split: str, num_examples: int, *, dataset: Mapping | None = None) -> None:
        """Declare a split's size and where its rows came from; refuses other rows.

        ``dataset`` keys in :data:`store.provenance.DATASET_IDENTITY` (name, revision, kind, fingerprint)
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
                mine = {k: v for k, v in dict(dataset).items() if k in DATASET_IDENTITY}
                theirs = {k: v for k, v in stored.items() if k in DATASET_IDENTITY}
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

    # -- sections ----------------------------------------------------------------

    def _require_writable(self):
        if self.mode == "r":
            raise StoreError(f"{self.location}: opened read-only")

    def write_section(self, split: str, part: int, sequence_set: str, section: str,
                      arrays: Mapping[str, np.ndarray], attrs: Mapping | None = None, *,
                      complete: bool = True) -> dict | None:
        """Write one section of one part, atomically as far as readers are concerned.

        ``arrays`` must hold exactly the arrays :mod:`store.format` declares for
        this set and section, with consistent lengths. Returns the checksums, or
        None when the section was already complete (another writer finished it:
        writers of one store compute the same numbers, so the first one stays).

        ``complete=False`` writes an *unfinished* section (:data:`store.format.DESCRIPTION`
        ``"unfinished"``): the same arrays and checksums, ``complete: false`` and
        ``attrs`` holding :data:`store.format.ATTR_UNFINISHED` (what is left to do).
        Readers skip it as any incomplete section; the writer's next run reads it
        back (:meth:`unfinished_section`) and writes the section again.

        On a local file system the section is built beside the store and renamed
        into place complete, so independent processes can write one store at
        once; on a remote store it is written in place and marked complete last.
        """
        self._require_writable()
        ref = SectionRef(split, part, sequence_set, section)
        if not complete and not (attrs or {}).get(fmt.ATTR_UNFINISHED):
            raise StoreError(f"{ref}: an unfinished section must say what is left ({fmt.ATTR_UNFINISHED!r})")
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
            # a width of 0 (a pure sampled store's top-K) is chunked 1 wide: the v3 grid takes positive sizes only
            chunks = (fmt.chunk_rows(spec.axis, values.shape[0]),) + tuple(max(1, n) for n in values.shape[1:])
            prepared.append((spec, dtype, values, chunks))
        if self.is_complete(split, part, sequence_set, section):
            return None  # another writer finished it meanwhile: the same numbers are there already
        start, stop = self.part_range(split, part)
        final_attrs = {**dict(attrs or {}), "rows": rows, "example_start": start, "example_stop": stop}
        self.ensure_part_group(split, part)
        if not self.is_local:
            return self._write_in_place(ref, prepared, final_attrs, complete)
        staging = self._staging_dir() / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            checksums = _write_group(zarr.storage.LocalStore(str(staging)), "", prepared, final_attrs, complete)
            _fsync_tree(str(staging))
            return checksums if self._move_into_place(ref, staging) else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def ensure_part_group(self, split: str, part: int) -> None:
        """The part's group (and its split's), with the example range; other writers may make it at the
        same instant."""
        start, stop = self.part_range(split, part)
        with quiet_zarr():
            group = _open_or_create_group(self.files.zarr_store, f"{split}/{fmt.part_name(part)}")
            if "example_start" not in group.attrs:
                group.attrs.update({"example_start": start, "example_stop": stop})

    def _write_in_place(self, ref: SectionRef, prepared: list, final_attrs: dict, complete: bool = True) -> dict:
        """Remote stores (no rename): write where the section belongs, marking it complete last."""
        if self.files.open_group(ref.path) is not None or self.files.exists(ref.path):
            self.files.remove(ref.path)  # a killed writer's leftover, or an unfinished section: whole
        return _write_group(self.files.zarr_store, ref.path, prepared, final_attrs, complete)

    def _staging_dir(self) -> Path:
        """Where a local writer builds a section before renaming it into place: beside the store, not in it.

        Outside the hierarchy, so that plain zarr never lists a half-written group;
        on the same file system, so that the rename is atomic.
        """
        path = Path(f"{self.files.root}{STAGING_SUFFIX}")
        path.mkdir(exist_ok=True)
        return path

    def _move_into_place(self, ref: SectionRef, staging: Path) -> bool:
        """Rename a complete staged section to its place; False when another writer's complete one is there."""
        target = Path(self.files.root) / ref.path
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
        staging = Path(f"{self.files.root}{STAGING_SUFFIX}")
        for entry in (staging.iterdir() if staging.is_dir() else ()):
            owner_host, _, rest = entry.name.rpartition("-")[0].rpartition("-")
            pid = int(rest) if rest.isdigit() else None
            dead = owner_host == host and pid is not None and not _pid_alive(pid)
            if dead or now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        for directory, _dirs, files in os.walk(self.files.root):
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

    # -- manifest and verification ----------------------------------------------

    def refresh_manifest(self) -> dict:
        """Copy every complete section's checksums into the root attributes (and its content key, where it
        records one, into ``content_keys``: what a catalog reads to find sections by key in one request)."""
        complete = list(self.complete_sections())
        manifest = {ref.path: attrs["checksums"] for ref, attrs in complete}
        content_keys = {ref.path: attrs[ATTR] for ref, attrs in complete if attrs.get(ATTR)}

        def mutate(root_attrs):
            root_attrs["manifest"] = manifest
            if content_keys or "content_keys" in root_attrs:
                root_attrs["content_keys"] = content_keys

        self.update_attrs(mutate)
        return manifest

    def verify(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Every damage of the store, one line each (empty when intact): see :mod:`store.verify`."""
        return verify_store(self, progress)

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


def _write_group(zstore, path: str, prepared: list, final_attrs: dict, complete: bool = True) -> dict:
    """Create a group at ``path`` of ``zstore``, write its arrays, read them back, hash them, then mark it
    complete (or, ``complete=False``, unfinished with its checksums: the attributes are the last write).
    Returns the checksums."""
    with quiet_zarr():
        group = zarr.open_group(zstore, path=path, mode="w", zarr_format=3)
        group.attrs.put({"complete": False})
        write_arrays(zstore, path, prepared)
        if isinstance(zstore, zarr.storage.LocalStore):
            _fsync_tree(os.path.join(str(zstore.root), path))
        specs = [spec for spec, *_rest in prepared]
        reread = read_arrays(zstore, [(path, specs)], require_complete=False)[0]  # decoded: checksums name values
        checksums = {name: array_checksum(values) for name, values in reread.items()}
        group.attrs.put({**final_attrs, "complete": complete, "checksums": checksums,
                         "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return checksums


def write_arrays(zstore, path: str, prepared: list) -> None:
    """Create and fill a group's arrays concurrently (one trip through zarr's event loop)."""
    import asyncio

    import zarr.api.asynchronous as zasync
    from zarr.core.sync import sync

    async def write_all():
        group = await zasync.open_group(store=zstore, path=path, mode="r+", zarr_format=3)

        async def one(spec, dtype, values, chunks):
            stored = fmt.encode_stored(spec, values)  # version 4: log-probs as uint16 (steps along K if sorted)
            arr = await group.create_array(fmt.stored_name(spec), shape=stored.shape, chunks=chunks,
                                           dtype=stored.dtype, fill_value=0, config={"write_empty_chunks": True},
                                           attributes=fmt.array_attributes(spec), **fmt.codecs_for(spec, dtype))
            if stored.size:
                await arr.setitem(Ellipsis, stored)

        await asyncio.gather(*(one(*item) for item in prepared))

    with quiet_zarr():
        sync(write_all())


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
    token_offsets = np.asarray(arrays[fmt.ARRAY_TOKEN_OFFSETS], dtype=np.int64)
    response_offsets = np.asarray(arrays[fmt.ARRAY_RESPONSE_OFFSETS], dtype=np.int64)
    tokens = np.asarray(arrays[fmt.ARRAY_INPUT_IDS]).shape[0]
    if token_offsets.shape[0] == 0 or response_offsets.shape[0] == 0:
        raise StoreError(f"{ref}: offsets need one entry more than there are sequences (a leading 0)")
    if (token_offsets[0] != 0 or token_offsets[-1] != tokens
            or not np.array_equal(np.diff(token_offsets), prompt + response)):
        raise StoreError(f"{ref}/token_offsets: must start at 0, step by prompt_length + response_length "
                         f"and end at the {tokens} tokens of input_ids")
    if response_offsets[0] != 0 or not np.array_equal(np.diff(response_offsets), response):
        raise StoreError(f"{ref}/response_offsets: must start at 0 and step by response_length")
    if fmt.ARRAY_GROUP_OFFSETS in arrays:
        group_offsets = np.asarray(arrays[fmt.ARRAY_GROUP_OFFSETS], dtype=np.int64)
        if group_offsets[0] != 0 or group_offsets[-1] != prompt.shape[0] or np.any(np.diff(group_offsets) < 0):
            raise StoreError(f"{ref}/group_offsets: must start at 0, never decrease and end at the "
                             f"{prompt.shape[0]} sequences")
    return int(response_offsets[-1])


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
