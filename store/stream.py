"""Reading a store example by example: streaming with bounded memory, or by index.

An :class:`Example` gathers everything a split holds for one example index:
its sequences from each requested set (chosen and rejected from ``pairs``, the
student's own answer from ``generated``, a group from ``samples``) with the
signals of the requested sections, as small numpy arrays of its own (copies,
so that holding an example never holds the whole part it came from).

Streaming loads one part at a time (a few MB), shuffles the order of parts per
epoch and mixes examples through a fixed-size buffer, so memory is bounded by
``buffer_examples`` and the part size, never by the store's size.

Parts are read by ``_read_part``: for the plain chunk layouts this project
writes (regular chunks along rows, the numcodecs/zstd codecs of
:mod:`store.format`) it fetches a part's chunk files in one ``fs.cat`` and
decodes them with numcodecs, which takes about a quarter less CPU than zarr's
asynchronous codec pipeline and gives the same bytes; anything else (another
layout or codec, a missing chunk file) is read through zarr.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence as Seq

import numpy as np

from . import format as fmt
from .teacher_store import IncompleteSection, SectionRef, StoreError, TeacherStore

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


class _Unsupported(Exception):
    """A layout the direct chunk reader does not handle: read through zarr instead."""


_PLAIN_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                           "float32", "float64"})


class _FastScale:
    """numcodecs' FixedScaleOffset decode for a power-of-two scale, in float32.

    ``q / scale + offset`` is exact in float32 then (q < 2**24), so the result is
    bit for bit numcodecs' (which computes in float64 and casts), four times faster.
    """

    @staticmethod
    def applies(conf: dict) -> bool:
        scale, offset = conf.get("scale"), conf.get("offset", 0)
        if not isinstance(scale, (int, float)) or scale == 0 or offset != 0:
            return False
        if not conf.get("astype"):
            return False
        mantissa, _exp = np.frexp(abs(float(scale)))
        astype = np.dtype(conf["astype"])
        return mantissa == 0.5 and np.dtype(conf["dtype"]) == np.float32 and astype.kind == "u" and astype.itemsize <= 2

    def __init__(self, conf: dict):
        self.inverse = np.float32(1.0 / float(conf["scale"]))
        self.astype = np.dtype(conf["astype"])

    def decode(self, values: np.ndarray) -> np.ndarray:
        q = np.asarray(values).view(self.astype).reshape(-1)
        out = q.astype(np.float32)
        out *= self.inverse
        out += np.float32(0.0)  # -0.0 -> 0.0, as numcodecs' "+ offset" does
        return out


class _ArrayLayout:
    """What decoding one array needs, from its ``zarr.json`` (Zarr v3)."""

    def __init__(self, meta: dict):
        import numcodecs

        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise _Unsupported("not a plain v3 array")
        self.dtype = np.dtype(meta["data_type"]) if meta["data_type"] in _PLAIN_DTYPES else None
        grid, keys = meta["chunk_grid"], meta.get("chunk_key_encoding", {"name": "default"})
        if self.dtype is None or grid.get("name") != "regular" or keys.get("name") != "default":
            raise _Unsupported("data type or chunk grid")
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(grid["configuration"]["chunk_shape"])
        if len(self.shape) not in (1, 2) or self.chunks[1:] != self.shape[1:]:
            raise _Unsupported("chunked along more than the first axis")
        self.separator = keys.get("configuration", {}).get("separator", "/")
        self.filters, self.compressors = [], []
        encoded = self.dtype  # dtype that reaches the bytes codec
        seen_bytes = False
        for codec in meta["codecs"]:
            name, conf = codec["name"], dict(codec.get("configuration") or {})
            if name == "bytes":
                if conf.get("endian", "little") != "little" and encoded.itemsize > 1:
                    raise _Unsupported("big-endian")
                seen_bytes = True
            elif not seen_bytes and name in ("numcodecs.fixedscaleoffset", "numcodecs.delta"):
                codec_obj = numcodecs.get_codec({"id": name.split(".", 1)[1], **conf})
                if name == "numcodecs.fixedscaleoffset" and _FastScale.applies(conf):
                    codec_obj = _FastScale(conf)
                self.filters.append(codec_obj)
                encoded = np.dtype(conf.get("astype") or conf["dtype"])
            elif seen_bytes and name == "zstd":
                self.compressors.append(numcodecs.Zstd(level=conf.get("level", 0),
                                                       checksum=conf.get("checksum", False)))
            elif seen_bytes and name == "numcodecs.shuffle":
                self.compressors.append(numcodecs.get_codec({"id": "shuffle", **conf}))
            else:
                raise _Unsupported(f"codec {name}")
        if not seen_bytes:
            raise _Unsupported("no bytes codec")
        self.encoded = encoded.newbyteorder("<")
        self.num_chunks = -(-self.shape[0] // self.chunks[0]) if self.shape[0] else 0

    def chunk_key(self, index: int) -> str:
        return "c" + self.separator + self.separator.join([str(index)] + ["0"] * (len(self.shape) - 1))

    def decode(self, raw: list[bytes]) -> np.ndarray:
        rows = self.chunks[0]
        out = None
        for i, blob in enumerate(raw):
            values = self._decode_chunk(blob)
            if len(raw) == 1 and self.shape[0] == rows and values.flags.writeable and values.dtype == self.dtype:
                return values  # one full chunk that decoding already copied: no second copy
            if out is None:
                out = np.empty(self.shape, dtype=self.dtype)
            start = i * rows
            stop = min(start + rows, self.shape[0])
            out[start:stop] = values[:stop - start]
        return out if out is not None else np.empty(self.shape, dtype=self.dtype)

    def _decode_chunk(self, blob: bytes) -> np.ndarray:
        buf = blob
        for codec in reversed(self.compressors):
            buf = codec.decode(buf)
        values = np.frombuffer(buf, dtype=self.encoded)
        for codec in reversed(self.filters):
            values = codec.decode(values)
        return np.asarray(values).reshape(self.chunks)


def _read_direct(store: TeacherStore, jobs: list[tuple[SectionRef, list[str]]]) -> list[dict[str, np.ndarray]]:
    """Like ``store.read_sections`` but decoding chunk files directly; raises _Unsupported to fall back."""
    import json

    root, fs = store._root, store.fs
    group_paths = [f"{root}/{ref.path}/zarr.json" for ref, _ in jobs]
    array_paths = [f"{root}/{ref.path}/{name}/zarr.json" for ref, names in jobs for name in names]
    meta = fs.cat(group_paths + array_paths, on_error="return")
    for (ref, _), path in zip(jobs, group_paths):
        group = meta.get(path)
        if isinstance(group, BaseException) or group is None:
            raise IncompleteSection(f"{store.location}: {ref} is missing or not complete")
        try:
            complete = json.loads(group).get("attributes", {}).get("complete")
        except ValueError:
            complete = False
        if not complete:
            raise IncompleteSection(f"{store.location}: {ref} is missing or not complete")
    layouts = {}
    for ref, names in jobs:
        for name in names:
            path = f"{root}/{ref.path}/{name}/zarr.json"
            blob = meta.get(path)
            if isinstance(blob, BaseException) or blob is None:
                raise _Unsupported("array metadata missing: let zarr report it")
            try:
                layouts[(ref.path, name)] = _ArrayLayout(json.loads(blob))
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise _Unsupported(f"unreadable metadata: {exc}")
    chunk_paths = {key: [f"{root}/{key[0]}/{key[1]}/{layout.chunk_key(i)}" for i in range(layout.num_chunks)]
                   for key, layout in layouts.items()}
    wanted = [path for paths in chunk_paths.values() for path in paths]
    blobs = fs.cat(wanted, on_error="return") if wanted else {}
    if any(isinstance(blobs.get(path), BaseException) or blobs.get(path) is None for path in wanted):
        raise _Unsupported("a chunk file is missing: let zarr decide (fill value)")
    out = []
    for ref, names in jobs:
        arrays = {}
        for name in names:
            try:
                arrays[name] = layouts[(ref.path, name)].decode([blobs[p] for p in chunk_paths[(ref.path, name)]])
            except Exception as exc:  # a damaged chunk: name it, as zarr would fail too
                raise StoreError(f"{store.location}: {ref}/{name} cannot be decoded ({type(exc).__name__}: "
                                 f"{exc}); `store verify {store.location}` lists the damage") from exc
        out.append(arrays)
    return out


def _read_part(store: TeacherStore, requests: list[tuple]) -> list[dict[str, np.ndarray]]:
    """``store.read_sections(requests)``, decoded directly from chunk files where the layout allows."""
    jobs = [(SectionRef(*r[:4]), list(r[4]) if len(r) > 4 and r[4] is not None
             else [spec.name for spec in fmt.arrays_of(r[2], r[3])]) for r in requests]
    try:
        return _read_direct(store, jobs)
    except _Unsupported:
        return store.read_sections(requests)


def _base_names(sequence_set: str, sections: Seq[str]) -> list[str]:
    """The base arrays :func:`load_part` uses (not every base array is needed to build examples)."""
    names = ["example_index", "role", "prompt_length", "token_offsets", "response_offsets", "input_ids"]
    if sequence_set == fmt.SET_SAMPLES and fmt.SECTION_TEACHER_MCQ in sections:
        names.append("group_example_index")
    return names


def load_part(store: TeacherStore, split: str, part: int, needs: Needs) -> list[Example]:
    """All examples of one part that have every requested set, in example order.

    Each :class:`Sequence` owns copies of its slices (not views into the part), so
    keeping a few examples alive (a shuffle buffer) never keeps whole parts alive.
    """
    requests = []
    for sequence_set, sections in needs.items():
        requests.append((split, part, sequence_set, fmt.BASE, _base_names(sequence_set, sections)))
        requests.extend((split, part, sequence_set, sec) for sec in sections)
    results = iter(_read_part(store, requests))  # one read for the whole part

    per_example: dict[int, list[Sequence]] = {}
    groups: dict[int, dict[str, np.ndarray]] = {}
    present: dict[int, set[str]] = {}
    for sequence_set, sections in needs.items():
        base = next(results)
        signals = {sec: next(results) for sec in sections}
        input_ids = base["input_ids"]
        # plain Python lists: indexing them is much cheaper than numpy scalars
        tok_off = base["token_offsets"].tolist()
        resp_off = base["response_offsets"].tolist()
        example_index = base["example_index"].tolist()
        role = base["role"].tolist()
        prompt_length = base["prompt_length"].tolist()
        response_arrays, sequence_arrays, pair_arrays = [], [], []
        for sec in sections:
            for spec in fmt.arrays_of(sequence_set, sec):
                name, values = f"{sec}/{spec.name}", signals[sec][spec.name]
                if spec.axis == fmt.AXIS_RESPONSE:
                    response_arrays.append((name, values))
                elif spec.axis == fmt.AXIS_SEQUENCE:
                    sequence_arrays.append((name, values.tolist()))
                elif spec.axis == fmt.AXIS_PAIR:
                    pair_arrays.append((name, values))
        for s in range(len(example_index)):
            r0, r1 = resp_off[s], resp_off[s + 1]
            ex = example_index[s]
            seq = Sequence(
                example_index=ex,
                sequence_set=sequence_set,
                role=role[s],
                input_ids=input_ids[tok_off[s]:tok_off[s + 1]].copy(),
                prompt_length=prompt_length[s],
                response={name: values[r0:r1].copy() for name, values in response_arrays},
                scalars={name: float(values[s]) for name, values in sequence_arrays},
            )
            bucket = per_example.get(ex)
            if bucket is None:
                per_example[ex] = [seq]
                present[ex] = {sequence_set}
            else:
                bucket.append(seq)
                present[ex].add(sequence_set)
        if sequence_set == fmt.SET_SAMPLES and pair_arrays:
            offsets = signals[fmt.SECTION_TEACHER_MCQ]["group_pair_offsets"].tolist()
            for g, ex in enumerate(base["group_example_index"].tolist()):
                p0, p1 = offsets[g], offsets[g + 1]
                groups[ex] = {name: values[p0:p1].copy() for name, values in pair_arrays}
    wanted = set(needs)
    return [
        Example(split, ex, per_example[ex], groups.get(ex, {}))
        for ex in sorted(per_example)
        if present[ex] >= wanted
    ]


def check_complete(store: TeacherStore, split: str, needs: Needs) -> list[str]:
    """Names of the (part, set, section) a read of ``needs`` would miss; empty when all there."""
    missing = []
    for sequence_set, sections in needs.items():
        for ref, attrs in store.walk_sections([split], (fmt.BASE, *sections), sets=[sequence_set]):
            if not (attrs and attrs.get("complete")):
                missing.append(ref.path)
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
