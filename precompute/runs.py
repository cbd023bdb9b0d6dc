"""What ``precompute teacher`` and ``precompute sample`` share: opening the store, provenance, the summary.

Both commands resolve a tokenizer, open (or create) the store with it, record
how rows become token ids (the ``encode`` pass), count what they did in a
:class:`Summary`, and finish by refreshing the manifest and appending the
summary to the store's ``runs``. Group counts of sampled sets
(:func:`record_sample_counts`) and the fingerprint of the prompts a part's
groups answer (:func:`prompts_fingerprint`) are read by both.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lm import chat, models
from store import PassRecord, TeacherStore
from store import format as fmt
from store.provenance import PASS_ENCODE, TokenizerRecord

from .dataset import Row, dataset_identity


@dataclass
class Summary:
    """What a run did, printed at the end and appended to the store's ``runs`` attribute."""

    store: str
    examples: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    response_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # extra lines from a pass (PAD's counts, bias, cost)

    def step_record(self, name: str, parts_skipped: int) -> dict:
        """A new step line of the summary (parts written, tokens and seconds are added as the step runs)."""
        record = {"step": name, "parts_done": 0, "parts_skipped": parts_skipped, "tokens": 0, "seconds": 0.0}
        self.steps.append(record)
        return record

    def lines(self) -> list[str]:
        out = [f"store: {self.store}"]
        for split, n in self.examples.items():
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.get(split, {}).items())) or "none"
            trunc = ", ".join(f"{k} {v}" for k, v in sorted(self.truncated.get(split, {}).items()) if v) or "none"
            out.append(f"  {split}: {n} examples; skipped: {skipped}; truncated: {trunc}")
        for step in self.steps:
            rate = step["tokens"] / step["seconds"] if step["seconds"] > 0 else 0.0
            out.append(f"  {step['step']:<22} {step['parts_done']:>4} parts written, {step['parts_skipped']:>4} "
                       f"already complete, {step['tokens']:>8} tokens, {step['seconds']:7.1f} s, {rate:8.1f} tok/s")
        if self.response_tokens:
            out.append(f"  {self.bytes_on_disk / 1e6:.2f} MB on disk, "
                       f"{self.bytes_on_disk / self.response_tokens:.1f} bytes per response token "
                       f"({self.response_tokens} response tokens)")
        out.extend(self.notes)
        out.append(f"  total time {self.seconds:.1f} s")
        return out


@dataclass(frozen=True)
class StepResult:
    """What one step computed for one part: the section's arrays and what to count."""

    arrays: dict[str, np.ndarray]
    tokens: int  # tokens the model went through (the progress unit)
    attrs: dict | None = None  # extra attributes of the written section
    groups: int = 0  # sampled groups covered (PAD's cost per group)


def vocab_size_of(info: models.ModelInfo, tokenizer) -> int:
    """Ids the store must hold: the model's output size or the tokenizer's length, whichever is larger."""
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(models.model_dir(info)).vocab_size)
    return max(vocab, len(tokenizer))


def encode_record(tokenizer, tokenizer_hash: str, max_length: int) -> PassRecord:
    """The ``encode`` pass: how dataset rows became token ids."""
    template = tokenizer.chat_template or "fallback"
    return PassRecord(settings={
        "max_length": max_length,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "tokenizer_sha256": tokenizer_hash,
    })


def open_store(out: str, *, model: models.ModelInfo, tokenizer, dataset: str | None, max_length: int,
               examples_per_part: int, storage_options: dict | None) -> TeacherStore:
    """Create the store at ``out`` (or open it, refusing another tokenizer or part size) and record ``encode``."""
    tokenizer_hash = chat.tokenizer_hash(tokenizer)
    store = TeacherStore.create(
        out, tokenizer=TokenizerRecord(model.name, tokenizer_hash).to_dict(),
        vocab_size=vocab_size_of(model, tokenizer), examples_per_part=examples_per_part,
        storage_options=storage_options, provenance={"dataset": dataset_identity(dataset)},
    )
    store.register_pass(PASS_ENCODE, encode_record(tokenizer, tokenizer_hash, max_length).to_dict())
    return store


def prompts_fingerprint(rows: Sequence[Row]) -> str:
    """sha256 of the (index, prompt messages) the samples of a part answer."""
    payload = [[r.index, r.prompt] for r in rows]
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def require_samples(out: str, splits: Sequence[str], storage_options: dict | None, make: str) -> TeacherStore:
    """The store at ``out`` opened for writing, refused (before any model loads) unless every part of every
    split in ``splits`` has complete sampled groups; ``make`` says which command writes them."""
    store = TeacherStore(out, mode="a", storage_options=storage_options)
    if not store.exists():
        raise ValueError(f"{out}: no store here; sampled groups are needed first: run {make}")
    missing = []
    for split in splits:
        if split not in store.splits():
            missing.append(f"split {split!r}")
            continue
        parts = [p for p in range(store.num_parts(split)) if not store.is_complete(split, p, fmt.SET_SAMPLES)]
        if parts:
            missing.append(f"{split} part(s) {', '.join(map(str, parts))}")
    if missing:
        raise ValueError(f"{out}: no sampled groups for {'; '.join(missing)}; run {make} first")
    store.check()
    return store


def check_samples_match(store: TeacherStore, prompt_rows: dict, out: str) -> None:
    """The rows given now must be the prompts the groups were sampled for (their text is shown to a judge)."""
    for split, loaded in prompt_rows.items():
        if store.num_examples(split) != loaded.total_rows:
            raise ValueError(f"{out}: split {split!r} was sampled from {store.num_examples(split)} "
                             f"rows, this run has {loaded.total_rows}; use the same --dataset, --limit")
        for part in range(store.num_parts(split)):
            start, stop = store.part_range(split, part)
            rows = [r for r in loaded.rows if start <= r.index < stop]
            stored = (store.section_attrs(split, part, fmt.SET_SAMPLES) or {}).get("prompts_sha256")
            if stored != prompts_fingerprint(rows):
                raise ValueError(f"{out}: the samples of {split} part {part} answer other prompts than the rows "
                                 f"given now; use the --dataset, --limit and --column of the `precompute sample` run")


def sample_counts(store: TeacherStore, split: str) -> dict:
    """Totals over a split's complete ``samples`` parts: prompts, groups, drops by reason, truncation."""
    total = {"prompts": 0, "groups": 0, "dropped": {}, "truncated_prompts": 0, "parts": 0}
    for part in store.complete_parts(split, fmt.SET_SAMPLES):
        attrs = store.section_attrs(split, part, fmt.SET_SAMPLES) or {}
        total["parts"] += 1
        total["prompts"] += int(attrs.get("prompts", 0))
        total["groups"] += int(attrs.get("groups", 0))
        total["truncated_prompts"] += int(attrs.get("truncated_prompts", 0))
        for reason, count in (attrs.get("dropped") or {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + int(count)
    return total


def record_sample_counts(store: TeacherStore, splits: Sequence[str]) -> dict[str, dict]:
    """Write each split's totals to ``layout.splits.<split>.samples``; returns them."""
    counts = {split: sample_counts(store, split) for split in splits}

    def mutate(attrs):
        for split, total in counts.items():
            attrs["layout"]["splits"].setdefault(split, {})["samples"] = total

    store.update_attrs(mutate)
    return counts


def finish_summary(store: TeacherStore, splits, summary: Summary) -> Summary:
    """Manifest, size on disk, and the run's summary appended to the root attributes.

    A run that wrote no part leaves the store as it found it (a finished store may
    sit on a read-only location): the manifest is then unchanged and no run is appended.
    """
    store.refresh_manifest()
    store.clean_leftovers()
    summary.bytes_on_disk = store.nbytes_on_disk()
    summary.response_tokens = sum(int(attrs["rows"]["response"])
                                  for _ref, attrs in store.walk_sections(splits, sections=(fmt.BASE,))
                                  if attrs and attrs.get("complete"))
    if any(step["parts_done"] for step in summary.steps):
        record = json.loads(json.dumps(summary.__dict__))
        store.update_attrs(lambda a: a.setdefault("runs", []).append(
            {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}))
    return summary


def free_memory() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
