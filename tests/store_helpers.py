"""A small synthetic, self-consistent teacher-signal store for tests.

Everything is a pure function of ``(seed, split, part)`` so that separate
processes (concurrent writers, a killed writer and its resumption) produce the
very same arrays for a part without talking to each other.

Layout written by :func:`write_synthetic_store` (defaults):

* ``pairs``: chosen + rejected per example, sections ``teacher`` and ``student_init``;
* ``generated``: one student answer per example, sections ``teacher`` and ``reference``;
* ``samples``: a group of 2-4 sampled answers per example, section ``teacher_mcq``.

Teacher signals are realistic: top-K ids and log-probs of a softmax over random
logits on the whole vocabulary, sorted most likely first, and the log-prob of the
token actually there.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from store import TeacherStore
from store import format as fmt

VOCAB_SIZE = 1000
TOP_K = 8
TOKENIZER = {"name": "synthetic-tokenizer", "hash": "0123456789abcdef" * 4}
TEACHER_MODEL = {"name": "synthetic-teacher", "sha256": "feedc0de" * 8}
REFERENCE_MODEL = {"name": "synthetic-reference", "sha256": "abad1dea" * 8}
STUDENT_MODEL = {"name": "synthetic-student", "sha256": "5eed5eed" * 8}
DATASET = {"name": "synthetic-prefs", "revision": "v0", "fingerprint": "f1n6e2p2"}

# which sections each set carries, in write order
SECTIONS_OF = {
    fmt.SET_PAIRS: (fmt.SECTION_TEACHER, fmt.SECTION_STUDENT_INIT),
    fmt.SET_GENERATED: (fmt.SECTION_TEACHER, fmt.SECTION_REFERENCE),
    fmt.SET_SAMPLES: (fmt.SECTION_TEACHER_MCQ,),
}
# what a reader of the whole store asks for
ALL_NEEDS = {s: list(secs) for s, secs in SECTIONS_OF.items()}


def _rng(seed: int, split: str, part: int, what: str) -> np.random.Generator:
    tag = [ord(c) for c in f"{split}/{what}"]
    return np.random.default_rng([seed, part, *tag])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _sequences(rng, examples: range, roles_of) -> dict[str, np.ndarray]:
    """Base arrays for the given examples; ``roles_of(example)`` lists each sequence's role."""
    ex_index, roles, plen, rlen, tokens = [], [], [], [], []
    for ex in examples:
        prompt = rng.integers(3, VOCAB_SIZE, size=int(rng.integers(4, 16)))
        for role in roles_of(ex):
            response = rng.integers(3, VOCAB_SIZE, size=int(rng.integers(2, 12)))
            ex_index.append(ex)
            roles.append(role)
            plen.append(prompt.shape[0])
            rlen.append(response.shape[0])
            tokens.append(np.concatenate([prompt, response]))
    plen_a = np.asarray(plen, dtype=np.int32)
    rlen_a = np.asarray(rlen, dtype=np.int32)
    lengths = (plen_a + rlen_a).astype(np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    response_offsets = np.concatenate([[0], np.cumsum(rlen_a)]).astype(np.int64)
    input_ids = (np.concatenate(tokens) if tokens else np.zeros(0)).astype(np.int64)
    loss_mask = np.zeros(input_ids.shape[0], dtype=bool)
    for s in range(len(plen)):
        loss_mask[token_offsets[s] + plen_a[s]:token_offsets[s + 1]] = True
    return {
        "example_index": np.asarray(ex_index, dtype=np.int64),
        "role": np.asarray(roles, dtype=np.int8),
        "prompt_length": plen_a,
        "response_length": rlen_a,
        "token_offsets": token_offsets,
        "response_offsets": response_offsets,
        "input_ids": input_ids,
        "loss_mask": loss_mask,
    }


def response_targets(base: Mapping[str, np.ndarray]) -> np.ndarray:
    """The token each response row predicts, in response-axis order."""
    ids = base["input_ids"][base["loss_mask"]]
    return ids.astype(np.int64)


def _sequence_sums(base, per_row: np.ndarray) -> np.ndarray:
    offsets = base["response_offsets"]
    csum = np.concatenate([[0.0], np.cumsum(per_row.astype(np.float64))])
    return (csum[offsets[1:]] - csum[offsets[:-1]]).astype(np.float32)


def teacher_arrays(rng, base, k: int = TOP_K, vocab: int = VOCAB_SIZE, topk_ids=None):
    """(topk_ids, topk_logp, target_logp, logp_sum) from a softmax of random logits.

    With ``topk_ids`` given (the reference section), log-probs are taken at those ids.
    """
    targets = response_targets(base)
    rows = targets.shape[0]
    logits = rng.normal(size=(rows, vocab)).astype(np.float64) * 2.5
    logp = _log_softmax(logits)
    if topk_ids is None:
        ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    else:
        ids = np.asarray(topk_ids, dtype=np.int64)
    topk_logp = np.take_along_axis(logp, ids, axis=1).astype(np.float32)
    target_logp = logp[np.arange(rows), targets].astype(np.float32)
    return ids, topk_logp, target_logp, _sequence_sums(base, target_logp)


def part_sections(seed: int, split: str, part: int, start: int, stop: int, *,
                  k: int = TOP_K) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """Every (set, section, arrays) of one part, in the order they must be written."""
    examples = range(start, stop)
    out: list[tuple[str, str, dict[str, np.ndarray]]] = []

    # pairs: chosen and rejected share a prompt
    rng = _rng(seed, split, part, "pairs")
    base = _sequences(rng, examples, lambda ex: (fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED))
    out.append((fmt.SET_PAIRS, fmt.BASE, base))
    ids, topk_logp, target_logp, logp_sum = teacher_arrays(rng, base, k)
    out.append((fmt.SET_PAIRS, fmt.SECTION_TEACHER, {
        "topk_ids": ids, "topk_logp": topk_logp, "target_logp": target_logp, "logp_sum": logp_sum}))
    _ids, _tl, s_target, s_sum = teacher_arrays(rng, base, k)
    out.append((fmt.SET_PAIRS, fmt.SECTION_STUDENT_INIT, {"target_logp": s_target, "logp_sum": s_sum}))

    # generated: one answer per example
    rng = _rng(seed, split, part, "generated")
    base = _sequences(rng, examples, lambda ex: (fmt.ROLE_GENERATED,))
    out.append((fmt.SET_GENERATED, fmt.BASE, base))
    ids, topk_logp, target_logp, logp_sum = teacher_arrays(rng, base, k)
    out.append((fmt.SET_GENERATED, fmt.SECTION_TEACHER, {
        "topk_ids": ids, "topk_logp": topk_logp, "target_logp": target_logp, "logp_sum": logp_sum}))
    _ids, r_topk, r_target, r_sum = teacher_arrays(rng, base, k, topk_ids=ids)
    out.append((fmt.SET_GENERATED, fmt.SECTION_REFERENCE, {
        "topk_logp": r_topk, "target_logp": r_target, "logp_sum": r_sum}))

    # samples: a group of n answers per example, all judged pairwise
    rng = _rng(seed, split, part, "samples")
    sizes = {ex: int(rng.integers(2, 5)) for ex in examples}
    base = _sequences(rng, examples, lambda ex: tuple(fmt.ROLE_SAMPLE_BASE + i for i in range(sizes[ex])))
    base["group_offsets"] = np.concatenate([[0], np.cumsum([sizes[ex] for ex in examples])]).astype(np.int64)
    base["group_example_index"] = np.asarray(list(examples), dtype=np.int64)
    out.append((fmt.SET_SAMPLES, fmt.BASE, base))
    pairs, pair_offsets = [], [0]
    for ex in examples:
        n = sizes[ex]
        pairs.extend((i, j) for i in range(n) for j in range(n) if i != j)
        pair_offsets.append(len(pairs))
    pair_index = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
    pair_prob = rng.uniform(0.02, 0.98, size=pair_index.shape).astype(np.float32)
    mcq = rng.normal(size=base["example_index"].shape[0]).astype(np.float32)
    out.append((fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ, {
        "pair_index": pair_index, "pair_prob": pair_prob,
        "group_pair_offsets": np.asarray(pair_offsets, dtype=np.int64), "mcq_score": mcq}))
    return out


def pass_provenance(k: int = TOP_K) -> dict[str, dict]:
    """What :func:`write_synthetic_store` registers, pass by pass."""
    common = {"max_length": 64, "dtype": "float32", "temperature": 1.0, "seed": 0,
              "chat_template": "synthetic"}
    return {  # named "<set>/<section>", as the passes of `precompute teacher` are
        "pairs/teacher": {"model": dict(TEACHER_MODEL), "top_k": k, **common},
        "pairs/student_init": {"model": dict(STUDENT_MODEL), **common},
        "generated/teacher": {"model": dict(TEACHER_MODEL), "top_k": k, **common},
        "generated/reference": {"model": dict(REFERENCE_MODEL), "top_k": k, **common},
        "samples/teacher_mcq": {"model": dict(TEACHER_MODEL), "eps": 1e-6, **common},
    }


def create_store(location: str, *, num_examples: Mapping[str, int] | None = None, examples_per_part: int = 3,
                 k: int = TOP_K, storage_options: Mapping | None = None,
                 tokenizer: Mapping | None = None) -> TeacherStore:
    """Create (or reopen for writing) the store and declare its splits and passes."""
    num_examples = dict(num_examples or {"train": 6, "test": 3})
    store = TeacherStore.create(location, tokenizer=dict(tokenizer or TOKENIZER), vocab_size=VOCAB_SIZE,
                                examples_per_part=examples_per_part, storage_options=storage_options,
                                provenance={"purpose": "tests"})
    for split, n in num_examples.items():
        store.set_split(split, n, dataset={**DATASET, "split": split})
    for name, prov in pass_provenance(k).items():
        store.register_pass(name, prov)
    return store


def write_parts(store: TeacherStore, split: str, parts: Iterable[int], *, seed: int = 0, k: int = TOP_K,
                skip_complete: bool = False, sets: Iterable[str] | None = None) -> None:
    """Write every section (of ``sets``, default all) of the given parts, skipping complete ones if asked."""
    sets = set(sets) if sets is not None else set(SECTIONS_OF)
    for part in parts:
        start, stop = store.part_range(split, part)
        for sequence_set, section, arrays in part_sections(seed, split, part, start, stop, k=k):
            if sequence_set not in sets:
                continue
            if skip_complete and store.is_complete(split, part, sequence_set, section):
                continue
            store.write_section(split, part, sequence_set, section, arrays)


def write_synthetic_store(location: str, *, seed: int = 0, num_examples: Mapping[str, int] | None = None,
                          examples_per_part: int = 3, k: int = TOP_K, storage_options: Mapping | None = None,
                          manifest: bool = True, sets: Iterable[str] | None = None) -> TeacherStore:
    """Create and fill a whole store (every set, or ``sets``); returns it open for writing."""
    store = create_store(location, num_examples=num_examples, examples_per_part=examples_per_part, k=k,
                         storage_options=storage_options)
    for split in store.splits():
        write_parts(store, split, range(store.num_parts(split)), seed=seed, k=k, sets=sets)
    if manifest:
        store.refresh_manifest()
    return store


def decode_by_attributes(stored: np.ndarray, attributes: Mapping) -> np.ndarray:
    """An array's values from what any Zarr v3 reader returns for it and its attributes alone, as the format's
    description tells a reader who has never seen this project (format version 4's rule; an array without
    the rule is its values)."""
    rule = attributes.get(fmt.ATTRS_NAMESPACE)
    if not rule or "scale" not in rule:
        return stored
    q = np.asarray(stored)
    if "cumulative_axis" in rule:
        q = np.cumsum(q, axis=rule["cumulative_axis"], dtype=q.dtype)  # uint16 arithmetic: modulo 2**16
    values = q.astype(rule["decoded_dtype"]) * np.dtype(rule["decoded_dtype"]).type(rule["scale"])
    return values + np.dtype(rule["decoded_dtype"]).type(rule["offset"]) + np.dtype(rule["decoded_dtype"]).type(0.0)


def as_version(location: str, version: int) -> None:
    """Rewrite a store of this writer the way format ``version`` wrote it: every array of every complete section
    under that version's name, codecs, chunking (version 1: ``min(CHUNK_ROWS, rows)``, the last chunk partly
    past the end) and stored values, and ``version`` in the root. The decoded values, hence the recorded
    checksums, stay the same (what that version's writer would have written)."""
    import zarr

    store = TeacherStore.open(location)
    assert store.format_version == fmt.FORMAT_VERSION, "rewrites a store of this writer"
    sections = list(store.complete_sections())
    decoded = store.read_sections([(ref.split, ref.part, ref.sequence_set, ref.section, list(attrs["checksums"]))
                                   for ref, attrs in sections])
    root = zarr.open_group(location, mode="r+")
    for (ref, _attrs), arrays in zip(sections, decoded):
        group = root[ref.path]
        for spec in fmt.arrays_of(ref.sequence_set, ref.section):
            if spec.name not in arrays:
                continue
            assert spec.since <= version, f"a version {version} store cannot hold {spec.name}"
            values = arrays[spec.name]
            del group[fmt.stored_name(spec)]
            stored = fmt.encode_stored(spec, values, version)
            rows = values.shape[0]
            first = min(fmt.CHUNK_ROWS[spec.axis], rows) if version == 1 else fmt.chunk_rows(spec.axis, rows)
            new = group.create_array(fmt.stored_name(spec, version), shape=stored.shape,
                                     chunks=(max(1, first),) + stored.shape[1:], dtype=stored.dtype, fill_value=0,
                                     attributes=fmt.array_attributes(spec, version),
                                     **fmt.codecs_for(spec, values.dtype, version=version))
            new[...] = stored
    attrs = root.attrs.asdict()
    attrs["format"] = {"name": fmt.FORMAT_NAME, "version": version}
    root.attrs.put(attrs)


def expected_sections(store: TeacherStore, seed: int = 0, k: int = TOP_K, sets: Iterable[str] | None = None):
    """Yield (split, part, set, section, arrays as written) for the whole store."""
    sets = set(sets) if sets is not None else set(SECTIONS_OF)
    for split in store.splits():
        for part in range(store.num_parts(split)):
            start, stop = store.part_range(split, part)
            for sequence_set, section, arrays in part_sections(seed, split, part, start, stop, k=k):
                if sequence_set in sets:
                    yield split, part, sequence_set, section, arrays


def section_attrs(store: TeacherStore) -> dict[str, dict]:
    """path -> group attributes of every section present (complete or not)."""
    return {ref.path: attrs for ref, attrs in store.walk_sections() if attrs is not None}


def all_checksums(store: TeacherStore) -> dict[str, dict[str, str]]:
    """path -> {array: checksum} of every complete section (as recorded by the writer)."""
    return {path: attrs["checksums"] for path, attrs in section_attrs(store).items() if attrs.get("complete")}


# -- processes ------------------------------------------------------------------------------------

def writer_process(location: str, jobs: list[tuple[str, int]], seed: int = 0, barrier=None,
                   storage_options: Mapping | None = None) -> None:
    """Body of a concurrent writer (run with multiprocessing "spawn"): reopen the store as any
    worker would (create: check, declare splits and passes), wait for the others, write ``jobs``."""
    store = create_store(location, storage_options=storage_options)
    if barrier is not None:
        barrier.wait(timeout=60)
    for split, part in jobs:
        write_parts(store, split, [part], seed=seed)


def part_group_process(location: str, parts: list[tuple[str, int]], barrier) -> None:
    """Body of a writer that only makes part groups, each at the same instant as the others (spawned)."""
    store = create_store(location)
    for split, part in parts:
        barrier.wait(timeout=60)
        store.ensure_part_group(split, part)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A real S3-compatible server (moto) on loopback, as a subprocess."""

    def __init__(self, executable: str):
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_until_up(self, timeout: float = 30.0) -> None:
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with status {self.process.returncode} before answering")
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except urllib.error.HTTPError:  # an HTTP answer of any kind means it is up
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout} s")
                time.sleep(0.1)

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class FolderServer:
    """A static HTTP server on loopback over ``folder`` (``handler``: a ``SimpleHTTPRequestHandler`` subclass,
    e.g. one that records or refuses requests), in a daemon thread; ``url``, ``close()``."""

    def __init__(self, folder, handler=None):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(handler or SimpleHTTPRequestHandler, directory=str(folder)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def float64_batch(store_path, method: str, n_examples: int = 3):
    """(the method's terms, a batch of the store's first ``n_examples`` train examples as it reads them, its float
    arrays in float64): for comparing a method's losses with a direct computation."""
    import itertools

    from store import ExampleStream
    from train import methods
    from train.batches import collate

    terms = methods.resolve_terms(method)
    stream = ExampleStream(TeacherStore.open(str(store_path)), "train", methods.needs_of(terms), shuffle=False)
    batch = collate(list(itertools.islice(stream, n_examples)), pad_id=0)
    batch.response = {k: v.double() if v.is_floating_point() else v for k, v in batch.response.items()}
    return terms, batch
