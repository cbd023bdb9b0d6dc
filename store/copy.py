"""``store cp`` and ``store upgrade``: copy a store between any two locations, resumable, each section verified
on arrival; an upgrade writes the copy in this writer's format version, re-encoding every array.

The destination's root ``zarr.json`` goes first (with an empty manifest, so a
copy under way reads as an incomplete store), then the split and part groups,
then section by section: its arrays' files, a read-back of every array checked
against the section's checksums, and only then the section's own ``zarr.json``,
which carries ``complete: true``. A killed copy leaves sections that are either
complete and verified or not marked complete; running the same command again
skips the first and redoes the second. The manifest is filled in at the end.

:func:`copy_section` is that verified copy for one section, between any two
stores and to any place of the destination: ``precompute ... --reuse-from``
copies a section whose content key matches (:mod:`store.keys`) with it. Between
stores of one format version it copies the files as they are; from another
version (a format 3 store into a format 4 one: their content keys match, see
:func:`store.format.key_format_version`) it decodes the arrays and writes them
as the destination's version does. Either way the checksums, defined on
decoded values, must come out equal.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

import zarr

from . import format as fmt
from .errors import StoreError
from .files import quiet_zarr
from .format import SectionRef, array_checksum
from .locations import redact_url
from .reader import StoreReader, section_specs
from .teacher_store import TeacherStore, write_arrays, package_version
from .vocab_map import vocab_map_files

__all__ = ["copy_store", "copy_section"]


def copy_store(src: str, dst: str, *, src_options: Mapping | None = None, dst_options: Mapping | None = None,
               progress: Callable[[str, bool], None] | None = None, threads: int = 8,
               upgrade: bool = False) -> dict:
    """Copy ``src`` to ``dst``; returns ``{"copied": n, "skipped": m, "from_version": v, "to_version": w}``.

    ``progress(section path, copied)`` is called once per complete section of the source. ``upgrade``:
    the copy is a store of this writer's format version (:data:`store.format.FORMAT_VERSION`), every
    section re-encoded and verified against the source's checksums (``store upgrade``); the root records
    ``upgraded_from``. Without it the copy keeps the source's version, files as they are (``store cp``).
    """
    source = StoreReader.open(src, storage_options=src_options)
    target = TeacherStore(dst, mode="a", storage_options=dst_options)
    if target.exists():
        _check_same_store(source, target, upgrade)
    else:
        target.refuse_foreign_location()
        root = json.loads(source.files.read("zarr.json"))
        extra = {"copied_from": redact_url(source.location)}
        if upgrade and source.format_version != fmt.FORMAT_VERSION:
            extra = {"format": {"name": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION},
                     "format_description": fmt.DESCRIPTION,
                     "upgraded_from": {"store": redact_url(source.location), "format_version": source.format_version,
                                       "package_version": package_version(),
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        root["attributes"] = {**root["attributes"], "manifest": {}, **extra}
        target.files.write("zarr.json", json.dumps(root, indent=2).encode())
        target.refresh_attrs()
    relative = source.files.list()
    groups = [f for f in relative if f.endswith("/zarr.json") and f.count("/") in (1, 2)]  # splits and parts
    _copy_files(source, target, groups, threads)
    _copy_files(source, target, vocab_map_files(relative), threads)  # a cross-tokenizer store's map, whole

    copied = skipped = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for ref, attrs in source.complete_sections():
            have = target.section_attrs(ref.split, ref.part, ref.sequence_set, ref.section)
            if have and have.get("complete") and have.get("checksums") == attrs.get("checksums"):
                skipped += 1
                if progress:
                    progress(ref.path, False)
                continue
            _copy_section(source, target, ref, attrs, relative, pool)
            copied += 1
            if progress:
                progress(ref.path, True)
    target.refresh_manifest()  # reads the root attributes afresh
    problems = set(source.attrs.get("manifest") or {}) - set(target.attrs.get("manifest") or {})
    if problems:
        raise StoreError(f"{redact_url(dst)}: after the copy, {len(problems)} section(s) of the source's manifest "
                         f"are not complete here, e.g. {sorted(problems)[0]}")
    return {"copied": copied, "skipped": skipped, "from_version": source.format_version,
            "to_version": target.format_version}


def _check_same_store(source: StoreReader, target: TeacherStore, upgrade: bool = False) -> None:
    """Resuming into an existing destination: it must be a copy of the same store (an upgrade's: in this
    writer's version)."""
    differ = [k for k in ("tokenizer", "created_at") if source.attrs.get(k) != target.attrs.get(k)]
    if upgrade and target.format_version != fmt.FORMAT_VERSION:
        differ.append(f"format version {target.format_version}, not {fmt.FORMAT_VERSION}")
    elif not upgrade and source.attrs.get("format") != target.attrs.get("format"):
        differ.append("format")
    if differ:
        raise StoreError(f"{redact_url(target.location)} holds another store ({', '.join(differ)} differ from "
                         f"{redact_url(source.location)}); copy to a new location")


def _copy_files(source: StoreReader, target: TeacherStore, paths: list[str], threads: int) -> None:
    def one(path: str) -> None:
        target.files.write(path, source.files.read(path))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(one, paths))


def _copy_section(source: StoreReader, target: TeacherStore, ref: SectionRef, attrs: dict, relative: list[str],
                  pool: ThreadPoolExecutor) -> None:
    copy_section(source, target, ref, attrs, files=relative, pool=pool)


def copy_section(source: StoreReader, target: TeacherStore, ref: SectionRef, attrs: dict, *,
                 to: SectionRef | None = None, extra_attrs: Mapping | None = None, make_parents: bool = False,
                 files: list[str] | None = None, pool: ThreadPoolExecutor | None = None) -> None:
    """Copy the complete section ``ref`` of ``source`` (its group attributes ``attrs``) to ``to`` (default: the
    same place) in ``target``, verified: arrays first, each read back and checked against ``attrs``'
    checksums, then the section's ``zarr.json`` (``complete: true``, ``extra_attrs`` added) last.

    Between stores of one format version the files are copied as they are; otherwise the arrays are decoded
    and written as ``target``'s version does (same checksums: they name decoded values).
    ``files``: the source's files relative to its root, when the caller has listed them (else the section's
    folder is listed). ``make_parents``: create the part's group (with its example range) where it is missing.
    A section that arrives with other checksums is left incomplete and StoreError is raised.
    """
    to = to or ref
    names = list(attrs.get("checksums", {}))
    specs = section_specs(ref, names, source.location)
    if make_parents:
        target.ensure_part_group(to.split, to.part)
    for leftover in [f"{to.path}/{fmt.stored_name(spec, version)}" for spec in specs
                     for version in {source.format_version, target.format_version}] + [f"{to.path}/zarr.json"]:
        if target.files.exists(leftover):  # an earlier copy's arrays go first, and the group's metadata
            target.files.remove(leftover)
    if source.format_version == target.format_version:
        stored = [fmt.stored_name(spec, source.format_version) for spec in specs]
        if files is None:
            files = _array_files(source, ref, stored)
        files = [f for f in files if any(f.startswith(f"{ref.path}/{name}/") for name in stored)]

        def one(path: str) -> None:
            target.files.write(to.path + path[len(ref.path):], source.files.read(path))

        if pool is None:
            with ThreadPoolExecutor(max_workers=8) as own:
                list(own.map(one, files))
        else:
            list(pool.map(one, files))
    else:
        _write_reencoded(source, target, ref, to, specs)
    arrays = _read_arrays_of(target, to, specs)
    wrong = [n for n in names if array_checksum(arrays[n]) != attrs["checksums"][n]]
    if wrong:
        raise StoreError(f"{redact_url(target.location)}: {to.path}/{wrong[0]} arrived with another checksum than "
                         f"the source's; the section is left incomplete (run the copy again)")
    meta = source.files.read(f"{ref.path}/zarr.json")
    if extra_attrs:
        document = json.loads(meta)
        document["attributes"] = {**(document.get("attributes") or {}), **dict(extra_attrs)}
        meta = json.dumps(document, indent=2).encode()
    target.files.write(f"{to.path}/zarr.json", meta)


def _write_reencoded(source: StoreReader, target: TeacherStore, ref: SectionRef, to: SectionRef,
                     specs: list) -> None:
    """The section's arrays, decoded from ``source`` (every chunk checked as any read checks it), written at
    ``to`` as ``target``'s format version writes them, under a group not marked complete."""
    if target.format_version != fmt.FORMAT_VERSION:
        raise StoreError(f"{redact_url(target.location)}: format version {target.format_version}; sections of "
                         f"another version are re-encoded only into this writer's ({fmt.FORMAT_VERSION})")
    values = source.read_section(ref.split, ref.part, ref.sequence_set, ref.section, [spec.name for spec in specs])
    prepared = [(spec, values[spec.name].dtype, values[spec.name],
                 (fmt.chunk_rows(spec.axis, values[spec.name].shape[0]),) + values[spec.name].shape[1:])
                for spec in specs]
    with quiet_zarr():
        zarr.open_group(target.files.zarr_store, path=to.path, mode="w", zarr_format=3).attrs.put({"complete": False})
    write_arrays(target.files.zarr_store, to.path, prepared)


def _array_files(source: StoreReader, ref: SectionRef, names: list[str]) -> list[str]:
    """The files of a section's arrays, from each array's metadata (its chunk grid), without listing folders:
    a static HTTP server without directory listings serves them as well. Listed where the metadata names
    a chunk key encoding other than this writer's."""
    metas = [f"{ref.path}/{name}/zarr.json" for name in names]
    fetched = source.files.read_many(metas)
    files = []
    for name, meta in zip(names, metas):
        document = json.loads(_or_raise(fetched[meta]))
        encoding = document.get("chunk_key_encoding") or {}
        if encoding.get("name") != "default" or (encoding.get("configuration") or {}).get("separator", "/") != "/":
            files.extend(source.files.list(f"{ref.path}/{name}"))
            continue
        chunks = tuple(document["chunk_grid"]["configuration"]["chunk_shape"])
        files.append(meta)
        files.extend(source.files.chunk_keys(f"{ref.path}/{name}", tuple(document["shape"]), chunks))
    return files


def _or_raise(fetched):
    """A file read with ``read_many``: its bytes, or the error reading it raised, raised here."""
    if isinstance(fetched, BaseException):
        raise fetched
    return fetched


def _read_arrays_of(store: TeacherStore, ref: SectionRef, specs: list) -> dict:
    """Decode a section's arrays without its group metadata (not there yet: it comes last): name -> values."""
    version = store.format_version
    with quiet_zarr():
        return {spec.name: fmt.decode_stored(spec, store.files.open_array(f"{ref.path}/{fmt.stored_name(spec, version)}")[...],
                                             version) for spec in specs}

