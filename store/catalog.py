"""``store ls``: every store under a folder or bucket prefix, and what each holds, from root attributes only.

A store is found by its root ``zarr.json`` carrying this format's name; the
search descends folders (``max_depth`` levels) and never into a store. What
``ls`` says of each comes from the root attributes alone (one read per store,
cheap on a bucket): teacher, dataset, passes, splits, how many of the sections
each pass needs are in the manifest, size on disk and creation time.

:class:`SectionIndex` is the catalog one level down: the complete sections of
every store found at some locations, by content key (:mod:`store.keys`), which
``precompute ... --reuse-from`` looks up before computing a section.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import fsspec

from . import format as fmt
from .format import SectionRef
from .keys import ATTR
from .locations import is_url, redact_url
from .provenance import PASS_ENCODE, read_passes
from .errors import StoreError
from .reader import StoreReader

__all__ = ["find_stores", "UNLISTED_PROTOCOLS", "store_summary", "format_listing", "KeyedSection", "SectionIndex"]


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _root_attrs(fs, path: str) -> dict | None:
    """The root attributes at ``path`` when it is a store of this format, else None."""
    try:
        document = json.loads(fs.cat_file(_join(path, "zarr.json")))
    except (FileNotFoundError, ValueError, OSError):
        return None
    attrs = document.get("attributes") or {} if isinstance(document, dict) else {}
    return attrs if (attrs.get("format") or {}).get("name") == fmt.FORMAT_NAME else None


#: protocols whose servers need not list folders: a folder they do not list reads as a missing one
UNLISTED_PROTOCOLS = ("http", "https")


def _list_root(fs, root: str, location: str) -> list[dict]:
    """The entries of ``location``'s folder (``root`` as ``fs`` names it); OSError naming the location when it
    is not a folder that can be listed: no such path, a file, an endpoint that cannot be reached.

    A plain HTTP server answers 404 for a folder it does not list as for one that does not exist: there,
    nothing is listed, and stores it serves are still reached by their own URLs.
    """
    shown = redact_url(location)
    protocol = location.split("://", 1)[0] if is_url(location) else "file"
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        if protocol in UNLISTED_PROTOCOLS:
            return []
        raise FileNotFoundError(f"{shown}: no such folder") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{shown}: a file, not a folder") from None
    except Exception as exc:  # noqa: BLE001 - an endpoint that cannot be reached, refused credentials: one line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise OSError(f"{shown}: cannot be listed ({type(exc).__name__}: {reason})") from None
    if protocol not in UNLISTED_PROTOCOLS and [e.get("type") for e in entries] == ["file"] and \
            entries[0]["name"].rstrip("/") == root.rstrip("/"):
        raise NotADirectoryError(f"{shown}: a file, not a folder")  # listing a file gives the file itself
    return entries


def find_stores(location: str, storage_options: Mapping | None = None, max_depth: int = 4) -> list[str]:
    """Locations of every store at or under ``location`` (a folder, bucket or prefix), sorted.

    ``location`` itself must be a store or a folder that can be listed: OSError naming it otherwise
    (:func:`_list_root`), so that a mistyped path is not taken for an empty folder; below it, what cannot
    be listed is passed over.
    """
    fs, root = fsspec.core.url_to_fs(location, **dict(storage_options or {}))
    fs.invalidate_cache()  # fsspec instances are shared: a listing cached before a store was written would hide it
    protocol = location.split("://", 1)[0] + "://" if is_url(location) else ""
    root = root.rstrip("/")
    found, frontier = [], [(root, 0)]
    while frontier:
        path, depth = frontier.pop()
        if _root_attrs(fs, path) is not None:
            found.append(protocol + path if protocol and not path.startswith(protocol) else path)
            continue  # never into a store
        if path == root:
            entries = _list_root(fs, path, location)
            if depth >= max_depth:
                continue
        elif depth >= max_depth:
            continue
        else:
            try:
                entries = fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError, OSError):
                continue
        frontier.extend((entry["name"].rstrip("/"), depth + 1) for entry in entries
                        if entry.get("type") == "directory" and not entry["name"].rstrip("/").endswith(".partial"))
    return sorted(found)


def store_summary(location: str, storage_options: Mapping | None = None) -> dict:
    """What ``store ls`` prints of one store (see the module docstring)."""
    store = StoreReader.open(location, storage_options=storage_options)
    attrs = store.attrs
    manifest = attrs.get("manifest") or {}
    records = read_passes(attrs)
    passes: dict[str, Any] = {}
    for name, record in records.items():
        if name == PASS_ENCODE or "/" not in name:
            continue
        sequence_set, section = name.split("/", 1)
        expected = done = 0
        for split in store.splits():
            for part in range(store.num_parts(split)):
                expected += 1
                done += fmt.group_path(split, part, sequence_set, section) in manifest
        passes[name] = {"model": record.model.name if record.model else None,
                        "sections_complete": done, "sections_expected": expected}
    teacher = next((r.model for n, r in records.items() if n.endswith("/" + fmt.SECTION_TEACHER) and r.model), None)
    dataset = store.dataset() or next((store.dataset(s) for s in store.splits() if store.dataset(s)), None)
    try:
        size = int(store.files.fs.du(store.files.root))
    except (OSError, NotImplementedError):
        size = None
    return {
        "location": redact_url(location),
        "teacher": None if teacher is None else {"name": teacher.name, "sha256": teacher.sha256},
        "dataset": None if dataset is None else dataset.identity(),
        "splits": {split: store.num_examples(split) for split in store.splits()},
        "passes": passes,
        "complete": bool(passes) and all(p["sections_complete"] == p["sections_expected"] for p in passes.values()),
        "bytes": size,
        "created_at": attrs.get("created_at"),
        "format_version": (attrs.get("format") or {}).get("version"),
    }


def format_listing(summaries: list[dict]) -> str:
    """One line per store: location, teacher, dataset, splits, passes complete, size, created."""
    if not summaries:
        return "no teacher-signal store found"
    lines = []
    for s in summaries:
        teacher = (s["teacher"] or {}).get("name", "-")
        dataset = (s["dataset"] or {}).get("name", "-")
        splits = ", ".join(f"{k} {v}" for k, v in s["splits"].items()) or "-"
        passes = ", ".join(f"{name} {p['sections_complete']}/{p['sections_expected']}"
                           for name, p in s["passes"].items()) or "-"
        size = "-" if s["bytes"] is None else f"{s['bytes'] / 1e6:.1f} MB"
        lines.append(f"{s['location']}\n  teacher {teacher}; dataset {dataset}; splits {splits}; "
                     f"{'complete' if s['complete'] else 'INCOMPLETE'}; {size}; created {s['created_at']}\n"
                     f"  passes: {passes}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections by content key


@dataclass(frozen=True)
class KeyedSection:
    """A section a store lists under a content key (its root ``content_keys``)."""

    store: StoreReader
    ref: SectionRef

    def attrs(self, key: str) -> dict | None:
        """The section's group attributes when it is complete, has checksums and still holds ``key``; else None."""
        attrs = self.store.section_attrs(self.ref.split, self.ref.part, self.ref.sequence_set, self.ref.section)
        ok = attrs and attrs.get("complete") and attrs.get("checksums") and attrs.get(ATTR) == key
        return attrs if ok else None


def same_location(a: str, b: str) -> bool:
    """Whether two locations name the same store (credentials and trailing slashes aside)."""
    if is_url(a) or is_url(b):
        return redact_url(a).rstrip("/") == redact_url(b).rstrip("/")
    strip = (lambda p: p[len("file://"):] if p.startswith("file://") else p)
    return os.path.realpath(strip(a)) == os.path.realpath(strip(b))


@dataclass
class SectionIndex:
    """The sections of the stores at or under some locations, by content key: one read per store.

    A store lists its complete sections' keys in its root attributes (``content_keys``, refreshed with the
    manifest when a run ends; :meth:`store.teacher_store.TeacherStore.refresh_manifest`), so the index reads
    nothing else; :meth:`KeyedSection.attrs` reads a section's own attributes when it is about to be copied.
    ``locations`` are ``(location, storage options)`` pairs, searched in order: for a key found in several
    stores, the first location's (then the first store's in sorted order) is kept. Only stores whose key
    layout (format version, token id dtype, tokenizer) is ``layout`` are used (no other can match), and
    ``exclude`` (the store being written) is left out. A location that cannot be listed, or a store that
    cannot be read, is skipped and said so in :attr:`found`: reuse is a cache, never a reason to fail.
    """

    locations: Sequence[tuple[str, Mapping]]
    layout: Mapping
    exclude: str | None = None
    sections: dict[str, KeyedSection] = field(default_factory=dict)
    #: per location (redacted): stores found, keyed sections indexed, problems
    found: list[dict] = field(default_factory=list)

    def build(self) -> "SectionIndex":
        for location, options in self.locations:
            seen = {"location": redact_url(location), "stores": 0, "sections": 0, "problems": []}
            self.found.append(seen)
            try:
                stores = find_stores(location, options)
            except (OSError, ValueError, ImportError) as exc:  # no such protocol, unreachable endpoint
                seen["problems"].append(f"cannot be listed ({type(exc).__name__})")
                continue
            for found in stores:
                if self.exclude is not None and same_location(found, self.exclude):
                    continue
                seen["stores"] += 1
                try:
                    store = StoreReader.open(found, storage_options=options)
                    if store.key_layout() != dict(self.layout):
                        continue
                    for path, key in (store.attrs.get("content_keys") or {}).items():
                        if key not in self.sections:
                            self.sections[key] = KeyedSection(store, SectionRef.from_path(path))
                            seen["sections"] += 1
                except (StoreError, OSError, KeyError, ValueError) as exc:
                    seen["problems"].append(f"{redact_url(found)} cannot be read ({type(exc).__name__})")
        return self

    def find(self, key: str | None) -> KeyedSection | None:
        return self.sections.get(key) if key else None
