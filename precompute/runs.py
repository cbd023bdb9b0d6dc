"""What ``precompute teacher`` and ``precompute sample`` share: opening the store, provenance, the summary.

Both commands resolve a tokenizer, open (or create) the store with it, record
how rows become token ids (the ``encode`` pass), count what they did in a
:class:`Summary`, and finish by refreshing the manifest and appending the
summary to the store's ``runs``. Group counts of sampled sets
(:func:`record_sample_counts`) and the fingerprint of the prompts a part's
groups answer (:func:`prompts_fingerprint`) are read by both.

Reuse (``--reuse-from LOCATION``, repeatable, and :data:`REUSE_ENV`): before a
step computes a part, :class:`Reuse` looks its content key (:mod:`store.keys`)
up in the stores found at those locations and copies a matching section,
verified, instead (:func:`store.copy.copy_section`); the summary counts the
parts reused per location. Locations, storage options and anything else that
may hold a credential reach the summary, the store and the terminal only
redacted (:func:`store.locations.redact_text` for error messages).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from lm import chat, models
from store import PassRecord, TeacherStore
from store import format as fmt
from store import keys
from store.format import SectionRef
from store.locations import is_url, parse_storage_options, redact_url
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
    reused: list[dict] = field(default_factory=list)  # {"step", "from" (redacted), "parts"}: parts copied

    def __post_init__(self):
        self.store = redact_url(self.store)  # printed and appended to the store's runs: no credentials

    def add_reused(self, step: str, location: str, parts: int = 1) -> None:
        """Count ``parts`` of ``step`` reused from the store at ``location``."""
        where = redact_url(location)
        for entry in self.reused:
            if entry["step"] == step and entry["from"] == where:
                entry["parts"] += parts
                return
        self.reused.append({"step": step, "from": where, "parts": parts})

    def reused_parts(self, step: str) -> int:
        return sum(entry["parts"] for entry in self.reused if entry["step"] == step)

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
        for entry in self.reused:
            out.append(f"  {entry['step']:<22} {entry['parts']:>4} parts reused from {entry['from']}")
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
    if any(step["parts_done"] for step in summary.steps) or summary.reused:
        record = json.loads(json.dumps(summary.__dict__))
        store.update_attrs(lambda a: a.setdefault("runs", []).append(
            {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}))
    return summary


def free_memory() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- reuse (--reuse-from)

#: a team's default reuse locations: commas between locations; an item without ``://`` may also be a
#: list of paths joined by os.pathsep (as PATH is)
REUSE_ENV = "DISTILL_REUSE_FROM"

#: keywords of :func:`lm.options.setting` for the commands' ``reuse_from`` and ``reuse_options`` fields
REUSE_FROM_CLI = dict(
    help=f"Copy sections whose content key matches from the stores at or under LOCATION (a store, folder or "
         f"bucket prefix; repeatable) instead of computing them; ${REUSE_ENV} adds a team's default.",
    flag="--reuse-from", multiple=True, metavar="LOCATION", parse=lambda values: tuple(values or ()))
REUSE_OPTION_CLI = dict(
    help="fsspec option for the --reuse-from locations, KEY=VALUE (repeatable) [the --storage-option ones, for "
         "locations of --out's protocol]; never written anywhere.",
    flag="--reuse-option", multiple=True, metavar="KEY=VALUE", parse=parse_storage_options)


def split_locations(text: str | None) -> list[str]:
    """The locations of a :data:`REUSE_ENV` value (blank items dropped)."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if "://" in item:
            out.append(item)
        else:
            out.extend(p.strip() for p in item.split(os.pathsep) if p.strip())
    return out


def reuse_locations(given: Iterable[str]) -> list[str]:
    """``--reuse-from`` locations first, then :data:`REUSE_ENV`'s, each once."""
    return list(dict.fromkeys([*map(str, given or ()), *split_locations(os.environ.get(REUSE_ENV))]))


def _protocol(location: str) -> str:
    return location.split("://", 1)[0] if is_url(location) else "file"


def reuse_storage_options(location: str, out: str, storage_options: Mapping | None,
                          reuse_options: Mapping | None) -> dict:
    """fsspec options for a reuse location: the ``--reuse-option`` ones when given, else the ``--storage-option``
    ones where the location has ``--out``'s protocol (an S3 endpoint means nothing to an HTTP server), else none."""
    if reuse_options:
        return dict(reuse_options)
    return dict(storage_options or {}) if _protocol(location) == _protocol(out) else {}


class Reuse:
    """The sections other stores hold for this run: found by content key, copied verified, counted.

    Built with the run's store and reuse locations; the stores there are searched once, on the first
    :meth:`take` (a run with nothing to compute never lists them). With no location, :meth:`take` is False.
    """

    def __init__(self, target: TeacherStore, locations: Sequence[str], summary: Summary, *,
                 out: str, storage_options: Mapping | None = None, reuse_options: Mapping | None = None):
        self.target = target
        self.summary = summary
        self.locations = [(loc, reuse_storage_options(loc, out, storage_options, reuse_options))
                          for loc in locations]
        self._index = None

    @classmethod
    def for_run(cls, target: TeacherStore, config, summary: Summary) -> "Reuse":
        """From a command's config: its ``reuse_from`` (and :data:`REUSE_ENV`), ``storage_options`` and
        ``reuse_options``."""
        return cls(target, reuse_locations(getattr(config, "reuse_from", ())), summary, out=config.out,
                   storage_options=config.storage_options, reuse_options=getattr(config, "reuse_options", None))

    def __bool__(self) -> bool:
        return bool(self.locations)

    @property
    def index(self):
        if self._index is None:
            from store.catalog import SectionIndex

            self._index = SectionIndex(self.locations, self.target.key_layout(), exclude=self.target.location).build()
            for seen in self._index.found:
                problems = "; ".join(seen["problems"])
                self.summary.notes.append(
                    f"  reuse: {seen['location']}: {seen['stores']} store(s), {seen['sections']} keyed "
                    f"section(s) usable{'; ' + problems if problems else ''}")
        return self._index

    def take(self, step: str, ref: SectionRef, key: str | None) -> bool:
        """Copy the section with content key ``key`` into ``ref`` of the run's store, if another store has it.

        False when none has it, or when the copy fails its checks (the section is then computed: a note
        says so).
        """
        if not self.locations or not key:
            return False
        found = self.index.find(key)
        if found is None:
            return False
        from store.copy import copy_section

        origin = redact_url(found.store.location)
        try:
            attrs = found.attrs(key)
            if attrs is None:  # changed or removed since its store listed it
                return False
            copy_section(found.store, self.target, found.ref, attrs, to=ref, make_parents=True,
                         extra_attrs={keys.REUSED_ATTR: {"store": origin, "section": found.ref.path},
                                      "reused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        except Exception as exc:  # noqa: BLE001 - a cache that fails is a part to compute, never a failed run
            self.summary.notes.append(f"  reuse: {ref.path} from {origin} failed ({type(exc).__name__}); "
                                      f"computed instead")
            return False
        self.summary.add_reused(step, found.store.location)
        return True

    def take_parts(self, step: str, sequence_set: str, section: str, parts: Sequence[tuple[str, int]],
                   key_of: Callable[[str, int], str | None], before: Callable[[], None] | None = None) -> list:
        """``parts`` (split, part) whose section could not be reused; ``before()`` runs once, before the first
        copy (to record the pass the copied sections belong to)."""
        if not self.locations:
            return list(parts)
        left, ready = [], False
        for split, part in parts:
            key = key_of(split, part)
            if key and not ready and self.index.find(key) is not None:
                ready = True
                if before is not None:
                    before()
            if not (key and self.take(step, SectionRef(split, part, sequence_set, section), key)):
                left.append((split, part))
        return left
