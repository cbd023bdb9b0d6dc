"""``store verify``: compare the tree on disk, the manifest and the layout both ways, and every checksum.

What a store claims lives in three places: the files on disk, the root
``manifest`` (every complete section's checksums) and the ``layout`` (splits,
their example counts, hence their parts). Damage is any disagreement:

- a ``zarr.json`` that is missing where a group has content, or does not parse
  (root, split, part, set, section or array): the file is named;
- a part or section on disk that the layout does not cover (an edited example
  count), a part whose recorded example range differs from the layout's, or a
  split whose example count differs from the rows its dataset record counts;
- a manifest entry with no complete section behind it (removed, never written,
  ``complete`` flipped to false), and a complete section the manifest lacks;
  a manifest missing altogether;
- an array that is missing, lacks chunk files, does not decode, or whose
  checksum differs from the one recorded.

Every check runs to the end, so one run reports all the damage.
"""

from __future__ import annotations

import json
from typing import Callable

from . import format as fmt
from .format import array_checksum
from .reader import StoreReader, failure_reason
from .vocab_map import verify_vocab_map

__all__ = ["verify_store"]


def verify_store(store: StoreReader, progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem of ``store``, one line each naming the place (empty when intact)."""
    problems: list[str] = []
    attrs = store.attrs
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict):
        problems.append("zarr.json (root): the manifest of complete sections is missing from the attributes")
        manifest = {}
    files = set(store.files.list())  # every file, relative to the root
    meta = _read_metadata(store, files, problems)  # group/array path -> attributes (parsed zarr.json)
    layout = attrs.get("layout", {}).get("splits", {})

    declared = set()  # every section path the layout allows
    for split in layout:
        counted = _rows_counted(layout[split].get("dataset"))
        if counted is not None and counted != store.num_examples(split):
            problems.append(f"zarr.json (root): layout says split {split!r} has {store.num_examples(split)} "
                            f"examples, its dataset record counts {counted} rows (used + skipped)")
        if split not in meta and f"{split}/zarr.json" not in files:
            if any(path.startswith(f"{split}/") for path in files):
                problems.append(f"{split}/zarr.json: missing (the split group's metadata)")
        for part in range(store.num_parts(split)):
            part_path = f"{split}/{fmt.part_name(part)}"
            declared.update(fmt.group_path(split, part, s, sec) for s in fmt.SEQUENCE_SETS
                            for sec in (fmt.BASE,) + fmt.SECTIONS)
            if part_path not in meta:
                if any(path.startswith(part_path + "/") for path in files):
                    problems.append(f"{part_path}/zarr.json: missing (the part group's metadata)")
                continue
            recorded = (meta[part_path].get("example_start"), meta[part_path].get("example_stop"))
            expected = store.part_range(split, part)
            if recorded != expected:
                problems.append(f"{part_path}: holds examples [{recorded[0]}, {recorded[1]}) but the layout's "
                                f"{store.num_examples(split)} examples give it [{expected[0]}, {expected[1]})")

    for path in sorted(_section_paths(meta)):
        if path not in declared:
            problems.append(f"{path}: on disk but outside the layout (splits {', '.join(layout) or 'none'}; "
                            f"example counts {', '.join(str(v.get('num_examples')) for v in layout.values())})")
    for path in sorted(_part_paths(meta)):
        split, part = path.split("/")
        if split not in layout or fmt.part_index(part) >= store.num_parts(split):
            problems.append(f"{path}: a part on disk that the layout does not cover")

    complete = {}
    for path in sorted(declared):
        section_meta = meta.get(path)
        if section_meta is None:
            if path in manifest:
                problems.append(f"{path}: listed as complete in the manifest but not on disk")
            continue
        if not section_meta.get("complete"):
            if path in manifest:
                problems.append(f"{path}/zarr.json: the manifest lists this section as complete, "
                                f"but its complete flag is false")
            continue
        complete[path] = section_meta
    for path in sorted(set(manifest) - declared):
        problems.append(f"manifest entry {path}: no such section in the layout")
    for path in sorted(set(complete) - set(manifest)):
        problems.append(f"{path}: complete on disk but missing from the manifest")

    for path, section_meta in complete.items():
        if progress:
            progress(path)
        problems.extend(_verify_section(store, path, section_meta, manifest.get(path), files, meta))
    problems.extend(verify_vocab_map(store))  # a cross-tokenizer store's map against its record
    return problems




def _read_metadata(store: StoreReader, files: set[str], problems: list[str]) -> dict[str, dict]:
    """Parse every ``zarr.json``: group path -> its attributes (arrays included); broken files are problems."""
    meta = {}
    for path in sorted(f for f in files if f == "zarr.json" or f.endswith("/zarr.json")):
        group = path[: -len("/zarr.json")] if "/" in path else ""
        try:
            document = json.loads(store.files.read(path))
            if not isinstance(document, dict) or "node_type" not in document:
                raise ValueError("not zarr metadata")
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: unreadable zarr metadata ({type(exc).__name__}: {exc})")
            continue
        if group:
            meta[group] = dict(document.get("attributes") or {}, _node_type=document["node_type"])
    return meta


def _rows_counted(dataset: dict | None) -> int | None:
    """Rows a run read for a split (used + skipped), when its dataset record counts them."""
    if not isinstance(dataset, dict) or not isinstance(dataset.get("rows_used"), int):
        return None
    return dataset["rows_used"] + sum(int(n) for n in (dataset.get("skipped") or {}).values())


def _part_paths(meta: dict) -> set[str]:
    return {path for path in meta if path.count("/") == 1 and path.split("/")[1].startswith("part-")}


def _section_paths(meta: dict) -> set[str]:
    """Groups at set or section depth (``split/part/set[/section]``), arrays left out."""
    return {path for path, attrs in meta.items()
            if attrs["_node_type"] == "group" and path.count("/") in (2, 3)}


def _verify_section(store: StoreReader, path: str, attrs: dict, manifest_sums: dict | None, files: set[str],
                    meta: dict) -> list[str]:
    problems = []
    recorded = attrs.get("checksums", {})
    if manifest_sums is not None and manifest_sums != recorded:
        problems.append(f"{path}: checksums differ between the section and the root manifest")
    group = store.files.open_group(path)
    ref = fmt.SectionRef.from_path(path)
    specs = {spec.name: spec for spec in fmt.arrays_of(ref.sequence_set, ref.section)}
    version = store.format_version
    for name, expected in recorded.items():
        spec = specs.get(name)
        if spec is None:
            problems.append(f"{path}: checksum recorded for {name!r}, an array the format does not give this section")
            continue
        array_path = f"{path}/{fmt.stored_name(spec, version)}"  # checksums name the decoded values
        if array_path not in meta:
            if f"{array_path}/zarr.json" not in files:
                problems.append(f"{array_path}: array missing")
            continue  # an unreadable zarr.json is already reported
        try:
            arr = group[fmt.stored_name(spec, version)]
        except Exception as exc:  # noqa: BLE001 - any failure to open is damage to report, not to raise
            problems.append(f"{array_path}/zarr.json: cannot be opened ({type(exc).__name__}: {exc})")
            continue
        missing = [k for k in store.files.chunk_keys(array_path, arr.shape, arr.chunks) if k not in files]
        if missing:
            problems.append(f"{array_path}: missing chunk file(s) {', '.join(missing)}")
            continue
        try:
            actual = array_checksum(fmt.decode_stored(spec, arr[...], version))
        except Exception:  # noqa: BLE001 - a corrupted chunk fails to decode (version 4: its crc32c): name each
            problems.extend(_damaged_chunks(arr, array_path))
            continue
        if actual != expected:
            problems.append(f"{array_path}: checksum differs (recorded {expected[:12]}, now {actual[:12]})")
    return problems



def _damaged_chunks(arr, array_path: str) -> list[str]:
    """One line per chunk of ``arr`` that fails to decode on its own (arrays are chunked along rows only)."""
    rows = arr.chunks[0] if arr.shape else 1
    lines = []
    for index in range(-(-arr.shape[0] // rows) if arr.shape and arr.shape[0] else 0):
        try:
            arr[index * rows:(index + 1) * rows]
        except Exception as exc:  # noqa: BLE001 - damage to report, not to raise
            key = "/".join([str(index)] + ["0"] * (len(arr.shape) - 1))
            lines.append(f"{array_path}/c/{key}: cannot be decoded ({failure_reason(exc)})")
    return lines or [f"{array_path}: cannot be decoded"]
