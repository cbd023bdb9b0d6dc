"""What a store holds, in one dictionary (``store_info``) and as a text table (``format_info``).

Everything comes from attributes (root and per section, read through the
typed records of :mod:`store.provenance`) plus one listing of the files for the
bytes on disk, so it is cheap on a remote store too; no array data is read,
except for a teacher section's shape when no pass states its top-K.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from . import format as fmt
from .format import SectionRef
from .locations import redact_url
from .reader import StoreReader

__all__ = ["store_info", "format_info"]


def _top_k(store: StoreReader, teacher_parts: list[SectionRef]) -> tuple[int | None, str]:
    """K from the teacher passes' records (a pass of a teacher section first), else from the data."""
    records = store.passes()
    names = sorted(records, key=lambda n: (n.split("/")[-1] != fmt.SECTION_TEACHER, n))
    for name in names:
        if records[name].top_k is not None:
            return records[name].top_k, f"pass {name!r}"
    for ref in teacher_parts:
        group = store.files.open_group(ref.path)
        try:
            return int(group[fmt.ARRAY_TOPK_IDS].shape[1]), f"{fmt.ARRAY_TOPK_IDS} width"
        except Exception:  # a damaged section: try the next one
            continue
    return None, "no teacher section"


def store_info(store: StoreReader) -> dict:
    """A JSON-serialisable summary of ``store`` (see the module docstring)."""
    attrs = store.attrs
    info: dict[str, Any] = {
        "location": redact_url(store.location),
        "format": attrs.get("format", {}),
        "created_with": attrs.get("created_with"),
        "created_at": attrs.get("created_at"),
        "tokenizer": attrs.get("tokenizer", {}),
        fmt.ATTR_CROSS_TOKENIZER: attrs.get(fmt.ATTR_CROSS_TOKENIZER),  # None: one tokenizer
        "vocab_size": attrs.get("vocab_size"),
        "token_id_dtype": attrs.get("token_id_dtype"),
        "examples_per_part": store.examples_per_part,
        "provenance": attrs.get("provenance", {}),
        "passes": {},
        "models": [],
    }
    models: dict[tuple[str, str], dict] = {}
    for name, record in store.passes().items():
        found = [] if record.model is None else [{"name": record.model.name, "hash": record.model.sha256,
                                                  "key": f"{name}.model"}]
        info["passes"][name] = {"provenance": record.to_dict(), "models": found}
        for model in found:
            entry = models.setdefault((model["name"], model["hash"]),
                                      {"name": model["name"], "hash": model["hash"], "passes": []})
            entry["passes"].append(name)
    info["models"] = list(models.values())

    splits: dict[str, Any] = {}
    teacher_parts: list[SectionRef] = []
    with_tail = 0  # complete teacher sections that hold the teacher's exact tail (tail_logp, format version 2)
    counted: dict[tuple[str, str], dict] = {}  # (split, set) -> counts over complete parts
    for ref, section_attrs in store.complete_sections():  # a set's base comes before its sections
        if ref.section != fmt.BASE:
            counted[(ref.split, ref.sequence_set)]["parts_complete"][ref.section] += 1
            if ref.section == fmt.SECTION_TEACHER:
                teacher_parts.append(ref)
                with_tail += fmt.ARRAY_TAIL_LOGP in (section_attrs.get("checksums") or {})
            continue
        entry = counted.setdefault((ref.split, ref.sequence_set), {
            "examples": 0, "sequences": 0, "response_tokens": 0, "tokens": 0,
            "parts_complete": {section: 0 for section in (fmt.BASE,) + fmt.SECTIONS}})
        rows = section_attrs.get("rows", {})
        start, stop = store.part_range(ref.split, ref.part)
        entry["parts_complete"][fmt.BASE] += 1
        entry["examples"] += (int(section_attrs.get("example_stop", stop))
                              - int(section_attrs.get("example_start", start)))
        entry["sequences"] += int(rows.get(fmt.AXIS_SEQUENCE, 0))
        entry["tokens"] += int(rows.get(fmt.AXIS_TOKEN, 0))
        if fmt.AXIS_RESPONSE in rows:
            entry["response_tokens"] += int(rows[fmt.AXIS_RESPONSE])
        else:  # written before base sections recorded their response rows
            offsets = store.read_section(ref.split, ref.part, ref.sequence_set, fmt.BASE,
                                         [fmt.ARRAY_RESPONSE_OFFSETS])
            entry["response_tokens"] += int(offsets[fmt.ARRAY_RESPONSE_OFFSETS][-1])
    unfinished = []  # sections a run wrote unfinished (store.format "unfinished"): not counted as complete
    for ref, section_attrs in store.unfinished_sections():
        left = section_attrs.get(fmt.ATTR_UNFINISHED) or {}
        unfinished.append({"section": ref.path, "reason": left.get("reason")})
        entry = counted.get((ref.split, ref.sequence_set))
        if entry is not None:
            entry.setdefault("parts_unfinished", {})
            entry["parts_unfinished"][ref.section] = entry["parts_unfinished"].get(ref.section, 0) + 1
    total_response = 0
    sizes = store.files.sizes()  # one listing for every split and the total
    for split in store.splits():
        num_parts = store.num_parts(split)
        sets = {sequence_set: {**counted[(split, sequence_set)], "parts_total": num_parts}
                for sequence_set in fmt.SEQUENCE_SETS if (split, sequence_set) in counted}
        total_response += sum(s["response_tokens"] for s in sets.values())
        nbytes = sum(size for path, size in sizes.items() if path.startswith(f"{split}/"))
        split_response = sum(s["response_tokens"] for s in sets.values())
        splits[split] = {
            "num_examples": store.num_examples(split),
            "num_parts": num_parts,
            "dataset": attrs["layout"]["splits"][split].get("dataset"),
            "sets": sets,
            "sequences": sum(s["sequences"] for s in sets.values()),
            "response_tokens": split_response,
            "tokens": sum(s["tokens"] for s in sets.values()),
            "bytes_on_disk": nbytes,
            "bytes_per_response_token": (nbytes / split_response) if split_response else None,
        }
    info["splits"] = splits
    info["unfinished"] = unfinished
    info["top_k"], info["top_k_from"] = _top_k(store, teacher_parts)
    info["teacher_tail"] = {"teacher_sections": len(teacher_parts), "with_tail_logp": with_tail}
    sampled = store.pass_record(fmt.PASS_PAIRS_TEACHER)  # --tail-samples: recorded on the pairs' teacher only
    if sampled is not None and sampled.settings.get("tail_samples"):
        info["tail_samples"] = {"per_token": sampled.settings["tail_samples"],
                                "seed": sampled.settings.get("tail_seed"), "pass": fmt.PASS_PAIRS_TEACHER}
    nbytes = sum(sizes.values())
    info["bytes_on_disk"] = nbytes
    info["response_tokens"] = total_response
    info["bytes_per_response_token"] = (nbytes / total_response) if total_response else None
    return info


# -- text --------------------------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _flat(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        out = []
        for key, inner in value.items():
            out.extend(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        return [(prefix, json.dumps(value))]
    return [(prefix, str(value))]


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    # text columns left-aligned, numbers right-aligned
    numeric = [all(str(r[i]).replace(",", "").replace(".", "").replace("/", "").replace("-", "").isdigit()
                   or str(r[i]) in ("-", "") for r in rows) and i > 0 for i in range(len(header))]

    def line(cells):
        return indent + "  ".join(str(c).rjust(w) if num else str(c).ljust(w)
                                  for c, w, num in zip(cells, widths, numeric)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_info(info: Mapping) -> str:
    """A readable multi-line summary of :func:`store_info`'s dictionary."""
    out: list[str] = []
    fmt_info = info.get("format", {})
    created = info.get("created_with") or {}
    out.append(f"store        {info['location']}")
    out.append(f"format       {fmt_info.get('name')} version {fmt_info.get('version')}"
               + (f" (written by {created.get('package')} {created.get('version')}, zarr {created.get('zarr')}"
                  f"{', ' + info['created_at'] if info.get('created_at') else ''})" if created else ""))
    tok = info.get("tokenizer") or {}
    out.append(f"tokenizer    {tok.get('name')}  hash {tok.get('hash')}")
    cross = info.get(fmt.ATTR_CROSS_TOKENIZER) or {}
    if cross:  # the teacher had another tokenizer: its signals were aligned by text to the store's
        teacher, mapped = cross.get("teacher_tokenizer") or {}, cross.get("vocab_map") or {}
        out.append(f"teacher tok  {teacher.get('name')}  hash {teacher.get('hash')} (aligned by text; vocabulary map "
                   f"{mapped.get('mapped')} of {mapped.get('teacher_ids')} teacher ids, sha256 "
                   f"{str(mapped.get('sha256'))[:12]})")
    out.append(f"vocabulary   {info.get('vocab_size')} (token ids {info.get('token_id_dtype')})")
    out.append(f"top-K        {info.get('top_k') if info.get('top_k') is not None else '-'}"
               f"  (from {info.get('top_k_from')})")
    tail = info.get("teacher_tail") or {}
    if tail.get("teacher_sections"):
        out.append(f"tail bin     exact (tail_logp) in {tail['with_tail_logp']} of {tail['teacher_sections']} teacher "
                   f"sections; elsewhere 1 - sum(top-K)")
    samples = info.get("tail_samples")
    if samples:
        out.append(f"tail samples {samples['per_token']} per response token in {samples['pass']} (seed "
                   f"{samples['seed']}): KD estimates the tail's part of the full KL from them")
    out.append(f"part size    {info.get('examples_per_part')} examples")
    nbytes = info.get("bytes_on_disk", 0)
    bpt = info.get("bytes_per_response_token")
    out.append(f"on disk      {nbytes:,} bytes ({_human_bytes(nbytes)}); "
               f"{'%.1f' % bpt if bpt is not None else '-'} bytes per response token "
               f"over {info.get('response_tokens', 0):,} response tokens")

    out.append("")
    out.append("models")
    if info.get("models"):
        out += _table(["name", "hash", "passes"],
                      [[m["name"], m["hash"], ", ".join(m["passes"])] for m in info["models"]])
    else:
        out.append("  (none recorded)")

    out.append("")
    out.append("passes")
    if not info.get("passes"):
        out.append("  (none recorded)")
    for name, entry in info.get("passes", {}).items():
        out.append(f"  {name}")
        for key, value in _flat(entry.get("provenance", {})):
            out.append(f"    {key:<24} {value}")

    if info.get("provenance"):
        out.append("")
        out.append("provenance")
        for key, value in _flat(info["provenance"]):
            out.append(f"  {key:<26} {value}")

    out.append("")
    out.append("datasets")
    rows = []
    for split, split_info in info.get("splits", {}).items():
        dataset = split_info.get("dataset") or {}
        fingerprint = dataset.get("fingerprint", "-") if isinstance(dataset, Mapping) else "-"
        rest = ", ".join(f"{k}={v}" for k, v in dataset.items() if k not in ("name", "fingerprint")) \
            if isinstance(dataset, Mapping) else str(dataset)
        rows.append([split, str(dataset.get("name", "-") if isinstance(dataset, Mapping) else dataset),
                     str(fingerprint), rest or "-"])
    out += _table(["split", "dataset", "fingerprint", "other"], rows) if rows else ["  (no splits)"]

    out.append("")
    out.append("contents (complete parts only; '(split)' counts examples declared for the split)")
    rows = []
    for split, split_info in info.get("splits", {}).items():
        for sequence_set, counts in split_info["sets"].items():
            rows.append([split, sequence_set, f"{counts['examples']:,}", f"{counts['sequences']:,}",
                         f"{counts['response_tokens']:,}", f"{counts['tokens']:,}"])
        rows.append([split, "(split)", f"{split_info['num_examples']:,}", f"{split_info['sequences']:,}",
                     f"{split_info['response_tokens']:,}", f"{split_info['tokens']:,}"])
    out += _table(["split", "set", "examples", "sequences", "response tokens", "tokens"], rows) \
        if rows else ["  (nothing written)"]

    out.append("")
    out.append("parts complete / total" + (" (+ unfinished)" if info.get("unfinished") else ""))
    # a section is shown for a set once any part of that set (in any split) has it, complete or unfinished
    used = {(sequence_set, section) for split_info in info.get("splits", {}).values()
            for sequence_set, counts in split_info["sets"].items()
            for section, n in [*counts["parts_complete"].items(), *counts.get("parts_unfinished", {}).items()]
            if n > 0}
    sections = [fmt.BASE] + [section for section in fmt.SECTIONS if any(section == s for _, s in used)]
    rows = []
    for split, split_info in info.get("splits", {}).items():
        if not split_info["sets"]:
            rows.append([split, "-"] + [f"0/{split_info['num_parts']}"] + ["-"] * (len(sections) - 1))
        for sequence_set, counts in split_info["sets"].items():
            rows.append([split, sequence_set] + [
                f"{counts['parts_complete'].get(section, 0)}/{counts['parts_total']}"
                + (f" (+{counts['parts_unfinished'][section]})" if counts.get("parts_unfinished", {}).get(section)
                   else "")
                if section == fmt.BASE or (sequence_set, section) in used else "-"
                for section in sections])
    out += _table(["split", "set"] + sections, rows)
    if info.get("unfinished"):
        out.append("")
        out.append("unfinished sections (not complete: the command that writes them finishes them)")
        out += [f"  {entry['section']}: {entry['reason']}" for entry in info["unfinished"]]

    out.append("")
    out.append("bytes on disk by split")
    rows = [[split, f"{split_info['bytes_on_disk']:,}",
             "-" if split_info["bytes_per_response_token"] is None
             else f"{split_info['bytes_per_response_token']:.1f}"]
            for split, split_info in info.get("splits", {}).items()]
    out += _table(["split", "bytes", "bytes/response token"], rows)
    return "\n".join(out)
