"""Reading a store example by example: streaming with bounded memory, or by index.

An :class:`Example` gathers everything a split holds for one example index:
its sequences from each requested set (chosen and rejected from ``pairs``, the
student's own answer from ``generated``, a group from ``samples``) with the
signals of the requested sections, as numpy views into the part they came from.

Streaming loads one part at a time (a few MB), shuffles the order of parts per
epoch and mixes examples through a fixed-size buffer, so memory is bounded by
``buffer_examples`` and the part size, never by the store's size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence as Seq

import numpy as np

from . import format as fmt
from .teacher_store import IncompleteSection, StoreError, TeacherStore

Needs = Mapping[str, Seq[str]]  # sequence set -> sections wanted, e.g. {"pairs": ["teacher"]}


@dataclass
class Sequence:
    """One response (with its prompt) and the signals stored for it."""

    example_index: int
    sequence_set: str
    role: int
    input_ids: np.ndarray  # [L] prompt then response
    prompt_length: int
    response: dict[str, np.ndarray] = field(default_factory=dict)  # "teacher/topk_logp" -> [r, K]
    scalars: dict[str, float] = field(default_factory=dict)  # "teacher/logp_sum" -> float

    @property
    def response_length(self) -> int:
        return int(self.input_ids.shape[0] - self.prompt_length)

    @property
    def role_name(self) -> str:
        return fmt.role_name(self.role)


@dataclass
class Example:
    split: str
    example_index: int
    sequences: list[Sequence]
    group: dict[str, np.ndarray] = field(default_factory=dict)  # "teacher_mcq/pair_prob" -> [P, 2]

    def of(self, sequence_set: str, role: int | None = None) -> list[Sequence]:
        return [s for s in self.sequences
                if s.sequence_set == sequence_set and (role is None or s.role == role)]

    def one(self, sequence_set: str, role: int) -> Sequence:
        found = self.of(sequence_set, role)
        if len(found) != 1:
            raise StoreError(f"example {self.example_index}: expected one {fmt.role_name(role)} sequence in "
                             f"{sequence_set!r}, found {len(found)}")
        return found[0]

    @property
    def num_response_tokens(self) -> int:
        return sum(s.response_length for s in self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(int(s.input_ids.shape[0]) for s in self.sequences)


def _section_names(sequence_set: str, section: str) -> list[str]:
    return [s.name for s in fmt.arrays_of(sequence_set, section)]


def load_part(store: TeacherStore, split: str, part: int, needs: Needs) -> list[Example]:
    """All examples of one part that have every requested set, in example order."""
    per_example: dict[int, list[Sequence]] = {}
    groups: dict[int, dict[str, np.ndarray]] = {}
    present: dict[int, set[str]] = {}
    for sequence_set, sections in needs.items():
        base = store.read_section(split, part, sequence_set, fmt.BASE)
        signals = {sec: store.read_section(split, part, sequence_set, sec) for sec in sections}
        tok_off, resp_off = base["token_offsets"], base["response_offsets"]
        input_ids = base["input_ids"]
        example_index, role, prompt_length = base["example_index"], base["role"], base["prompt_length"]
        response_arrays, sequence_arrays, pair_arrays = [], [], []
        for sec in sections:
            for spec in fmt.arrays_of(sequence_set, sec):
                key = (f"{sec}/{spec.name}", signals[sec][spec.name])
                if spec.axis == fmt.AXIS_RESPONSE:
                    response_arrays.append(key)
                elif spec.axis == fmt.AXIS_SEQUENCE:
                    sequence_arrays.append(key)
                elif spec.axis == fmt.AXIS_PAIR:
                    pair_arrays.append(key)
        for s in range(example_index.shape[0]):
            r0, r1 = int(resp_off[s]), int(resp_off[s + 1])
            seq = Sequence(
                example_index=int(example_index[s]),
                sequence_set=sequence_set,
                role=int(role[s]),
                input_ids=input_ids[int(tok_off[s]):int(tok_off[s + 1])],
                prompt_length=int(prompt_length[s]),
                response={name: values[r0:r1] for name, values in response_arrays},
                scalars={name: float(values[s]) for name, values in sequence_arrays},
            )
            per_example.setdefault(seq.example_index, []).append(seq)
            present.setdefault(seq.example_index, set()).add(sequence_set)
        if sequence_set == fmt.SET_SAMPLES and pair_arrays:
            offsets = signals[fmt.SECTION_TEACHER_MCQ]["group_pair_offsets"]
            for g, ex in enumerate(base["group_example_index"]):
                p0, p1 = int(offsets[g]), int(offsets[g + 1])
                groups[int(ex)] = {name: values[p0:p1] for name, values in pair_arrays}
    wanted = set(needs)
    return [
        Example(split, ex, per_example[ex], groups.get(ex, {}))
        for ex in sorted(per_example)
        if present[ex] >= wanted
    ]


def check_complete(store: TeacherStore, split: str, needs: Needs) -> list[str]:
    """Names of the (part, set, section) a read of ``needs`` would miss; empty when all there."""
    missing = []
    for part in range(store.num_parts(split)):
        for sequence_set, sections in needs.items():
            for section in (fmt.BASE, *sections):
                if not store.is_complete(split, part, sequence_set, section):
                    missing.append(fmt.group_path(split, part, sequence_set, section))
    return missing


class ExampleStream:
    """Examples of one split, streamed part by part.

    ``shuffle`` permutes the parts per epoch and draws examples at random from
    a buffer of ``buffer_examples``; the same ``seed`` and epoch give the same
    order. ``skip`` drops that many examples from the start (resuming).
    """

    def __init__(self, store: TeacherStore, split: str, needs: Needs, *, shuffle: bool = True,
                 seed: int = 0, buffer_examples: int = 512):
        self.store, self.split, self.needs = store, split, {k: list(v) for k, v in needs.items()}
        self.shuffle, self.seed, self.buffer_examples = shuffle, seed, max(1, buffer_examples)
        missing = check_complete(store, split, self.needs)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise IncompleteSection(f"{store.location}: not complete: {shown}")

    def part_order(self, epoch: int) -> list[int]:
        parts = list(range(self.store.num_parts(self.split)))
        if self.shuffle:
            np.random.default_rng([self.seed, epoch]).shuffle(parts)
        return parts

    def __iter__(self) -> Iterator[Example]:
        return self.iterate(epoch=0)

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, epoch, 1])
        buffer: list[Example] = []
        produced = 0
        for part in self.part_order(epoch):
            for example in load_part(self.store, self.split, part, self.needs):
                if not self.shuffle:
                    if produced >= skip:
                        yield example
                    produced += 1
                    continue
                if len(buffer) < self.buffer_examples:
                    buffer.append(example)
                    continue
                i = int(rng.integers(len(buffer)))
                out, buffer[i] = buffer[i], example
                if produced >= skip:
                    yield out
                produced += 1
        while buffer:
            out = buffer.pop(int(rng.integers(len(buffer))))
            if produced >= skip:
                yield out
            produced += 1

    def count(self) -> int:
        return sum(len(load_part(self.store, self.split, p, self.needs))
                   for p in range(self.store.num_parts(self.split)))


class ExampleReader:
    """Random access by example index, keeping the last few parts in memory."""

    def __init__(self, store: TeacherStore, split: str, needs: Needs, cache_parts: int = 2):
        self.store, self.split, self.needs = store, split, {k: list(v) for k, v in needs.items()}
        self._cache: OrderedDict[int, dict[int, Example]] = OrderedDict()
        self._cache_parts = cache_parts

    def __getitem__(self, example_index: int) -> Example:
        part = self.store.part_of_example(self.split, example_index)
        if part not in self._cache:
            self._cache[part] = {e.example_index: e for e in load_part(self.store, self.split, part, self.needs)}
            while len(self._cache) > self._cache_parts:
                self._cache.popitem(last=False)
        self._cache.move_to_end(part)
        try:
            return self._cache[part][example_index]
        except KeyError:
            raise KeyError(f"{self.store.location}: example {example_index} of split {self.split!r} has no "
                           f"sequences in {', '.join(self.needs)} (skipped when the store was written)")
