"""The store a ``precompute`` command writes: created or opened, checked for the sampled groups a step reads.

:func:`open_store` creates the store (or opens it, refusing another tokenizer
or part size) and records the ``encode`` pass; :func:`require_samples` opens a
store whose every part has ``precompute sample``'s groups, before any model
loads, and :func:`check_samples_match` refuses rows other than the ones the
groups were sampled for. :func:`record_sample_counts` writes the groups' totals
per split to the store's layout.
"""

from __future__ import annotations

from typing import Sequence

from lm import chat, models
from store import TeacherStore
from store import format as fmt
from store.provenance import PASS_ENCODE, TokenizerRecord

from .dataset import dataset_identity
from .provenance import encode_record, prompts_fingerprint


def vocab_size_of(info: models.ModelInfo, tokenizer) -> int:
    """Ids the store must hold: the model's output size or the tokenizer's length, whichever is larger."""
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(models.model_dir(info)).vocab_size)
    return max(vocab, len(tokenizer))


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
