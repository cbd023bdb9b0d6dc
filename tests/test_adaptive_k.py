"""An adaptive K per token (``precompute teacher --top-p P``, store format version 3's ``topk_count``).

A real precompute run of a tiny teacher whose distributions range from confident
to flat writes a store; every number is checked against a direct float64
computation from the models themselves: the kept counts follow the cumulative
mass rule (the fewest of the top-K ids holding P, K the cap), the tail is the
mass outside the kept ids, padding is id 0 and the floor in both the teacher and
the reference section, plain zarr reads the values and the counts, and KD, ADPA
and ``train evaluate`` read only the kept bins (KD over the kept bins and the
exact tail, ADPA with advantages on kept entries only). Stores without counts
(fixed K, version 2) read as before.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import zarr

from store import ExampleStream, FormatMismatch, TeacherStore
from store import format as fmt
from tests import store_helpers as H
from tests import tiny
from train import losses, methods
from train.batches import collate

TOP_P = 0.5914  # the spread teacher's answers to the student's greedy text hold 0.5899 / 0.5929 in 3 / 4 ids
K = 8


@pytest.fixture(scope="session")
def spread_teacher(tmp_path_factory):
    """A tiny teacher whose next-token distributions range from one id holding most of the mass to flat ones
    (the output layer of the usual tiny model scaled by 0.7), so that kept counts take values from 1 to K."""
    from transformers import LlamaForCausalLM

    directory = tiny.make_tiny_model(tmp_path_factory.mktemp("spread-teacher") / "teacher", seed=1, layers=3,
                                     hidden=48)
    model = LlamaForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.7)  # tied: the embeddings shrink too, which is fine for a test model
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def top_p_store(tmp_path_factory, spread_teacher, tiny_models, tiny_dataset):
    """`precompute teacher --top-p 0.5914 --top-k 8` with the default passes (pairs, dpo_ref, adpa)."""
    from precompute.teacher import TeacherConfig, run_teacher

    out = tmp_path_factory.mktemp("top-p-store") / "adpa.zarr"
    run_teacher(TeacherConfig(out=str(out), teacher=str(spread_teacher), student=str(tiny_models[1]),
                              dataset=str(tiny_dataset), top_k=K, top_p=TOP_P, max_length=96, max_new_tokens=12,
                              examples_per_part=4, device="cpu", dtype="float32", progress=False))
    return out


def exact_log_softmax(model, input_ids: np.ndarray, prompt_length: int) -> np.ndarray:
    """[r, V] float64 log-softmax of ``model``'s float32 logits at the positions predicting the response."""
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids[None], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits[prompt_length - 1:-1].double(), -1).numpy()


def rule(top_desc: np.ndarray, p: float) -> np.ndarray:
    """The smallest k with sum of the k largest probabilities >= p, capped at K (rows of descending log-probs)."""
    cumulative = np.cumsum(np.exp(top_desc), axis=1)
    return np.minimum((cumulative < p).sum(1) + 1, top_desc.shape[1])


def logsumexp(values: np.ndarray) -> float:
    m = values.max()
    return float(m + np.log(np.exp(values - m).sum()))


def sections_by_sequence(location, sequence_set: str, section: str):
    """Per sequence of the train split, read with plain zarr: (input ids, prompt length, {array: its rows})."""
    root = zarr.open_group(str(location), mode="r")
    out = []
    for part in range(len(list(root["train"].group_keys()))):
        base = root[f"train/{fmt.part_name(part)}/{sequence_set}"]
        # log-probs decoded by the rule in their attributes (format 4), under the name of what they decode to
        arrays = {(array.attrs.get(fmt.ATTRS_NAMESPACE) or {}).get("decodes_to", name):
                  H.decode_by_attributes(array[...], array.attrs.asdict())
                  for name, array in root[f"train/{fmt.part_name(part)}/{sequence_set}/{section}"].arrays()}
        tok, resp = base["token_offsets"][...], base["response_offsets"][...]
        ids, prompts = base["input_ids"][...], base["prompt_length"][...]
        for s in range(len(prompts)):
            rows = {name: values[resp[s]:resp[s + 1]] for name, values in arrays.items()
                    if values.shape[0] == resp[-1]}
            out.append((ids[tok[s]:tok[s + 1]], int(prompts[s]), rows))
    return out


def test_scoring_counts_tail_and_padding_against_float64(spread_teacher):
    """precompute.scoring on its own: counts by the rule, the tail outside the kept ids, padding past them;
    top_p = 1 is the fixed K, without a count."""
    from transformers import LlamaForCausalLM

    from precompute import scoring

    model = LlamaForCausalLM.from_pretrained(spread_teacher).eval()
    rng = np.random.default_rng(5)
    sequences = [rng.integers(0, model.config.vocab_size, size=n) for n in (40, 33, 52)]
    prompts = [6, 4, 9]
    scored = scoring.score_sequences(model, sequences, prompts, top_k=K, top_p=TOP_P, batch_tokens=64)
    fixed = scoring.score_sequences(model, sequences, prompts, top_k=K, batch_tokens=64)
    counts = []
    for seq, p, got, full in zip(sequences, prompts, scored, fixed):
        logp = exact_log_softmax(model, seq, p)
        top = -np.sort(-logp, axis=1)[:, :K]
        lo, hi = rule(top, TOP_P - 1e-4), rule(top, TOP_P + 1e-4)  # float32 logits: rows at the boundary may go either way
        assert ((got.topk_count >= lo) & (got.topk_count <= hi)).all()
        assert (got.topk_count[lo == hi] == lo[lo == hi]).all()
        assert full.topk_count is None and got.topk_count.dtype == np.int64
        for r, n in enumerate(got.topk_count):
            assert np.array_equal(got.topk_ids[r, :n], full.topk_ids[r, :n])
            assert (got.topk_ids[r, n:] == 0).all() and (got.topk_logp[r, n:] == fmt.LOGP_FLOOR).all()
            np.testing.assert_allclose(got.topk_logp[r, :n], logp[r, got.topk_ids[r, :n]], atol=1e-4)
            outside = np.delete(logp[r], got.topk_ids[r, :n])
            assert got.tail_logp[r] == pytest.approx(logsumexp(outside), abs=1e-4)
        counts.extend(got.topk_count.tolist())
    assert min(counts) == 1 and max(counts) == K and len(set(counts)) >= 3  # both extremes and values between
    arrays = scoring.scored_arrays(scored, topk=True)
    assert arrays["topk_count"].dtype == np.uint16 and arrays["topk_count"].tolist() == counts
    assert "topk_count" not in scoring.scored_arrays(fixed, topk=True)


def test_top_p_store_counts_follow_the_cumulative_mass_rule(top_p_store, spread_teacher):
    from transformers import LlamaForCausalLM

    store = TeacherStore.open(str(top_p_store))
    assert store.format_version == fmt.FORMAT_VERSION == 4 and store.verify() == []
    for step in ("pairs/teacher", "generated/teacher"):
        assert store.pass_record(step).settings["top_p"] == TOP_P
        assert store.pass_record(step).settings["top_k"] == K
    model = LlamaForCausalLM.from_pretrained(spread_teacher).eval()
    counts = []
    for sequence_set in (fmt.SET_PAIRS, fmt.SET_GENERATED):
        for input_ids, prompt, rows in sections_by_sequence(top_p_store, sequence_set, fmt.SECTION_TEACHER):
            logp = exact_log_softmax(model, input_ids, prompt)
            top = -np.sort(-logp, axis=1)[:, :K]
            count = rows["topk_count"].astype(np.int64)
            lo, hi = rule(top, TOP_P - 1e-4), rule(top, TOP_P + 1e-4)
            assert ((count >= lo) & (count <= hi)).all(), (count, lo, hi)
            assert (count[lo == hi] == lo[lo == hi]).all()
            for r, n in enumerate(count):
                ids, stored = rows["topk_ids"][r], rows["topk_logp"][r]
                # kept: the teacher's n most likely ids (by exact log-prob), stored within the quantiser's error
                np.testing.assert_allclose(np.sort(logp[r, ids[:n]])[::-1], top[r, :n], atol=1e-4)
                np.testing.assert_allclose(stored[:n], logp[r, ids[:n]], atol=fmt.LOGP_MAX_ABS_ERROR + 1e-5)
                # padding: id 0 and the floor, as plain zarr reads them
                assert (ids[n:] == 0).all() and (stored[n:] == fmt.LOGP_FLOOR).all()
                # the tail: the exact mass outside the kept ids, the dropped entries' mass included
                tail = logsumexp(np.delete(logp[r], ids[:n]))
                assert rows["tail_logp"][r] == pytest.approx(tail, abs=fmt.LOGP_MAX_ABS_ERROR + 1e-4)
                bins = np.append(logp[r, ids[:n]], tail)
                assert logsumexp(bins) == pytest.approx(0.0, abs=1e-9)  # kept bins and tail: the whole mass
                stored_bins = np.append(stored[:n], rows["tail_logp"][r]).astype(np.float64)
                stored_bins -= logsumexp(stored_bins)
                kl = float(np.sum(np.exp(bins) * (bins - stored_bins)))
                assert kl <= fmt.KL_BOUND_WITH_TAIL + 1e-9
            counts.extend(count.tolist())
    assert {1, K} <= set(counts) and len(set(counts)) >= 3  # both extremes and counts between


def test_reference_section_ignores_padding(top_p_store, tiny_models):
    """The reference is read at the kept ids; its entries past the teacher's count are the floor."""
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(tiny_models[1]).eval()  # the student's initial model
    teacher = sections_by_sequence(top_p_store, fmt.SET_GENERATED, fmt.SECTION_TEACHER)
    ref = sections_by_sequence(top_p_store, fmt.SET_GENERATED, fmt.SECTION_REFERENCE)
    assert teacher and len(teacher) == len(ref)
    padded = 0
    for (input_ids, prompt, t_rows), (_, _, r_rows) in zip(teacher, ref):
        logp = exact_log_softmax(reference, input_ids, prompt)
        for r, n in enumerate(t_rows["topk_count"].astype(np.int64)):
            ids = t_rows["topk_ids"][r]
            np.testing.assert_allclose(r_rows["topk_logp"][r, :n], np.maximum(logp[r, ids[:n]], fmt.LOGP_FLOOR),
                                       atol=fmt.LOGP_MAX_ABS_ERROR + 1e-4)
            assert (r_rows["topk_logp"][r, n:] == fmt.LOGP_FLOOR).all()
            padded += K - n
    assert padded > 0


def test_plain_zarr_reads_counts_and_values(top_p_store):
    root = zarr.open_group(str(top_p_store), mode="r")
    description = root.attrs["format_description"]
    assert "topk_count" in description["arrays"]["teacher"] and "padding" in description["adaptive_k"]
    assert root.attrs["format"]["version"] == 4
    store = TeacherStore.open(str(top_p_store))
    for part in range(store.num_parts("train")):
        teacher = root[f"train/{fmt.part_name(part)}/pairs/teacher"]
        count = teacher["topk_count"]
        assert count.dtype == np.uint16 and count.shape == (teacher["topk_ids"].shape[0],)
        values = count[...]
        assert values.min() >= 1 and values.max() <= K
        via_store = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
        for name in ("topk_ids", "topk_logp", "tail_logp", "topk_count"):  # the project reads what zarr reads
            array = teacher[fmt.ARRAY_TOPK_LOGP_STEPS if name == "topk_logp" else name]  # (with the stored rule)
            assert np.array_equal(via_store[name], H.decode_by_attributes(array[...], array.attrs.asdict())), name


def _batch_and_model(store_path, student_dir, n_examples=3, needs=None):
    from transformers import LlamaForCausalLM

    terms = methods.resolve_terms("dckd+adpa")
    stream = ExampleStream(TeacherStore.open(str(store_path)), "train", needs or methods.needs_of(terms),
                           shuffle=False)
    batch = collate(list(itertools.islice(stream, n_examples)), pad_id=0)
    # the stored values as float64: signals derived from them (KD's bins, ADPA's advantage) then are too
    batch.response = {k: v.double() if v.is_floating_point() else v for k, v in batch.response.items()}
    model = LlamaForCausalLM.from_pretrained(student_dir).double().eval()
    return terms, batch, model


def literal_kd(row_logp: list[float], kept: list[int], teacher: list[float], tail: float) -> float:
    """KL over the kept ids and the tail, literally (plain floats): teacher bins renormalised, the student's tail
    the logsumexp of its log-softmax over every other id."""
    p = [math.exp(t) for t in teacher] + [math.exp(tail)]
    total = math.fsum(p)
    outside = [x for v, x in enumerate(row_logp) if v not in set(kept)]
    m = max(outside)
    log_q = [row_logp[i] for i in kept] + [m + math.log(math.fsum(math.exp(x - m) for x in outside))]
    return math.fsum(pj / total * (math.log(pj / total) - lq) for pj, lq in zip(p, log_q) if pj > 0)


@pytest.mark.parametrize("unclipped", [False, True])
def test_kd_and_adpa_from_a_top_p_store_use_only_the_kept_entries(top_p_store, tiny_models, unclipped):
    terms, batch, model = _batch_and_model(top_p_store, tiny_models[1])
    assert losses.TOPK_COUNT in batch.response and batch.has[losses.TOPK_COUNT].all()
    settings = methods.Settings(adpa_unclipped=unclipped)
    with torch.no_grad():
        out = methods.student_outputs(model, batch, methods.token_requests(terms), settings, chunk_size=5)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    student = torch.log_softmax(logits[batch.resp_seq, batch.resp_pos].double(), -1)
    ids, top = batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"].double()
    tail, ref = batch.response["teacher/tail_logp"].double(), batch.response["reference/topk_logp"].double()
    count = batch.response[losses.TOPK_COUNT]
    seen = set()
    for r in range(batch.num_response_tokens):
        n = int(count[r])
        kept = ids[r, :n].tolist()
        row = student[r].tolist()
        seen.add(n)
        if out.computed["kd"][r]:
            expected = literal_kd(row, kept, top[r, :n].tolist(), float(tail[r]))
            assert float(out.kd[r]) == pytest.approx(expected, rel=1e-10, abs=1e-13)
        if out.computed["adpa"][r]:
            a = [float(t - x) for t, x in zip(top[r, :n], ref[r, :n])]
            if not unclipped:
                a = [min(max(x, 1e-8), 1 - 1e-8) for x in a]
            expected = -math.fsum(math.exp(row[i]) * x for i, x in zip(kept, a))
            assert float(out.adpa[r]) == pytest.approx(expected, rel=1e-10, abs=1e-13)
    assert 1 in seen and K in seen
    assert out.computed["kd"].any() and out.computed["adpa"].any()


def test_train_evaluate_kl_honours_the_counts(top_p_store, tiny_models):
    from train.config import EvaluateConfig
    from train.evaluate import evaluate

    report = evaluate(EvaluateConfig(model=str(tiny_models[1]), cache=str(top_p_store), split="train", device="cpu",
                                     dtype="float32"))
    _, batch, model = _batch_and_model(top_p_store, tiny_models[1], n_examples=100,
                                       needs={fmt.SET_PAIRS: [fmt.SECTION_TEACHER]})
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    student = torch.log_softmax(logits[batch.resp_seq, batch.resp_pos].double(), -1)
    ids, top = batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"].double()
    tail, count = batch.response["teacher/tail_logp"].double(), batch.response[losses.TOPK_COUNT]
    for role, key in ((fmt.ROLE_CHOSEN, "kl_chosen"), (fmt.ROLE_REJECTED, "kl_rejected")):
        rows = methods.response_rows(batch, fmt.SET_PAIRS, role).nonzero().squeeze(1).tolist()
        kls = [literal_kd(student[r].tolist(), ids[r, :int(count[r])].tolist(), top[r, :int(count[r])].tolist(),
                          float(tail[r])) for r in rows]
        assert report[key] == pytest.approx(math.fsum(kls) / len(kls), rel=1e-4)


def test_fixed_k_and_version_2_stores_read_as_before(tmp_path, tiny_store):
    """top-p 1 (the default) writes no count and no top_p record; a version 2 store (no count) streams and trains
    as before, every entry a bin; a writer refuses to add sections of its version to it."""
    store = TeacherStore.open(str(tiny_store))
    assert "top_p" not in store.pass_record("pairs/teacher").settings
    root = zarr.open_group(str(tiny_store), mode="r")
    assert "topk_count" not in root["train/part-00000/pairs/teacher"]

    import shutil

    v2 = tmp_path / "v2.zarr"
    shutil.copytree(tiny_store, v2)
    H.as_version(str(v2), 2)  # version 2's names and codecs, version 2 in the root
    old = TeacherStore.open(str(v2))
    assert old.format_version == 2 and old.verify() == []
    terms = methods.resolve_terms("dckd+adpa")
    batch = collate(list(itertools.islice(ExampleStream(old, "train", methods.needs_of(terms), shuffle=False), 2)))
    assert losses.TOPK_COUNT not in batch.response
    rows = torch.arange(batch.num_response_tokens)
    assert methods.kept_rows(batch, rows) is None
    ids = batch.response["teacher/topk_ids"]
    assert torch.equal(methods.topk_ids_rows(batch, rows, methods.Settings()), ids)
    torch.testing.assert_close(methods.kd_teacher_rows(batch, rows, methods.Settings()),
                               losses.teacher_kd_bins(batch.response["teacher/topk_logp"],
                                                      batch.response["teacher/tail_logp"]), rtol=0, atol=0)
    with pytest.raises(FormatMismatch, match="version 2.*writes version 4"):
        TeacherStore.open(str(v2), mode="a")


def test_mixed_rows_with_and_without_counts(top_p_store, tiny_store):
    """A batch of a top-p store's examples and a fixed-K store's: counts apply per row, the others keep all K."""
    needs = {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]}
    a = list(itertools.islice(ExampleStream(TeacherStore.open(str(top_p_store)), "train", needs, shuffle=False), 1))
    b = list(itertools.islice(ExampleStream(TeacherStore.open(str(tiny_store)), "train", needs, shuffle=False), 1))
    batch = collate(a + b)
    has = batch.has[losses.TOPK_COUNT]
    assert has.any() and not has.all()
    rows = torch.arange(batch.num_response_tokens)
    kept = methods.kept_rows(batch, rows)
    count = batch.response[losses.TOPK_COUNT]
    assert kept[~has].all()
    assert torch.equal(kept[has].sum(1), count[has])
    bins = methods.kd_teacher_rows(batch, rows, methods.Settings())
    assert torch.isfinite(bins[~has]).all()
    assert (torch.isinf(bins[has, :K]).sum(1) == K - count[has]).all()
