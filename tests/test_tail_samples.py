"""KD with tail samples (``precompute teacher --tail-samples S``, the pure sampled store ``--top-k 0``).

The loss (:func:`train.losses.kd_sampled_kl`) is checked against a literal computation of its equation (plain
floats), and its unbiasedness by enumeration on a small vocabulary: summing over every possible draw with its
probability, the expected value is the full-vocabulary KL and the expected gradient with respect to the
student's logits is the full-vocabulary KD gradient ``s - p``. The writer's draws are checked against an
independent implementation of the rule the format documents (seed per part, numpy uniforms, inverse CDF of the
model's own float64 distribution outside the kept ids), and the whole path (store on disk, the direct reader,
the student's forward, ``train student`` and ``train evaluate``) runs on real tiny models.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from store import TeacherStore
from store import format as fmt
from tests import store_helpers as H
from train import losses as L
from train import methods

S = 5
K = 8


# --------------------------------------------------------------------------- the estimator, literally


def literal_sampled_kl(student_row, kept_ids, teacher_kept, teacher_tail, sample_ids, sample_logp) -> float:
    """(plain floats) sum over the kept ids of p_k (log p_k - log s_k) + (m / S) sum_i (log p_i - log s_i), the
    teacher's kept bins and tail renormalised and the samples divided by the same total."""
    m = max(student_row)
    log_z = m + math.log(math.fsum(math.exp(x - m) for x in student_row))
    log_s = [x - log_z for x in student_row]
    bins = list(teacher_kept) + [teacher_tail]
    top = max(bins)
    total = top + math.log(math.fsum(math.exp(b - top) for b in bins))
    value = math.fsum(math.exp(t - total) * (t - total - log_s[i]) for i, t in zip(kept_ids, teacher_kept))
    weight = math.exp(teacher_tail - total) / len(sample_ids)
    return value + math.fsum(weight * (lp - total - log_s[j]) for j, lp in zip(sample_ids, sample_logp))


def _teacher(vocab: int, rows: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale, -1)


def _topk_and_tail(teacher: torch.Tensor, k: int):
    top_logp, top_ids = teacher.topk(k, dim=-1)
    tail = torch.logsumexp(teacher.scatter(-1, top_ids, float("-inf")), -1)
    return top_ids, top_logp, tail


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # ordinary logits, and a student sure of one id (extreme)
def test_kd_sampled_matches_the_literal_equation(k, scale):
    vocab, rows = 13, 6
    teacher = _teacher(vocab, rows, seed=1)
    student = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * scale
    ids, top, tail = _topk_and_tail(teacher, k)
    samples = torch.randint(0, vocab, (rows, S), generator=torch.Generator().manual_seed(3))
    samples = torch.where(torch.isin(samples, ids[0]) if k else torch.zeros_like(samples, dtype=torch.bool),
                          samples.new_full((), 12), samples)  # any ids: the estimator does not check them
    sample_logp = teacher.gather(-1, samples) + 0.01  # quantisation-like offsets: the totals do the work
    top = top - 0.003
    got = L.kd_sampled_kl(student, ids, top, tail, samples, sample_logp)
    for r in range(rows):
        expected = literal_sampled_kl(student[r].tolist(), ids[r].tolist(), top[r].tolist(), float(tail[r]),
                                      samples[r].tolist(), sample_logp[r].tolist())
        assert float(got[r]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_kd_sampled_in_float32_with_huge_logits_matches_float64():
    """A student near-certain of one id (logits of 1e4): float32 agrees with the float64 literal, finite."""
    vocab, rows = 11, 4
    teacher = _teacher(vocab, rows, seed=4)
    student = torch.zeros(rows, vocab, dtype=torch.float64)
    student[:, 0] = 1e4
    ids, top, tail = _topk_and_tail(teacher, 2)
    samples = torch.tensor([[5, 6, 6, 7, 9]] * rows)
    sample_logp = teacher.gather(-1, samples)
    got = L.kd_sampled_kl(student.float(), ids, top.float(), tail.float(), samples, sample_logp.float())
    assert torch.isfinite(got).all()
    for r in range(rows):
        expected = literal_sampled_kl(student[r].tolist(), ids[r].tolist(), top[r].tolist(), float(tail[r]),
                                      samples[r].tolist(), sample_logp[r].tolist())
        assert float(got[r]) == pytest.approx(expected, rel=1e-6)


def test_no_tail_mass_gives_the_kl_over_the_k_ids():
    """K = V: the writer pads the samples (id 0, the floor) and the tail holds nothing: the estimate is the KL of
    the K ids, exactly, with no gradient through the padding."""
    vocab = 5
    teacher = _teacher(vocab, 3, seed=5)
    ids, top, _ = _topk_and_tail(teacher, vocab)
    tail = torch.full((3,), fmt.LOGP_FLOOR, dtype=torch.float64)  # -inf stored at the floor
    samples = torch.zeros(3, S, dtype=torch.long)
    sample_logp = torch.full((3, S), fmt.LOGP_FLOOR, dtype=torch.float64)
    student = torch.randn(3, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    got = L.kd_sampled_kl(student, ids, top, tail, samples, sample_logp)
    full = (teacher.exp() * (teacher - torch.log_softmax(student, -1))).sum(-1)
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    torch.testing.assert_close(student.grad, torch.softmax(student, -1) - teacher.exp(), rtol=1e-10, atol=1e-12)


def _expected_over_draws(student, ids, top, tail, teacher_row, draws: int):
    """(E[value], E[d value / d logits]) over every ordered tuple of ``draws`` i.i.d. tail samples, each weighted by
    its probability prod_i p_{j_i} / m: an exact enumeration (no sampling)."""
    outside = [j for j in range(teacher_row.shape[0]) if j not in set(ids.tolist())]
    log_m = float(torch.logsumexp(teacher_row[outside], 0))
    value, gradient, total_probability = 0.0, torch.zeros_like(student), 0.0
    for drawn in itertools.product(outside, repeat=draws):
        probability = math.prod(math.exp(float(teacher_row[j]) - log_m) for j in drawn)
        leaf = student.detach().clone().requires_grad_(True)
        samples = torch.tensor([drawn])
        estimate = L.kd_sampled_kl(leaf[None], ids[None], top[None], tail[None], samples,
                                   teacher_row[samples])[0]
        estimate.backward()
        value += probability * float(estimate.detach())
        gradient += probability * leaf.grad
        total_probability += probability
    assert total_probability == pytest.approx(1.0, abs=1e-12)
    return value, gradient


@pytest.mark.parametrize("k,draws", [(2, 1), (2, 2), (0, 1), (0, 2), (4, 3)])
def test_expected_value_and_gradient_are_the_full_vocabulary_kd_by_enumeration(k, draws):
    """Over every possible draw: E[KL_hat] = KL(p || s) over the whole vocabulary, and E[grad] = s - p, the
    full-vocabulary KD gradient (which the tail bin's gradient is not)."""
    vocab = 6
    teacher = _teacher(vocab, 1, seed=7)[0]
    student = torch.randn(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 1.5
    ids, top, tail = (t[0] for t in _topk_and_tail(teacher[None], k))
    value, gradient = _expected_over_draws(student, ids, top, tail, teacher, draws)
    s = torch.softmax(student, -1)
    full_kl = float((teacher.exp() * (teacher - torch.log(s))).sum())
    assert value == pytest.approx(full_kl, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(gradient, s - teacher.exp(), rtol=1e-12, atol=1e-14)
    # the tail bin alone is biased: its gradient differs from s - p outside the top-K
    leaf = student.clone().requires_grad_(True)
    L.kd_tail_kl(leaf[None], ids[None], top[None], tail[None]).sum().backward()
    assert not torch.allclose(leaf.grad, s - teacher.exp(), atol=1e-6)


def test_gradient_of_one_draw_is_the_closed_form():
    """(P_K + m) s - p_K - (m / S) sum_i e_{j_i}: the analytic gradient's form, from autograd of the value."""
    vocab = 9
    teacher = _teacher(vocab, 1, seed=9)[0]
    ids, top, tail = (t[0] for t in _topk_and_tail(teacher[None], 3))
    samples = torch.tensor([4, 4, 7])
    student = torch.randn(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).requires_grad_()
    L.kd_sampled_kl(student[None], ids[None], top[None], tail[None], samples[None], teacher[samples][None]).sum().backward()
    expected = torch.softmax(student.detach(), -1)  # P_K + m = 1 (exact teacher)
    expected[ids] -= teacher[ids].exp()
    for j in samples.tolist():
        expected[j] -= tail.exp() / len(samples)
    torch.testing.assert_close(student.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_count", [False, True])
def test_chunked_analytic_gradient_equals_autograd(with_count):
    """``kd_sampled`` through :func:`train.losses.chunked_token_terms`: the written-out gradient is autograd's, and
    the values equal :func:`train.losses.kd_sampled_kl` (with an adaptive K's padding too)."""
    rows, vocab, hidden = 9, 17, 5
    teacher = _teacher(vocab, rows, seed=11)
    ids, top, tail = _topk_and_tail(teacher, 4)
    count = None
    if with_count:  # kept 1..4, the rest padding (id 0, the floor), the tail outside the kept ids
        count = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4, 2])
        kept = L.kept_entries(count, 4)
        tail = torch.stack([torch.logsumexp(teacher[r].scatter(-1, ids[r, :int(count[r])], float("-inf")), -1)
                            for r in range(rows)])
        ids = torch.where(kept, ids, torch.zeros_like(ids))
        top = torch.where(kept, top, torch.full_like(top, fmt.LOGP_FLOOR))
    samples = torch.randint(5, vocab, (rows, S), generator=torch.Generator().manual_seed(12))
    sample_logp = teacher.gather(-1, samples)
    h = torch.randn(rows, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    kept = None if count is None else L.kept_entries(count, 4)
    signals = {L.TOPK_IDS: ids if kept is None else L.kept_ids(ids, kept),
               L.KD_TEACHER: L.teacher_kd_bins(top, tail, kept=kept), L.TAIL_SAMPLE_IDS: samples,
               L.KD_SAMPLE_TEACHER: L.teacher_kd_sample_logp(top, tail, sample_logp, kept=kept)}
    coef = torch.randn(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    grads, values = [], []
    for analytic in (True, False):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = L.chunked_token_terms(hh, lambda x: x @ ww.T, [L.KD_SAMPLED], signals, chunk_size=4, analytic=analytic)
        (coef * out[L.KD_SAMPLED]).sum().backward()
        grads.append((hh.grad, ww.grad))
        values.append(out[L.KD_SAMPLED].detach())
    direct = L.kd_sampled_kl(h @ w.T, ids, top, tail, samples, sample_logp, count)
    torch.testing.assert_close(values[0], direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values[1], direct, rtol=1e-12, atol=1e-12)
    for analytic, autograd in zip(*grads):
        torch.testing.assert_close(analytic, autograd, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------- the writer's draws


def exact_log_softmax(model, input_ids: np.ndarray, prompt_length: int) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(input_ids, dtype=np.int64)[None])).logits[0]
    return torch.log_softmax(logits[prompt_length - 1:-1].double(), -1).numpy()


def rule_draws(logp: np.ndarray, excluded: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The documented rule, in numpy: the first id whose cumulative q (float64, excluded ids 0) exceeds u * total."""
    out = np.empty(uniforms.shape, dtype=np.int64)
    for r in range(logp.shape[0]):
        weights = np.exp(logp[r] - logp[r].max())
        weights[np.asarray(excluded[r], dtype=np.int64)] = 0.0
        weights /= weights.sum()
        cumulative = np.cumsum(weights)
        out[r] = np.searchsorted(cumulative, uniforms[r] * cumulative[-1], side="right")
    return out


def test_draws_follow_the_inverse_cdf_outside_the_kept_ids_whatever_the_batching(tiny_models):
    from transformers import LlamaForCausalLM

    from precompute import scoring

    model = LlamaForCausalLM.from_pretrained(tiny_models[0]).eval()
    rng = np.random.default_rng(3)
    sequences = [rng.integers(0, model.config.vocab_size, size=n) for n in (30, 21, 44)]
    prompts = [5, 3, 8]
    uniforms = [rng.random((len(s) - p, S)) for s, p in zip(sequences, prompts)]
    small = scoring.score_sequences(model, sequences, prompts, top_k=K, tail_uniforms=uniforms, batch_tokens=40)
    large = scoring.score_sequences(model, sequences, prompts, top_k=K, tail_uniforms=uniforms, batch_tokens=4096)
    adaptive = scoring.score_sequences(model, sequences, prompts, top_k=K, top_p=0.3, tail_uniforms=uniforms)
    for seq, p, u, a, b, c in zip(sequences, prompts, uniforms, small, large, adaptive):
        assert np.array_equal(a.tail_sample_ids, b.tail_sample_ids)  # batching does not change a draw
        logp = exact_log_softmax(model, seq, p)
        for got, kept in ((a, a.topk_ids), (c, [ids[:n] for ids, n in zip(c.topk_ids, c.topk_count)])):
            drawn = got.tail_sample_ids
            assert drawn.shape == u.shape and drawn.dtype == np.int64
            for r in range(drawn.shape[0]):
                assert not np.isin(drawn[r], kept[r]).any()  # never one of the kept ids
            # float32 logits: a draw within ~1e-6 of a boundary may go either way; all others are the rule's
            expected = rule_draws(logp, kept, u)
            assert (drawn == expected).mean() >= 0.99
            np.testing.assert_allclose(got.tail_sample_logp, np.take_along_axis(logp, drawn, 1), atol=1e-4)
    assert small[0].tail_sample_logp.dtype == np.float32
    arrays = scoring.scored_arrays(small, topk=True)
    assert arrays[fmt.ARRAY_TAIL_SAMPLE_IDS].shape == (sum(len(s) - p for s, p in zip(sequences, prompts)), S)


def test_draws_have_the_tail_distribution():
    """Many draws from one row: their frequencies are q = p / m outside the excluded ids (a chi-square-free bound:
    every frequency within 5 standard errors)."""
    from precompute import scoring

    logp = torch.log_softmax(torch.randn(2, 9, generator=torch.Generator().manual_seed(4)), -1)
    excluded = torch.tensor([[0, 3], [3, 3]])
    n = 40000
    uniforms = torch.from_numpy(np.random.default_rng(1).random((2, n)))
    ids, values = scoring.draw_tail_samples(logp, excluded, uniforms)
    assert torch.equal(values, logp.gather(-1, ids))
    for r in range(2):
        q = logp[r].double().exp()
        q[excluded[r]] = 0
        q /= q.sum()
        freq = torch.bincount(ids[r], minlength=9).double() / n
        assert (freq[excluded[r]] == 0).all()
        assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 1e-12).all()
    everything = torch.arange(9).expand(1, 9)
    pad_ids, pad_logp = scoring.draw_tail_samples(logp[:1], everything, uniforms[:1, :4])
    assert (pad_ids == scoring.PAD_ID).all() and (pad_logp == fmt.LOGP_FLOOR).all()


# --------------------------------------------------------------------------- stores


def _run(out: Path, tiny_models, tiny_dataset, **settings):
    from precompute.teacher import TeacherConfig, run_teacher

    teacher, student = tiny_models
    config = dict(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset), top_k=K,
                  max_length=96, max_new_tokens=12, examples_per_part=4, device="cpu", dtype="float32",
                  progress=False)
    run_teacher(TeacherConfig(**{**config, **settings}))
    return out


@pytest.fixture(scope="session")
def sampled_tail_store(tmp_path_factory, tiny_models, tiny_dataset):
    """Top-K 8 and 5 tail samples, with the default passes (pairs, dpo_ref, adpa)."""
    return _run(tmp_path_factory.mktemp("tail-samples") / "s.zarr", tiny_models, tiny_dataset, tail_samples=S,
                tail_seed=7)


@pytest.fixture(scope="session")
def pure_sampled_store(tmp_path_factory, tiny_models, tiny_dataset):
    """The pure sampled store: --top-k 0 --tail-samples 5, passes pairs and dpo_ref."""
    return _run(tmp_path_factory.mktemp("pure-sampled") / "p.zarr", tiny_models, tiny_dataset, top_k=0,
                tail_samples=S, passes=("pairs", "dpo_ref"))


def _part_seed(seed: int, split: str, part: int) -> int:
    return (seed + (0 if split == "train" else zlib.crc32(split.encode())) + part) % (1 << 63)


@pytest.mark.parametrize("which", ["sampled_tail_store", "pure_sampled_store"])
def test_store_holds_the_documented_draws(request, which, tiny_models):
    """Read with plain zarr (the rule in the attributes): the samples are the documented rule's draws from the
    teacher's own distribution outside the kept ids, with their log-probs; recorded in provenance and the key."""
    from transformers import LlamaForCausalLM

    location = request.getfixturevalue(which)
    k, seed = (K, 7) if which == "sampled_tail_store" else (0, 0)
    store = TeacherStore.open(str(location))
    assert store.verify() == []
    settings = store.pass_record("pairs/teacher").settings
    assert settings["tail_samples"] == S and settings["tail_seed"] == seed and settings["top_k"] == k
    if k:  # only the pairs' teacher draws: ADPA reads the generated answers' top-K alone
        assert "tail_samples" not in store.pass_record("generated/teacher").settings
    model = LlamaForCausalLM.from_pretrained(tiny_models[0]).eval()
    root = zarr.open_group(str(location), mode="r")
    matched = total = 0
    for split in store.splits():
        for part in range(store.num_parts(split)):
            base = root[f"{split}/{fmt.part_name(part)}/pairs"]
            teacher = root[f"{split}/{fmt.part_name(part)}/pairs/teacher"]
            arrays = {(a.attrs.get(fmt.ATTRS_NAMESPACE) or {}).get("decodes_to", name):
                      H.decode_by_attributes(a[...], a.attrs.asdict()) for name, a in teacher.arrays()}
            ids, logp = arrays["tail_sample_ids"], arrays["tail_sample_logp"]
            assert ids.shape == logp.shape == (arrays["target_logp"].shape[0], S)
            assert arrays["topk_ids"].shape == (ids.shape[0], k)
            uniforms = np.random.default_rng(_part_seed(seed, split, part)).random(ids.shape)
            tok, resp = base["token_offsets"][...], base["response_offsets"][...]
            input_ids, prompts = base["input_ids"][...], base["prompt_length"][...]
            for s in range(len(prompts)):
                rows = slice(resp[s], resp[s + 1])
                exact = exact_log_softmax(model, input_ids[tok[s]:tok[s + 1]], int(prompts[s]))
                expected = rule_draws(exact, arrays["topk_ids"][rows].astype(np.int64), uniforms[rows])
                matched += int((ids[rows] == expected).sum())
                total += expected.size
                np.testing.assert_allclose(logp[rows], np.take_along_axis(exact, ids[rows].astype(np.int64), 1),
                                           atol=fmt.LOGP_MAX_ABS_ERROR + 1e-4)
                tail = arrays["tail_logp"][rows]
                if not k:
                    np.testing.assert_allclose(tail, 0.0, atol=fmt.LOGP_MAX_ABS_ERROR)  # the whole mass
    assert total and matched >= 0.99 * total, (matched, total)
    description = root.attrs["format_description"]
    assert "tail_sample_ids" in description["arrays"]["teacher"] and "default_rng" in description["tail_samples"]


def test_the_draws_do_not_depend_on_the_batching_and_the_seed_is_in_the_key(tmp_path, tiny_models, tiny_dataset,
                                                                             sampled_tail_store):
    """Another token budget (other batches, other chunks) writes the same draws and ids and the same content key,
    and log-probs equal within float32 rounding (batches of other shapes round otherwise on several threads);
    another seed other draws and another key; a store without samples keeps the key it had."""
    again = _run(tmp_path / "again.zarr", tiny_models, tiny_dataset, tail_samples=S, tail_seed=7, batch_tokens=97,
                 passes=("pairs",))
    other = _run(tmp_path / "other.zarr", tiny_models, tiny_dataset, tail_samples=S, tail_seed=8, passes=("pairs",))
    plain = _run(tmp_path / "plain.zarr", tiny_models, tiny_dataset, passes=("pairs",))
    attrs = {name: TeacherStore.open(str(path)).section_attrs("train", 1, "pairs", "teacher")
             for name, path in (("first", sampled_tail_store), ("again", again), ("other", other), ("plain", plain))}
    exact = ("tail_sample_ids", "topk_ids", "topk_count")
    assert {n: attrs["again"]["checksums"].get(n) for n in exact} == {n: attrs["first"]["checksums"].get(n)
                                                                      for n in exact}
    first, second = (TeacherStore.open(str(path)).read_section("train", 1, "pairs", "teacher")
                     for path in (sampled_tail_store, again))
    assert set(first) == set(second)
    for name in set(first) - set(exact):
        np.testing.assert_allclose(second[name], first[name], rtol=1e-5, atol=fmt.LOGP_SCALE ** -1 + 1e-5,
                                   err_msg=name)
    assert attrs["again"]["content_key"] == attrs["first"]["content_key"]
    assert attrs["other"]["checksums"]["tail_sample_ids"] != attrs["first"]["checksums"]["tail_sample_ids"]
    assert attrs["other"]["checksums"]["topk_ids"] == attrs["first"]["checksums"]["topk_ids"]
    assert len({attrs[n]["content_key"] for n in ("first", "other", "plain")}) == 3
    assert "tail_sample_ids" not in attrs["plain"]["checksums"]
    assert "tail_samples" not in TeacherStore.open(str(plain)).pass_record("pairs/teacher").settings


def test_a_pure_sampled_store_reads_with_tensorstore(pure_sampled_store):
    """Width-0 top-K arrays are chunked 1 wide (the v3 grid wants positive chunk sizes): TensorStore and zarr read
    every array of the store alike."""
    import tensorstore as ts

    seen = 0
    for folder in Path(pure_sampled_store).glob("*/part-*/pairs/teacher/*"):
        if not folder.is_dir():
            continue
        meta = json.loads((folder / "zarr.json").read_text())
        assert all(n >= 1 for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
        by_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}, read=True).result()
        values = by_ts.read().result()
        assert np.array_equal(values, zarr.open_array(str(folder), mode="r")[...])
        seen += 1
    assert seen >= 7


@pytest.mark.parametrize("settings,message", [
    (dict(top_k=0), "--top-k 0 keeps no teacher log-prob: give --tail-samples"),
    (dict(top_k=0, tail_samples=S), "ADPA's advantage is taken at the teacher's top-K ids"),
    (dict(top_k=0, tail_samples=S, top_p=0.9, passes=("pairs",)), "an adaptive K chooses among the top-K"),
])
def test_refusals_before_any_model_loads(tmp_path, tiny_models, tiny_dataset, forbid_model_loading, settings,
                                         message):
    forbid_model_loading()
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "refused.zarr", tiny_models, tiny_dataset, **settings)
    assert not (tmp_path / "refused.zarr").exists()


# --------------------------------------------------------------------------- training and evaluation


def _batch(location, n_examples=3):
    return H.float64_batch(location, "dckd", n_examples)


# (the pure sampled store with "bin" is refused before training: test_train_refuses_a_tail_setting_...)
@pytest.mark.parametrize("which,kd_tail", [("sampled_tail_store", "auto"), ("sampled_tail_store", "samples"),
                                          ("sampled_tail_store", "bin"), ("pure_sampled_store", "auto"),
                                          ("pure_sampled_store", "samples")])
def test_student_outputs_use_the_samples_as_kd_tail_says(request, tiny_models, which, kd_tail):
    from transformers import LlamaForCausalLM

    location = request.getfixturevalue(which)
    terms, batch = _batch(location)
    model = LlamaForCausalLM.from_pretrained(tiny_models[1]).double()
    settings = methods.Settings(kd_tail=kd_tail)
    out = methods.student_outputs(model, batch, methods.token_requests(terms), settings, chunk_size=6)
    pairs = methods.response_rows(batch, "pairs", None)
    sampled = out.computed[L.KD_SAMPLED]
    assert torch.equal(out.computed[L.KD], pairs)
    assert torch.equal(sampled, pairs if kd_tail != "bin" else torch.zeros_like(pairs))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = logits[batch.resp_seq, batch.resp_pos]
    r = batch.response
    if kd_tail == "bin":
        direct = L.kd_tail_kl(rows, r["teacher/topk_ids"], r["teacher/topk_logp"], r["teacher/tail_logp"])
    else:
        direct = L.kd_sampled_kl(rows, r["teacher/topk_ids"], r["teacher/topk_logp"], r["teacher/tail_logp"],
                                 r["teacher/tail_sample_ids"], r["teacher/tail_sample_logp"])
    torch.testing.assert_close(out.kd[pairs].detach(), direct[pairs], rtol=1e-10, atol=1e-12)
    assert (out.kd[~pairs] == 0).all()


def test_a_store_without_samples_trains_as_before_and_refuses_kd_tail_samples_in_the_batch(tiny_store):
    terms, batch = _batch(tiny_store)
    rows = methods.response_rows(batch, "pairs", None)
    bin_rows, sampled = methods.kd_rows_by_tail(batch, rows, methods.Settings())
    assert torch.equal(bin_rows, rows) and not sampled.any()
    with pytest.raises(ValueError, match="--kd-tail samples: the batch has KD rows without tail samples"):
        methods.kd_rows_by_tail(batch, rows, methods.Settings(kd_tail="samples"))


def test_train_refuses_a_tail_setting_the_store_cannot_serve(tmp_path, tiny_store, pure_sampled_store,
                                                             forbid_model_loading):
    from train.config import TrainConfig, TrainError
    from train.preflight import prepare

    forbid_model_loading()
    with pytest.raises(TrainError, match="--kd-tail samples: .* has no tail samples"):
        prepare(TrainConfig(cache=str(tiny_store), method="dckd", kd_tail="samples", out=str(tmp_path / "a")))
    with pytest.raises(TrainError, match="--kd-tail bin: .* keeps no top-K .* KD would be 0"):
        prepare(TrainConfig(cache=str(pure_sampled_store), method="kd", kd_tail="bin", out=str(tmp_path / "b")))
    prepare(TrainConfig(cache=str(tiny_store), method="dpo", kd_tail="samples", out=str(tmp_path / "c")))  # no KD
    # ADPA on a pure sampled store: not the suggestion of a command that --top-k 0 refuses
    with pytest.raises(TrainError, match="needs ADPA's generated answers .* keeps no top-K"):
        prepare(TrainConfig(cache=str(pure_sampled_store), method="dckd+adpa", out=str(tmp_path / "d")))


def test_train_and_evaluate_on_a_pure_sampled_store(tmp_path, pure_sampled_store, tiny_models):
    """The command lines end to end: dckd trains from the pure sampled store (the choice recorded in config.yaml),
    and train evaluate reports the sampled KL, the mean of the estimate over the split's tokens."""
    from click.testing import CliRunner

    from train.cli import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["student", "--cache", str(pure_sampled_store), "--method", "dckd",
                                       "--student", str(tiny_models[1]), "--out", str(run), "--max-steps", "2",
                                       "--lr", "1e-3", "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["kd_tail"] == "auto"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_chosen" in str(m) for m in metrics)
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(pure_sampled_store), "--model", str(run),
                                       "--split", "train", "--device", "cpu", "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kl_tail"] == "samples"
    from transformers import LlamaForCausalLM

    terms, batch = _batch(pure_sampled_store, n_examples=100)
    model = LlamaForCausalLM.from_pretrained(run).double().eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    r = batch.response
    kd = L.kd_sampled_kl(logits[batch.resp_seq, batch.resp_pos], r["teacher/topk_ids"], r["teacher/topk_logp"],
                         r["teacher/tail_logp"], r["teacher/tail_sample_ids"], r["teacher/tail_sample_logp"])
    chosen = methods.response_rows(batch, "pairs", fmt.ROLE_CHOSEN)
    assert report["kl_chosen"] == pytest.approx(float(kd[chosen].mean()), rel=1e-4)
    table = CliRunner().invoke(main, ["evaluate", "--cache", str(pure_sampled_store), "--model", str(run),
                                      "--split", "train", "--device", "cpu", "--dtype", "float32"])
    assert "tail sampled" in table.output


def test_a_cluster_draws_what_one_process_draws(tmp_path, tiny_models, tiny_dataset, sampled_tail_store):
    """Two dask workers, each computing parts in its own order: every part's samples (and the rest) are the
    one-process store's, bit for bit (the seed is the part's, the uniforms the row's)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=0, dashboard_address=":0") as cluster, \
            Client(cluster):
        out = _run(tmp_path / "cluster.zarr", tiny_models, tiny_dataset, tail_samples=S, tail_seed=7,
                   passes=("pairs",), cluster=cluster.scheduler_address)
    one, two = TeacherStore.open(str(sampled_tail_store)), TeacherStore.open(str(out))
    compared = 0
    for split in one.splits():
        for part in range(one.num_parts(split)):
            a = one.section_attrs(split, part, "pairs", "teacher")
            b = two.section_attrs(split, part, "pairs", "teacher")
            assert a["checksums"] == b["checksums"] and a["content_key"] == b["content_key"], (split, part)
            compared += 1
    assert compared == 4


def test_store_info_names_the_tail_samples(sampled_tail_store, tiny_store):
    from click.testing import CliRunner

    from store.cli import main

    shown = CliRunner().invoke(main, ["info", str(sampled_tail_store)])
    assert shown.exit_code == 0 and f"tail samples {S} per response token in pairs/teacher (seed 7)" in shown.output
    assert "tail samples" not in CliRunner().invoke(main, ["info", str(tiny_store)]).output
