"""Content keys: one sha256 per section naming everything that decides its numbers.

A section (or a set's base arrays) of one part is fully determined by a few
inputs: the model weights that computed it, the settings of its pass, and what
it was computed on. Its *content key* hashes exactly those inputs, so that two
stores made from the same inputs hold the same key for the same section, and a
changed input changes the key of every section it affects (and of no other).
Writers record the key in the section's group attributes (:data:`ATTR`);
``precompute ... --reuse-from`` looks keys up in other stores and copies a
section whose key matches instead of computing it.

Every key is computable without loading a model: weights are named by the
sha256 of their files (:func:`lm.models.weights_hash`), rows and prompts by
their text or their token ids (the tokenizer is cheap to load), and whatever a
section is computed *on* by the checksums the store already holds for it (a
teacher section depends on its base's checksums, which were written or reused
before it).

This module is the one definition of what goes into each kind of key: the
functions below are the code, and :data:`store.format.KEY_INPUTS` (imported
here as :data:`KEY_INPUTS`) says it in words, in the format's description that
every store carries. The words live in the format module so that it imports
nothing of the project.

Canonical form: a key is the sha256 hex of the UTF-8 JSON (keys sorted, no
spaces, no NaN) of ``{"key_version", "kind", "layout", "example_range",
"inputs"}``. ``layout`` is what makes a section's numbers mean the same in two
stores: the format version, the token id dtype and the tokenizer's hash. The
format version is the last one that changed the numbers
(:func:`store.format.key_format_version`): format 4 changed only their
encoding, so its keys are format 3's, and a section found in a store of the
other version is copied re-encoded (:func:`store.copy.copy_section`).
``example_range`` is the part's ``[start, stop)``. ``inputs`` depends on the kind.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import format as fmt
from .format import DESCRIPTIVE_SETTINGS, KEY_INPUTS

__all__ = ["KEY_VERSION", "ATTR", "REUSED_ATTR", "KEY_INPUTS", "DESCRIPTIVE_SETTINGS", "digest", "layout",
           "key_settings", "rows_digest", "ids_digest", "pairs_base_key", "generated_base_key",
           "samples_base_key", "section_key"]

#: bumped whenever what goes into a key changes (old keys then never match new ones)
KEY_VERSION = 1
#: the section attribute holding the key
ATTR = "content_key"
#: the section attribute a reused section gets: the (redacted) store and section it was copied from
REUSED_ATTR = "reused_from"

def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def digest(value: Any) -> str:
    """sha256 hex of ``value``'s canonical JSON."""
    return hashlib.sha256(_canonical(value)).hexdigest()


def layout(format_version: int, token_id_dtype: str, tokenizer_sha256: str) -> dict:
    """What makes a section's numbers mean the same thing in two stores (``format_version`` as keys record it:
    :func:`store.format.key_format_version`)."""
    return {"format_version": int(format_version), "token_id_dtype": str(token_id_dtype),
            "tokenizer_sha256": str(tokenizer_sha256)}


def key_settings(record: Mapping) -> dict:
    """A pass record's settings as they enter a key: JSON values, no model, no :data:`DESCRIPTIVE_SETTINGS`."""
    settings = json.loads(json.dumps({k: v for k, v in dict(record).items() if k != "model"}))
    for dotted in DESCRIPTIVE_SETTINGS:
        *parents, name = dotted.split(".")
        holder = settings
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(name, None)
    return settings


def rows_digest(rows: Iterable[Mapping]) -> str:
    """sha256 of dataset rows, each ``{"index", "prompt", "chosen", "rejected"}``, in the order given."""
    return digest([[int(r["index"]), r["prompt"], r.get("chosen"), r.get("rejected")] for r in rows])


def ids_digest(sequences: Iterable[tuple[int, Sequence[int]]]) -> str:
    """sha256 of ``(example index, token ids)`` pairs, in the order given (ids as little-endian int64)."""
    sha = hashlib.sha256()
    for index, ids in sequences:
        values = np.asarray(ids, dtype="<i8")
        sha.update(f"{int(index)}:{values.shape[0]}|".encode())
        sha.update(values.tobytes())
    return sha.hexdigest()


def _key(kind: str, layout_: Mapping, example_range: Sequence[int], inputs: Mapping) -> str:
    start, stop = example_range
    return digest({"key_version": KEY_VERSION, "kind": kind, "layout": dict(layout_),
                   "example_range": [int(start), int(stop)], "inputs": dict(inputs)})


def pairs_base_key(*, layout: Mapping, example_range: Sequence[int], encode: Mapping,
                   rows: Iterable[Mapping]) -> str:
    """The dataset's chosen and rejected of one part, tokenised (``pairs`` base)."""
    return _key(fmt.PASS_PAIRS_BASE, layout, example_range,
                {"encode": key_settings(encode), "rows_sha256": rows_digest(rows)})


def generated_base_key(*, layout: Mapping, example_range: Sequence[int], model_sha256: str, settings: Mapping,
                       eot_ids: Sequence[int], prompt_ids: Iterable[tuple[int, Sequence[int]]]) -> str:
    """The generating model's answers to one part's prompts (``generated`` base)."""
    return _key(fmt.PASS_GENERATED_BASE, layout, example_range, {
        "model_sha256": model_sha256, "settings": key_settings(settings),
        "end_of_turn_ids": [int(i) for i in eot_ids], "prompt_ids_sha256": ids_digest(prompt_ids)})


def samples_base_key(*, layout: Mapping, example_range: Sequence[int], model_sha256: str, settings: Mapping,
                     part_seed: int, device: str, generation_batch: int, eot_ids: Sequence[int],
                     prompts_sha256: str, prompt_ids: Iterable[tuple[int, Sequence[int]]]) -> str:
    """One part's groups of sampled responses (``samples`` base)."""
    return _key(fmt.PASS_SAMPLES_BASE, layout, example_range, {
        "model_sha256": model_sha256, "settings": key_settings(settings), "part_seed": int(part_seed),
        "device": str(device).split(":", 1)[0], "generation_batch": int(generation_batch),
        "end_of_turn_ids": [int(i) for i in eot_ids], "prompts_sha256": prompts_sha256,
        "prompt_ids_sha256": ids_digest(prompt_ids)})


def section_key(kind: str, *, layout: Mapping, example_range: Sequence[int], model_sha256: str | None,
                settings: Mapping, base_checksums: Mapping[str, str],
                reads: Mapping[str, Mapping[str, str]] | None = None, prompts_sha256: str | None = None,
                part_seed: int | None = None) -> str:
    """What one model computed over a set's sequences (``kind`` is ``<set>/<section>``)."""
    inputs: dict = {"model_sha256": model_sha256, "settings": key_settings(settings),
                    "base_checksums": dict(base_checksums), "reads": {k: dict(v) for k, v in (reads or {}).items()}}
    if prompts_sha256 is not None:
        inputs["prompts_sha256"] = prompts_sha256
    if part_seed is not None:
        inputs["part_seed"] = int(part_seed)
    return _key(kind, layout, example_range, inputs)
