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
writes (regular chunks along rows, the codecs of :mod:`store.format`, any
version) it fetches a part's chunk files at once (``store.files.read_many``) and decodes them
with numcodecs, which takes much less CPU than zarr's asynchronous codec
pipeline and gives the same bytes; the quantised log-probs' delta and scale
filters (versions 1-3) or stored integers (version 4) are undone in one
vectorised pass (:class:`_FastLogp`, :class:`_StoredLogp`). Every version 4
chunk's crc32c is checked before it is decoded (:data:`CHECK_CRC32C`); a chunk
that fails it, or fails to decode, or (version 4) is missing, is a StoreError
naming its file. Anything else (another layout or codec, a missing chunk file
of an older version) is read through zarr. An optional array
(:mod:`store.format`) that a section lacks is left out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence as Seq

import numpy as np

from . import format as fmt
from .errors import IncompleteSection, StoreError
from .format import SectionRef
from .reader import CRC_MISMATCH, StoreReader, chunk_error, failure_reason, section_specs

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



class _Unsupported(Exception):
    """A layout the direct chunk reader does not handle: read through zarr instead."""


class _DamagedChunk(Exception):
    """A chunk file that fails its crc32c or cannot be decoded: ``index`` along the rows, ``reason``."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


#: check every version 4 chunk's crc32c before decoding it. Only benchmarks/store_stream.py turns it off, to
#: measure what the check costs; a reader that skips it may train on a damaged chunk without knowing.
CHECK_CRC32C = True
#: CRC-32C of any bytes followed by their own CRC-32C (little endian): a constant of the code (the
#: reflected CRC's residue). Checking a chunk against it hashes the file as it is, without slicing off
#: zarr's 4-byte trailer (a copy).
_CRC32C_RESIDUE = 0x48674BC7


def _crc32c_ok(blob: bytes) -> bool:
    import google_crc32c

    return len(blob) >= 4 and google_crc32c.value(blob) == _CRC32C_RESIDUE


_PLAIN_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                           "float32", "float64"})


class _FastLogp:
    """numcodecs' Delta (uint16) then FixedScaleOffset decode, fused: ``cumsum`` then ``q / scale``, in float32.

    The delta runs over the flattened chunk in uint16 arithmetic (mod 2**16), as
    numpy's uint16 ``cumsum`` does; the scale step is exact in float32 as in
    :class:`_FastScale` and writes straight into the destination: bit for bit
    what numcodecs returns, one temporary (the integers) instead of three.
    """

    def __init__(self, scale: "_FastScale"):
        self.inverse = scale.inverse

    def decode(self, values: np.ndarray, out: np.ndarray | None = None, work: np.ndarray | None = None) -> np.ndarray:
        """``work``: a uint16 buffer of the chunk's size for the integers (else one is allocated)."""
        q = np.cumsum(np.asarray(values).view("<u2").reshape(-1), dtype=np.uint16, out=work)
        out = np.multiply(q, self.inverse, dtype=np.float32, out=out)
        out += np.float32(0.0)  # -0.0 -> 0.0, as numcodecs' "+ offset" does
        return out


class _FastScale:
    """numcodecs' FixedScaleOffset decode for a power-of-two scale, in float32.

    ``q / scale + offset`` is exact in float32 then (q < 2**24), so the result is
    bit for bit numcodecs' (which computes in float64 and casts), in less time
    (measured: ``docs/benchmarks.md``, "Streaming").
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

    def decode(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        q = np.asarray(values).view(self.astype).reshape(-1)
        out = np.multiply(q, self.inverse, dtype=np.float32, out=out)
        out += np.float32(0.0)  # -0.0 -> 0.0, as numcodecs' "+ offset" does
        return out


class _StoredLogp:
    """Version 4's quantised log-probs (:func:`store.format.decode_stored`), chunk by chunk into float32: the
    uint16 ``q`` (for sorted ones cumulated along K first, in uint16 arithmetic), times ``-1/128``, plus 0.0;
    bit for bit what :func:`store.format.decode_stored` and version 3's codecs give."""

    def __init__(self, spec: fmt.ArraySpec, width: int):
        self.steps = spec.encoding == fmt.ENC_LOGP_SORTED
        self.width = width
        self.scale = np.float32(fmt.LOGP_STORED_SCALE)
        self.offset = np.float32(fmt.LOGP_STORED_OFFSET)

    def decode(self, values: np.ndarray, out: np.ndarray | None = None, work: np.ndarray | None = None) -> np.ndarray:
        q = np.asarray(values).view(fmt.LOGP_STORED_DTYPE).reshape(-1)
        if self.steps:
            rows = q.shape[0] // self.width
            q = np.cumsum(q.reshape(rows, self.width), axis=1, dtype=fmt.LOGP_STORED_DTYPE,
                          out=None if work is None else work.reshape(rows, self.width)).reshape(-1)
        out = np.multiply(q, self.scale, dtype=np.float32, out=out)
        out += self.offset  # -0.0 -> 0.0
        return out


class _ArrayLayout:
    """What decoding one array needs, from its ``zarr.json`` (Zarr v3); with ``spec`` of a version 4 store, also
    its values' rule (:class:`_StoredLogp`)."""

    def __init__(self, meta: dict, spec: fmt.ArraySpec | None = None, version: int = fmt.FORMAT_VERSION):
        import numcodecs

        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            raise _Unsupported("not a plain v3 array")
        self.dtype = np.dtype(meta["data_type"]) if meta["data_type"] in _PLAIN_DTYPES else None
        grid, keys = meta["chunk_grid"], meta.get("chunk_key_encoding", {"name": "default"})
        if self.dtype is None or grid.get("name") != "regular" or keys.get("name") != "default":
            raise _Unsupported("data type or chunk grid")
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(grid["configuration"]["chunk_shape"])
        empty_rows = len(self.shape) == 2 and self.shape[1] == 0  # width 0 (a pure sampled store): no chunk file
        if len(self.shape) not in (1, 2) or (self.chunks[1:] != self.shape[1:] and not empty_rows):
            raise _Unsupported("chunked along more than the first axis")
        self.separator = keys.get("configuration", {}).get("separator", "/")
        self.filters, self.compressors = [], []
        self.crc32c = False  # the last codec is crc32c (version 4: every array)
        encoded = self.dtype  # dtype that reaches the bytes codec
        seen_bytes = False
        for codec in meta["codecs"]:
            name, conf = codec["name"], dict(codec.get("configuration") or {})
            if self.crc32c:
                raise _Unsupported("a codec after crc32c")
            if name == "crc32c" and seen_bytes and self.compressors:
                self.crc32c = True
            elif name == "bytes":
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
            elif seen_bytes and name == "blosc":
                self.compressors.append(numcodecs.Blosc())  # decoding reads its settings from the header
            else:
                raise _Unsupported(f"codec {name}")
        if not seen_bytes:
            raise _Unsupported("no bytes codec")
        # decode order is the reverse; a Delta(uint16) decoded right before a fast scale: one fused pass
        if (len(self.filters) == 2 and isinstance(self.filters[0], _FastScale)
                and isinstance(self.filters[1], numcodecs.Delta) and self.filters[1].dtype == np.dtype("<u2")
                and np.dtype(self.filters[1].astype) == np.dtype("<u2")):
            self.filters = [_FastLogp(self.filters[0])]
        self.encoded = encoded.newbyteorder("<")
        if spec is not None and version >= 4 and fmt.is_quantised(spec):
            if self.filters or self.dtype != fmt.LOGP_STORED_DTYPE:
                raise _Unsupported("quantised log-probs that are not uint16")
            self.filters = [_StoredLogp(spec, int(np.prod(self.chunks[1:], dtype=np.int64)))]
            self.dtype = np.dtype(np.float32)  # what the reader returns
        self.num_chunks = -(-self.shape[0] // self.chunks[0]) if self.shape[0] and not empty_rows else 0

    def chunk_key(self, index: int) -> str:
        return "c" + self.separator + self.separator.join([str(index)] + ["0"] * (len(self.shape) - 1))

    def decode(self, raw: list[bytes], scratch: "_Scratch | None" = None, key: str = "") -> np.ndarray:
        """The whole array, each full chunk decoded straight into its rows (no second copy).

        With ``scratch`` the array is the buffer of ``scratch`` under ``key`` (valid
        until the next decode with the same scratch and key), temporaries its shared ones.
        """
        rows = self.chunks[0]
        out = scratch.array(key, self.shape, self.dtype) if scratch else np.empty(self.shape, dtype=self.dtype)
        for i, blob in enumerate(raw):
            start = i * rows
            stop = min(start + rows, self.shape[0])
            if self.crc32c:
                if CHECK_CRC32C and not _crc32c_ok(blob):
                    raise _DamagedChunk(i, CRC_MISMATCH)
                blob = memoryview(blob)[:-4]
            try:
                if stop - start == rows:
                    self._decode_chunk(blob, out[start:stop].reshape(-1), scratch)
                else:  # the last chunk, partly beyond the array: decode it whole, keep its rows
                    whole = scratch.array("temp/last", self.chunks, self.dtype) if scratch else np.empty(
                        self.chunks, dtype=self.dtype)
                    self._decode_chunk(blob, whole.reshape(-1), scratch)
                    out[start:stop] = whole[:stop - start]
            except Exception as exc:  # noqa: BLE001 - a damaged chunk (no crc32c, or one that matches garbage)
                raise _DamagedChunk(i, failure_reason(exc)) from exc
        return out

    def _decode_chunk(self, blob: bytes, dest: np.ndarray, scratch: "_Scratch | None") -> np.ndarray:
        """One chunk into ``dest`` (a flat, contiguous array of the chunk's values)."""
        size = dest.shape[0]

        def temp(tag: str, dtype, count: int = size) -> np.ndarray:
            # temporaries live only during this call: one buffer per tag for every array
            return scratch.array(f"temp/{tag}", (count,), dtype) if scratch else np.empty(count, dtype=dtype)

        buf = blob
        for i, codec in enumerate(reversed(self.compressors)):
            if i == len(self.compressors) - 1:  # the last one gives the encoded values: into place
                target = dest if not self.filters else temp("encoded", self.encoded)
                codec.decode(buf, out=target.view(np.uint8))
                buf = target
            else:  # zstd before numcodecs' shuffle (version 1): the same number of bytes
                buf = codec.decode(buf, out=temp(f"c{i}", np.uint8, size * self.encoded.itemsize))
        values = buf if isinstance(buf, np.ndarray) and buf.dtype == self.encoded else np.frombuffer(buf, self.encoded)
        if not self.filters:
            if values is not dest:
                dest[...] = values
            return dest
        if len(self.filters) == 1 and isinstance(self.filters[0], (_FastLogp, _StoredLogp)):
            return self.filters[0].decode(values, out=dest, work=temp("work", np.uint16))
        if len(self.filters) == 1 and isinstance(self.filters[0], _FastScale):
            return self.filters[0].decode(values, out=dest)
        for codec in reversed(self.filters):
            values = codec.decode(values)
        dest[...] = np.asarray(values).reshape(-1)
        return dest


class _Scratch:
    """Buffers reused by one thread from one part to the next: a part's decoded arrays are dead once
    :func:`load_part` has copied what its examples keep, and reusing their memory spares the allocator
    (a fresh multi-MB array is fresh pages, each a page fault). Grow-only; about one part's arrays."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, key: str, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[key] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


_THREAD = threading.local()


def _thread_scratch() -> _Scratch:
    scratch = getattr(_THREAD, "scratch", None)
    if scratch is None:
        scratch = _THREAD.scratch = _Scratch()
    return scratch


def _read_direct(store: StoreReader, jobs: list[tuple[SectionRef, list[str]]],
                 scratch: _Scratch | None = None) -> list[dict[str, np.ndarray]]:
    """Like ``store.read_sections`` but decoding chunk files directly; raises _Unsupported to fall back.

    With ``scratch`` the arrays live in its buffers (see :meth:`_ArrayLayout.decode`)."""
    import json

    version = store.format_version
    # (ref, [(spec, the array's name in this store)]): version 4 stores sorted log-probs under another name
    jobs = [(ref, [(spec, fmt.stored_name(spec, version)) for spec in section_specs(ref, names, store.location)])
            for ref, names in jobs]
    group_paths = [f"{ref.path}/zarr.json" for ref, _ in jobs]
    array_paths = [f"{ref.path}/{stored}/zarr.json" for ref, arrays in jobs for _spec, stored in arrays]
    meta = store.files.read_many(group_paths + array_paths)  # one request for every file
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
    jobs = [(ref, [(spec, stored) for spec, stored in arrays
                   if not spec.optional or _present(meta, f"{ref.path}/{stored}")]) for ref, arrays in jobs]
    for ref, arrays in jobs:
        for spec, stored in arrays:
            path = f"{ref.path}/{stored}/zarr.json"
            blob = meta.get(path)
            if isinstance(blob, BaseException) or blob is None:
                raise _Unsupported("array metadata missing: let zarr report it")
            try:
                layouts[(ref.path, stored)] = _ArrayLayout(json.loads(blob), spec, version)
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise _Unsupported(f"unreadable metadata: {exc}")
    chunk_paths = {key: [f"{key[0]}/{key[1]}/{layout.chunk_key(i)}" for i in range(layout.num_chunks)]
                   for key, layout in layouts.items()}
    wanted = [path for paths in chunk_paths.values() for path in paths]
    blobs = store.files.read_many(wanted)
    absent = [path for path in wanted if isinstance(blobs.get(path), BaseException) or blobs.get(path) is None]
    if absent and version >= 4:  # every chunk of a version 4 array is written: a missing one is damage
        raise StoreError(chunk_error(f"{store.location}/{absent[0]}", "the chunk file is missing or unreadable"))
    if absent:
        raise _Unsupported("a chunk file is missing: let zarr decide (fill value)")
    out = []
    for ref, arrays in jobs:
        decoded = {}
        for spec, stored in arrays:
            layout, paths = layouts[(ref.path, stored)], chunk_paths[(ref.path, stored)]
            try:
                decoded[spec.name] = layout.decode([blobs[p] for p in paths], scratch,
                                                   f"{ref.sequence_set}/{ref.section}/{spec.name}")
            except _DamagedChunk as exc:  # name the chunk's file
                raise StoreError(chunk_error(f"{store.location}/{paths[exc.index]}", exc.reason)) from exc
        out.append(decoded)
    return out


def _present(meta: dict, array_path: str) -> bool:
    blob = meta.get(f"{array_path}/zarr.json")
    return blob is not None and not isinstance(blob, BaseException)


def _read_part(store: StoreReader, requests: list[tuple],
               scratch: _Scratch | None = None) -> list[dict[str, np.ndarray]]:
    """``store.read_sections(requests)``, decoded directly from chunk files where the layout allows.

    With ``scratch``, arrays may live in its buffers: use them before the next read with it."""
    jobs = [(SectionRef(*r[:4]), list(r[4]) if len(r) > 4 and r[4] is not None
             else [spec.name for spec in fmt.arrays_of(r[2], r[3])]) for r in requests]
    try:
        return _read_direct(store, jobs, scratch)
    except _Unsupported:
        return store.read_sections(requests)


def _base_names(sequence_set: str, sections: Seq[str]) -> list[str]:
    """The base arrays :func:`load_part` uses (not every base array is needed to build examples)."""
    names = [fmt.ARRAY_EXAMPLE_INDEX, fmt.ARRAY_ROLE, fmt.ARRAY_PROMPT_LENGTH, fmt.ARRAY_TOKEN_OFFSETS,
             fmt.ARRAY_RESPONSE_OFFSETS, fmt.ARRAY_INPUT_IDS]
    if sequence_set == fmt.SET_SAMPLES and fmt.SECTION_TEACHER_MCQ in sections:
        names.append(fmt.ARRAY_GROUP_EXAMPLE_INDEX)
    return names


def load_part(store: StoreReader, split: str, part: int, needs: Needs) -> list[Example]:
    """All examples of one part that have every requested set, in example order.

    Each :class:`Sequence` owns copies of its slices (not views into the part), so
    keeping a few examples alive (a shuffle buffer) never keeps whole parts alive.
    """
    requests = []
    for sequence_set, sections in needs.items():
        requests.append((split, part, sequence_set, fmt.BASE, _base_names(sequence_set, sections)))
        requests.extend((split, part, sequence_set, section) for section in sections)
    # one read for the whole part, into this thread's reused buffers: everything kept below is a copy
    results = iter(_read_part(store, requests, _thread_scratch()))

    per_example: dict[int, list[Sequence]] = {}
    groups: dict[int, dict[str, np.ndarray]] = {}
    present: dict[int, set[str]] = {}
    for sequence_set, sections in needs.items():
        base = next(results)
        signals = {section: next(results) for section in sections}
        # plain Python lists: indexing them is much cheaper than numpy scalars
        token_offsets = base[fmt.ARRAY_TOKEN_OFFSETS].tolist()
        response_offsets = base[fmt.ARRAY_RESPONSE_OFFSETS].tolist()
        example_index = base[fmt.ARRAY_EXAMPLE_INDEX].tolist()
        response_names, response_slices, sequence_arrays, pair_arrays = [], [], [], []
        token_spans = list(zip(token_offsets, token_offsets[1:]))
        response_spans = list(zip(response_offsets, response_offsets[1:]))
        for section in sections:
            for spec in fmt.arrays_of(sequence_set, section):
                if spec.name not in signals[section]:
                    continue  # an optional array this section lacks
                name, values = fmt.signal_name(section, spec.name), signals[section][spec.name]
                if spec.axis == fmt.AXIS_RESPONSE:
                    # each sequence gets a copy of its rows, array by array (no view keeps the part alive)
                    response_names.append(name)
                    response_slices.append([values[start:stop].copy() for start, stop in response_spans])
                elif spec.axis == fmt.AXIS_SEQUENCE:
                    sequence_arrays.append((name, values.astype(np.float64).tolist()))
                elif spec.axis == fmt.AXIS_PAIR:
                    pair_arrays.append((name, values))
        input_ids = base[fmt.ARRAY_INPUT_IDS]
        sequence_ids = [input_ids[start:stop].copy() for start, stop in token_spans]
        responses = ([dict(zip(response_names, rows)) for rows in zip(*response_slices)] if response_names
                     else [{} for _ in example_index])
        scalars = ([dict(zip([n for n, _ in sequence_arrays], row)) for row in zip(*(v for _, v in sequence_arrays))]
                   if sequence_arrays else [{} for _ in example_index])
        for example, role, ids, prompt_length, response, scalar in zip(
                example_index, base[fmt.ARRAY_ROLE].tolist(), sequence_ids, base[fmt.ARRAY_PROMPT_LENGTH].tolist(),
                responses, scalars):
            sequence = Sequence(example_index=example, sequence_set=sequence_set, role=role, input_ids=ids,
                                prompt_length=prompt_length, response=response, scalars=scalar)
            bucket = per_example.get(example)
            if bucket is None:
                per_example[example] = [sequence]
                present[example] = {sequence_set}
            else:
                bucket.append(sequence)
                present[example].add(sequence_set)
        if sequence_set == fmt.SET_SAMPLES and pair_arrays:
            offsets = signals[fmt.SECTION_TEACHER_MCQ][fmt.ARRAY_GROUP_PAIR_OFFSETS].tolist()
            for g, example in enumerate(base[fmt.ARRAY_GROUP_EXAMPLE_INDEX].tolist()):
                start, stop = offsets[g], offsets[g + 1]
                groups[example] = {name: values[start:stop].copy() for name, values in pair_arrays}
    wanted = set(needs)
    return [
        Example(split, example, per_example[example], groups.get(example, {}))
        for example in sorted(per_example)
        if present[example] >= wanted
    ]


def check_complete(store: StoreReader, split: str, needs: Needs) -> list[str]:
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

    def __init__(self, store: StoreReader, split: str, needs: Needs, *, shuffle: bool = True,
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

    def __init__(self, store: StoreReader, split: str, needs: Needs, cache_parts: int = 2):
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
