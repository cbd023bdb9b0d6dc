"""What a ``precompute`` run did: each step's result per part, the summary printed and kept in the store.

Every command counts what it did in a :class:`Summary` (examples and skipped
rows per split, per step the parts written or already complete, tokens and
seconds, parts reused from other stores, notes) and ends with
:func:`finish_summary`, which refreshes the store's manifest and appends the
summary to the store's ``runs``. Locations reach the summary only redacted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from store import TeacherStore
from store import format as fmt
from store.locations import redact_url


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
