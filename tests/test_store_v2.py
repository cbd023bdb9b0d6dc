"""Store format version 2: the teacher's exact tail (``tail_logp``), the Blosc codecs, version 1 stores still read.

Numbers are checked against what a formula predicts: the stored tail against a
float64 logsumexp of the full distribution outside the top-K, the KL between
exact and stored K+1 bins against the format's bound, and what plain zarr reads
against the values written. A version 1 store is made the way version 1 wrote
it (the codecs are compared with version 1's literal metadata) and must still
stream, verify and train KD with the tail taken from its top-K.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import zarr

from store import ExampleStream, FormatMismatch, TeacherStore
from store import format as fmt
from tests import store_helpers as H

#: version 1's codecs, as its writer put them in each array's zarr.json (numcodecs shuffle + zstd 9)
V1_CODECS = {
    "topk_ids": [{"name": "bytes", "configuration": {"endian": "little"}},
                 {"name": "numcodecs.shuffle", "configuration": {"elementsize": 2}},
                 {"name": "zstd", "configuration": {"level": 9, "checksum": False}}],
    "topk_logp": [{"name": "numcodecs.fixedscaleoffset",
                   "configuration": {"offset": 0, "scale": -128, "dtype": "<f4", "astype": "<u2"}},
                  {"name": "numcodecs.delta", "configuration": {"dtype": "<u2"}},
                  {"name": "bytes", "configuration": {"endian": "little"}},
                  {"name": "numcodecs.shuffle", "configuration": {"elementsize": 2}},
                  {"name": "zstd", "configuration": {"level": 9, "checksum": False}}],
}


def confident_teacher(rows: int, vocab: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """Exact float64 teacher distributions, most of them confident: top-K ids and log-probs, and the tail
    log-mass outside them (a logsumexp over every other id) with the tail mass itself."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, vocab)) * 2.0
    peak = rng.uniform(4.0, 14.0, size=rows)  # the most likely token: 4..14 nats above the rest
    logits[np.arange(rows), rng.integers(0, vocab, size=rows)] += peak
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, ids, axis=1)
    outside = logp.copy()
    np.put_along_axis(outside, ids, -np.inf, axis=1)
    m = outside.max(1)
    tail = m + np.log(np.exp(outside - m[:, None]).sum(1))
    return {"ids": ids, "top": top, "tail": tail}


def kl_rows(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of two [rows, bins] log-probability arrays (float64, both normalised)."""
    p = np.exp(p_log)
    return np.where(p > 0, p * (p_log - q_log), 0.0).sum(1)


def renormalised(bins: np.ndarray) -> np.ndarray:
    m = bins.max(1, keepdims=True)
    return bins - (m + np.log(np.exp(bins - m).sum(1, keepdims=True)))


def _teacher_section(base: dict, rows: dict, with_tail: bool, counts: bool = False) -> dict[str, np.ndarray]:
    targets = H.response_targets(base)
    target = np.full(targets.shape[0], -3.0, dtype=np.float32)
    arrays = {"topk_ids": rows["ids"], "topk_logp": rows["top"].astype(np.float32), "target_logp": target,
              "logp_sum": H._sequence_sums(base, target)}
    if with_tail:
        arrays["tail_logp"] = rows["tail"].astype(np.float32)
    if counts:  # an adaptive K (format version 3): 1..K kept per row, padding past it (the tail left as is)
        count = np.arange(rows["ids"].shape[0]) % rows["ids"].shape[1] + 1
        keep = np.arange(rows["ids"].shape[1])[None, :] < count[:, None]
        arrays.update(topk_count=count.astype(np.uint16), topk_ids=np.where(keep, rows["ids"], 0),
                      topk_logp=np.where(keep, arrays["topk_logp"], np.float32(fmt.LOGP_FLOOR)))
    return arrays


def write_tail_store(location: str, *, with_tail: bool = True, seed: int = 3,
                     counts: bool = False) -> tuple[TeacherStore, dict]:
    """Two parts of pairs with a confident teacher section (K = 8, vocabulary 1000); returns the exact rows."""
    store = H.create_store(location, num_examples={"train": 4}, examples_per_part=2)
    exact = {}
    for part in range(store.num_parts("train")):
        start, stop = store.part_range("train", part)
        rng = np.random.default_rng([seed, part])
        base = H._sequences(rng, range(start, stop), lambda ex: (fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED))
        store.write_section("train", part, fmt.SET_PAIRS, fmt.BASE, base)
        rows = confident_teacher(int(base["response_offsets"][-1]), H.VOCAB_SIZE, H.TOP_K, seed + part)
        store.write_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER,
                            _teacher_section(base, rows, with_tail, counts))
        exact[part] = rows
    store.refresh_manifest()
    return store, exact


def as_version_1(location: str) -> None:
    """Rewrite a store the way format version 1 wrote it: its codecs for ids and log-probs, version 1 in the root.

    The decoded values, hence the recorded checksums, stay the same (what version 1 would have written).
    """
    H.as_version(location, 1)


# -- the teacher's tail -----------------------------------------------------------------------------


def test_stored_tail_keeps_every_row_within_the_kl_bound(tmp_path):
    store, exact = write_tail_store(str(tmp_path / "tail.zarr"))
    worst_with_tail = worst_without = 0.0
    empty_tails = 0
    for part, rows in exact.items():
        got = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
        assert np.array_equal(got["topk_ids"], rows["ids"])
        floor = rows["tail"] >= fmt.LOGP_FLOOR
        assert np.abs(got["tail_logp"][floor] - rows["tail"][floor]).max() <= fmt.LOGP_MAX_ABS_ERROR + 1e-6
        exact_bins = np.concatenate([rows["top"], rows["tail"][:, None]], 1)
        stored = np.concatenate([got["topk_logp"], got["tail_logp"][:, None]], 1).astype(np.float64)
        kl = kl_rows(exact_bins, renormalised(stored))
        worst_with_tail = max(worst_with_tail, kl.max())
        # without the stored tail (version 1): 1 - sum(exp(top-K)), clamped at 1e-12 as store_size.py does
        tail_v1 = np.log(np.clip(1 - np.exp(got["topk_logp"].astype(np.float64)).sum(1), 1e-12, 1))
        worst_without = max(worst_without, kl_rows(exact_bins, renormalised(
            np.concatenate([got["topk_logp"].astype(np.float64), tail_v1[:, None]], 1))).max())
        empty_tails += int((np.exp(got["topk_logp"].astype(np.float64)).sum(1) >= 1).sum())
    # Hoeffding: every stored bin's log within e = 1/256 of the exact one -> KL <= e^2 / 2 per row
    assert fmt.KL_BOUND_WITH_TAIL == pytest.approx((0.5 / 128) ** 2 / 2)
    assert worst_with_tail <= fmt.KL_BOUND_WITH_TAIL
    # the same teacher without its tail: rounding empties the tail bin of some rows, whose KL is far larger
    assert empty_tails > 0 and worst_without > 1e-3 > 100 * fmt.KL_BOUND_WITH_TAIL
    assert store.verify() == []


def test_plain_zarr_reads_the_real_values(tmp_path):
    from store.inspect import store_info

    store, exact = write_tail_store(str(tmp_path / "plain.zarr"))
    assert store_info(store)["teacher_tail"] == {"teacher_sections": 2, "with_tail_logp": 2}
    root = zarr.open_group(store.location, mode="r")
    assert root.attrs["format"]["version"] == fmt.FORMAT_VERSION == 4  # version 4 (portable codecs) keeps all of this
    description = root.attrs["format_description"]
    assert "tail_logp" in description["arrays"]["teacher"] and "renormalise" in description["tail"]
    for part, rows in exact.items():
        teacher = root[f"train/part-{part:05d}/pairs/teacher"]
        assert np.array_equal(teacher["topk_ids"][...], rows["ids"])  # the real ids, no table to apply
        # log-probs: integers, and the rule in their attributes (store.format "decoding")
        steps, tail = teacher[fmt.ARRAY_TOPK_LOGP_STEPS], teacher["tail_logp"]
        top = H.decode_by_attributes(steps[...], steps.attrs.asdict())
        assert np.abs(top - rows["top"].clip(fmt.LOGP_FLOOR)).max() <= fmt.LOGP_MAX_ABS_ERROR + 1e-6
        tail_values = H.decode_by_attributes(tail[...], tail.attrs.asdict())
        assert np.abs(tail_values - rows["tail"].clip(fmt.LOGP_FLOOR)).max() <= fmt.LOGP_MAX_ABS_ERROR + 1e-6
        # ids need only codecs of the Zarr v3 core (bytes, blosc, crc32c)
        meta = json.load(open(os.path.join(store.location, f"train/part-{part:05d}/pairs/teacher/topk_ids/zarr.json")))
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
        assert meta["codecs"][1]["configuration"]["shuffle"] == "shuffle"


def test_stream_and_kd_use_the_stored_tail(tmp_path):
    from train import losses, methods
    from train.batches import collate

    store, exact = write_tail_store(str(tmp_path / "kd.zarr"))
    examples = list(ExampleStream(store, "train", {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]}, shuffle=False))
    batch = collate(examples)
    assert batch.has[losses.TAIL_LOGP].all()
    rows = torch.arange(batch.num_response_tokens)
    bins = methods.kd_teacher_rows(batch, rows, methods.Settings())
    sections = [store.read_section("train", p, fmt.SET_PAIRS, fmt.SECTION_TEACHER) for p in sorted(exact)]
    stored = np.concatenate([np.concatenate([s["topk_logp"] for s in sections]),
                             np.concatenate([s["tail_logp"] for s in sections])[:, None]], 1).astype(np.float64)
    np.testing.assert_allclose(bins.double().numpy(), renormalised(stored), rtol=0, atol=1e-6)
    # against the exact teacher: within the format's bound on every row
    exact_bins = np.concatenate([np.concatenate([exact[p]["top"] for p in exact]),
                                 np.concatenate([exact[p]["tail"] for p in exact])[:, None]], 1)
    assert kl_rows(exact_bins, bins.double().numpy()).max() <= fmt.KL_BOUND_WITH_TAIL + 1e-6


def test_precompute_scoring_writes_the_exact_tail():
    from transformers import LlamaConfig, LlamaForCausalLM

    from precompute import scoring

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a sharp output layer: confident rows whose tail log1mexp would lose
        model.lm_head.weight.mul_(1000.0)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 300, size=n) for n in (9, 14, 6)]
    prompts = [3, 5, 2]
    scored = scoring.score_sequences(model, sequences, prompts, top_k=5, batch_tokens=32)
    arrays = scoring.scored_arrays(scored, topk=True)
    assert set(arrays) == {"target_logp", "logp_sum", "topk_ids", "topk_logp", "tail_logp"}
    rows = 0
    for seq, p, got in zip(sequences, prompts, scored):
        with torch.no_grad():
            logits = model(torch.as_tensor(seq[None], dtype=torch.long)).logits[0, p - 1:-1].double()
        logp = torch.log_softmax(logits, -1)
        for r in range(logp.shape[0]):
            others = [x for v, x in enumerate(logp[r].tolist()) if v not in got.topk_ids[r].tolist()]
            m = max(others)
            expected = m + math.log(math.fsum(math.exp(x - m) for x in others))
            assert got.tail_logp[r] == pytest.approx(expected, abs=1e-4)
            rows += 1
    assert arrays["tail_logp"].shape == (rows,)
    assert (arrays["tail_logp"] < -10).any()  # the case where 1 - sum(top-K) has no precision left


# -- version 1 stores ---------------------------------------------------------------------------------


def test_version_1_store_still_streams_verifies_and_trains_kd(tmp_path):
    from train import losses, methods
    from train.batches import collate

    location = str(tmp_path / "v1.zarr")
    H.write_synthetic_store(location, num_examples={"train": 4}, examples_per_part=2)
    reference = {p: TeacherStore.open(location).read_section("train", p, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
                 for p in range(2)}
    as_version_1(location)
    for name, codecs in V1_CODECS.items():
        meta = json.load(open(os.path.join(location, "train/part-00000/pairs/teacher", name, "zarr.json")))
        assert meta["codecs"] == codecs

    from store.inspect import store_info

    store = TeacherStore.open(location)
    assert store.format_version == 1 and store.verify() == []
    assert store_info(store)["teacher_tail"] == {"teacher_sections": 4, "with_tail_logp": 0}
    needs = {fmt.SET_PAIRS: [fmt.SECTION_TEACHER, fmt.SECTION_STUDENT_INIT]}
    examples = sorted(ExampleStream(store, "train", needs, shuffle=False), key=lambda e: e.example_index)
    streamed = {name: np.concatenate([s.response[f"teacher/{name}"] for e in examples
                                      for s in sorted(e.sequences, key=lambda s: s.role)])
                for name in ("topk_ids", "topk_logp")}
    for name in streamed:  # bit for bit what version 2's writer stored: the same decoded values
        want = np.concatenate([reference[p][name] for p in range(2)])
        assert streamed[name].tobytes() == want.tobytes()
    batch = collate(examples)
    assert losses.TAIL_LOGP not in batch.response
    rows = torch.arange(batch.num_response_tokens)
    bins = methods.kd_teacher_rows(batch, rows, methods.Settings())
    top = batch.response["teacher/topk_logp"].double()
    tail = torch.log1p(-top.exp().sum(-1))  # the version 1 tail, 1 - sum(exp(top-K)), where it is positive
    expected = torch.cat([top, tail[:, None]], 1)
    torch.testing.assert_close(bins.double(), expected - torch.logsumexp(expected, -1, keepdim=True),
                               rtol=0, atol=1e-5)
    # a writer refuses to add sections of its version (4) to it; readers take it as it is
    with pytest.raises(FormatMismatch, match="version 1.*writes version 4"):
        TeacherStore.create(location, tokenizer=H.TOKENIZER, vocab_size=H.VOCAB_SIZE, examples_per_part=2)


def test_mixed_sets_tail_per_row(tmp_path):
    """Rows of a section with tail_logp use it; rows of a section without fall back to the top-K, per row."""
    from train import losses, methods
    from train.batches import collate

    with_tail, exact = write_tail_store(str(tmp_path / "a.zarr"))
    without, _ = write_tail_store(str(tmp_path / "b.zarr"), with_tail=False)
    a = list(ExampleStream(with_tail, "train", {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]}, shuffle=False))
    b = list(ExampleStream(without, "train", {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]}, shuffle=False))
    batch = collate(a[:1] + b[:1])
    has = batch.has[losses.TAIL_LOGP]
    assert has.any() and not has.all()
    rows = torch.arange(batch.num_response_tokens)
    bins = methods.kd_teacher_rows(batch, rows, methods.Settings())
    top = batch.response["teacher/topk_logp"]
    torch.testing.assert_close(bins[has], losses.teacher_kd_bins(top[has], batch.response[losses.TAIL_LOGP][has]))
    torch.testing.assert_close(bins[~has], losses.teacher_kd_bins(top[~has]))


@pytest.mark.parametrize("version,counts", [(fmt.FORMAT_VERSION, False), (fmt.FORMAT_VERSION, True), (3, True),
                                            (1, False)],
                         ids=["this-writer", "this-writer-adaptive-k", "version-3-adaptive-k", "version-1"])
def test_streamed_values_equal_zarr_across_many_chunks(tmp_path, monkeypatch, version, counts):
    """Chunks of a few rows: the stream decodes full chunks straight into place and the last one partly;
    what it gives is, bit for bit, what zarr reads, for both versions' codecs and chunkings (and the
    adaptive K's counts)."""
    monkeypatch.setattr(fmt, "CHUNK_ROWS", {axis: 5 for axis in fmt.CHUNK_ROWS})
    location = str(tmp_path / f"chunks-v{version}.zarr")
    store, _ = write_tail_store(location, with_tail=version >= 2, counts=counts)
    if version != fmt.FORMAT_VERSION:
        H.as_version(location, version)
    store = TeacherStore.open(location)
    assert store.format_version == version
    spec = fmt.SECTION_ARRAYS[fmt.SECTION_TEACHER][1]
    meta = json.load(open(os.path.join(location, "train/part-00000/pairs/teacher", fmt.stored_name(spec, version),
                                       "zarr.json")))
    rows = meta["shape"][0]
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    assert rows > 2 * chunk  # several chunks
    if version == 1:
        assert rows % chunk != 0  # and a last one partly past the end
    needs = {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]}
    examples = {e.example_index: e for e in ExampleStream(store, "train", needs, shuffle=False)}
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_PAIRS)
        teacher = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
        assert ("tail_logp" in teacher) == (version >= 2)
        assert ("topk_count" in teacher) == counts
        for s, ex in enumerate(base["example_index"].tolist()):
            seq = examples[ex].one(fmt.SET_PAIRS, int(base["role"][s]))
            t0, t1 = base["token_offsets"][s], base["token_offsets"][s + 1]
            r0, r1 = base["response_offsets"][s], base["response_offsets"][s + 1]
            assert seq.input_ids.tobytes() == base["input_ids"][t0:t1].tobytes()
            for name, values in teacher.items():
                if values.ndim and values.shape[0] == base["response_offsets"][-1]:
                    got = seq.response[f"teacher/{name}"]
                    assert got.dtype == values.dtype and got.tobytes() == values[r0:r1].tobytes(), name
                else:
                    assert seq.scalars[f"teacher/{name}"] == float(values[s])
