"""PAD on the training side: `train student --method pad`, its baselines and combinations, `train evaluate` on groups.

The store comes from the module fixture ``pad_store``: ``precompute sample`` then
``precompute teacher --passes pairs,pad`` over tiny random Llamas sharing the real
SmolLM2 tokenizer, on the tiny preference rows, so one store holds pairs and groups.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from lm import models
from precompute.teacher import TeacherConfig, run_teacher
from precompute.sample import SampleConfig, run_sample
from store import ExampleStream, TeacherStore
from store import format as fmt
from train import losses, methods
from train.batches import collate
from train.cli import main
from train.evaluate import kendall_tau, top1_agreement
from train.trainer import TrainConfig, TrainError, train

KEEP = 4


@pytest.fixture(scope="module")
def pad_store(tmp_path_factory, tiny_models, tiny_dataset):
    """(store with pairs + groups, the same store before the teacher's pad pass)."""
    teacher, student = tiny_models
    root = tmp_path_factory.mktemp("train-pad")
    out = str(root / "pad.zarr")
    run_sample(SampleConfig(out=out, model=str(student), dataset=str(tiny_dataset), n=5, keep=KEEP, max_new_tokens=8,
                            max_length=96, seed=1, examples_per_part=4, device="cpu", dtype="float32",
                            progress=False))
    shutil.copytree(out, str(root / "samples-only.zarr"))
    run_teacher(TeacherConfig(out=out, teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                              passes=("pairs", "pad"), top_k=8, max_length=96, max_new_tokens=8,
                              examples_per_part=4, device="cpu", dtype="float32", progress=False))
    store = TeacherStore.open(out)
    groups = store.attrs["layout"]["splits"]["train"]["samples"]["groups"]
    assert groups >= 6, f"only {groups} train groups: too few to test with"
    return Path(out), root / "samples-only.zarr"


def add_sample_reference_sums(store_path: Path, student: Path, teacher: Path, dataset: Path) -> None:
    """``precompute teacher --passes dpo_ref`` on a store with groups: adds ``samples/student_init``."""
    run_teacher(TeacherConfig(out=str(store_path), teacher=str(teacher), student=str(student), dataset=str(dataset),
                              passes=("dpo_ref",), top_k=8, max_length=96, max_new_tokens=8, examples_per_part=4,
                              device="cpu", dtype="float32", progress=False))
    store = TeacherStore.open(str(store_path))
    assert all(store.is_complete(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT)
               for split in store.splits() for part in range(store.num_parts(split)))


def fixed_batch(store_path, needs, n_examples=3, split="train"):
    stream = ExampleStream(TeacherStore.open(str(store_path)), split, needs, shuffle=False)
    return collate(list(itertools.islice(stream, n_examples)), pad_id=0)


def load_student(path, dtype="float32"):
    model, _, _ = models.load_model(str(path), device="cpu", dtype=dtype)
    return model


@torch.no_grad()
def loss_on(model, batch, terms, settings=methods.Settings()):
    total, _ = methods.method_loss(model.eval(), batch, terms, settings)
    return float(total)


def hand_sequence_means(model, batch) -> torch.Tensor:
    """[B] mean log-prob of each response under ``model``, from the full-vocabulary logits."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[batch.resp_seq, batch.resp_pos].double(), -1)
    logp = logp.gather(-1, batch.resp_target[:, None]).squeeze(-1)
    return torch.stack([logp[batch.resp_seq == s].mean() for s in range(batch.num_sequences)])


def hand_groups(batch) -> list[list[int]]:
    """Each example's sample sequences, in group position order."""
    groups = {}
    for s in range(batch.num_sequences):
        if int(batch.seq_group_pos[s]) >= 0:
            groups.setdefault(int(batch.seq_example[s]), {})[int(batch.seq_group_pos[s])] = s
    return [[members[i] for i in range(len(members))] for _, members in sorted(groups.items())]


def cli_train(store, out, *extra):
    args = ["student", "--cache", str(store), "--out", str(out), "--lr", "1e-3", "--batch-tokens", "400",
            "--epochs", "2", "--max-steps", "8", "--device", "cpu", "--dtype", "float32", "--log-every", "1",
            "--no-progress", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- rewards


def test_teacher_reward_equals_a_hand_computation_from_the_store(pad_store):
    store_path, _ = pad_store
    store = TeacherStore.open(str(store_path))
    alpha, beta = 0.3, 7.0
    settings = methods.Settings(pad_alpha=alpha, pad_beta=beta)
    expected = {}
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_SAMPLES)
        teacher = store.read_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER, ["logp_sum"])
        mcq = store.read_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ, ["mcq_score"])
        for s, (example, role) in enumerate(zip(base["example_index"], base["role"])):
            mean_logp = float(teacher["logp_sum"][s]) / int(base["response_length"][s])
            expected[(int(example), int(role) - fmt.ROLE_SAMPLE_BASE)] = beta * (
                alpha * mean_logp + (1 - alpha) * float(mcq["mcq_score"][s]))

    batch = fixed_batch(store_path, methods.needs_of(methods.resolve_terms("pad")), n_examples=100)
    (index,) = methods.sample_groups(batch)
    assert index.shape == (len(expected) // KEEP, KEEP)
    got = methods.teacher_rewards(batch, index, settings)
    for g, row in enumerate(index):
        for pos, s in enumerate(row.tolist()):
            example = batch.examples[int(batch.seq_example[s])].example_index
            assert float(got[g, pos]) == pytest.approx(expected[(example, pos)], rel=1e-6, abs=1e-6)
    # alpha 1 and 0 read one signal only: the mean log-prob, the calibration score
    ones = methods.teacher_rewards(batch, index, methods.Settings(pad_alpha=1.0, pad_beta=beta))
    zeros = methods.teacher_rewards(batch, index, methods.Settings(pad_alpha=0.0, pad_beta=beta))
    torch.testing.assert_close(alpha * ones + (1 - alpha) * zeros, got)


# --------------------------------------------------------------------------- the loss


def test_pad_term_equals_plackett_luce_by_enumeration(pad_store, tiny_models):
    """PPD = JSD of the two distributions over the n! orderings; VPD = -log P_S(teacher's order)."""
    store_path, _ = pad_store
    terms = methods.resolve_terms("pad")
    batch = fixed_batch(store_path, methods.needs_of(terms))
    model = load_student(tiny_models[1]).double()
    with torch.no_grad():
        means = hand_sequence_means(model, batch)
    beta, alpha = 10.0, 0.5

    def pl(rewards, order):
        left, log_p = list(range(len(rewards))), 0.0
        for i in order:
            log_p += rewards[i] - math.log(sum(math.exp(rewards[j]) for j in left))
            left.remove(i)
        return log_p

    jsd, vpd = [], []
    for members in hand_groups(batch):
        student = [beta * float(means[s]) for s in members]
        example = batch.examples[int(batch.seq_example[members[0]])]
        teacher = [beta * (alpha * seq.scalars["teacher/logp_sum"] / seq.response_length
                           + (1 - alpha) * seq.scalars["teacher_mcq/mcq_score"])
                   for seq in sorted(example.of(fmt.SET_SAMPLES), key=lambda q: q.role)]
        orders = list(itertools.permutations(range(len(members))))
        p_s = np.exp([pl(student, o) for o in orders])
        p_t = np.exp([pl(teacher, o) for o in orders])
        m = (p_s + p_t) / 2
        jsd.append(0.5 * np.sum(p_s * np.log(p_s / m)) + 0.5 * np.sum(p_t * np.log(p_t / m)))
        vpd.append(-pl(student, sorted(range(len(members)), key=lambda i: -teacher[i])))

    for kind, expected in (("ppd", np.mean(jsd)), ("vpd", np.mean(vpd))):
        settings = methods.Settings(pad_loss=kind)
        total, parts = methods.method_loss(model, batch, terms, settings)
        assert float(parts["pad"].detach()) == pytest.approx(expected, rel=1e-7), kind
        assert float(total.detach()) == pytest.approx(expected, rel=1e-7), kind
    # groups larger than pad_max_group are split as losses.pad_loss documents
    (index,) = methods.sample_groups(batch)
    small = methods.Settings(pad_max_group=3)
    with torch.no_grad():
        _, parts = methods.method_loss(model, batch, terms, small)
    student = beta * means[index]
    decomposed = losses.pad_loss(student, methods.teacher_rewards(batch, index, small), "ppd", max_group=3).mean()
    assert float(parts["pad"]) == pytest.approx(float(decomposed), rel=1e-7)
    # VPD is never decomposed: groups of 4 > pad_max_group 3 still give -log P_S(the teacher's whole order)
    with torch.no_grad():
        _, parts = methods.method_loss(model, batch, terms, methods.Settings(pad_loss="vpd", pad_max_group=3))
    assert float(parts["pad"]) == pytest.approx(np.mean(vpd), rel=1e-7)


@pytest.mark.parametrize("kind", ["ppd", "vpd"])
def test_train_student_method_pad_lowers_its_loss_on_a_fixed_group(kind, pad_store, tiny_models, tmp_path):
    store_path, _ = pad_store
    terms = methods.resolve_terms("pad")
    settings = methods.Settings(pad_loss=kind)
    batch = fixed_batch(store_path, methods.needs_of(terms))
    before = loss_on(load_student(tiny_models[1]), batch, terms, settings)

    out = cli_train(store_path, tmp_path / kind, "--method", "pad", "--pad-loss", kind)

    after = loss_on(load_student(out), batch, terms, settings)
    assert math.isfinite(before) and after < before - 1e-3, f"{kind}: {before:.4f} -> {after:.4f}"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["pad_loss"] == kind and config["resolved"]["settings"]["pad_loss"] == kind
    assert config["resolved"]["settings"]["pad_alpha"] == 0.5 and config["resolved"]["settings"]["pad_beta"] == 10.0
    assert config["resolved"]["needs"] == {"samples": ["teacher", "teacher_mcq"]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["terms"]) == {"pad"}


def test_pad_plus_sft_trains_both_terms_on_examples_with_pairs_and_groups(pad_store, tiny_models, tmp_path):
    store_path, _ = pad_store
    terms = methods.resolve_terms("pad+sft")
    assert {t.name: t.weight for t in terms} == {"pad": 1.0, "sft": 1.0}
    assert methods.needs_of(terms) == {"pairs": [], "samples": ["teacher", "teacher_mcq"]}
    batch = fixed_batch(store_path, methods.needs_of(terms))
    assert batch.sequences_where("pairs").any() and batch.sequences_where("samples").any()
    before = loss_on(load_student(tiny_models[1]), batch, terms)

    out = cli_train(store_path, tmp_path / "pad_sft", "--method", "pad+sft", "--pad-loss", "vpd")

    after = loss_on(load_student(out), batch, terms)
    assert after < before - 1e-3, f"pad+sft: {before:.4f} -> {after:.4f}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["terms"]) == {"pad", "sft"}
    # dckd+pad: DCKD's three terms and PAD's, each reading its own set
    combined = methods.resolve_terms("dckd+pad", {"pad": 2.0})
    assert {t.name: t.weight for t in combined} == {"sft": 1.0, "kd_chosen": 1.0, "kd_rejected": 1.0, "pad": 2.0}
    assert methods.needs_of(combined) == {"pairs": ["teacher"], "samples": ["teacher", "teacher_mcq"]}
    train(TrainConfig(cache=str(store_path), method="dckd+pad", out=str(tmp_path / "dckd_pad"), max_steps=2,
                      batch_tokens=600, device="cpu", dtype="float32", progress=False))


# --------------------------------------------------------------------------- baselines on the same groups


def test_simpo_and_dpo_on_the_teachers_best_and_worst_response(pad_store, tiny_models, tiny_dataset, tmp_path):
    store_path, _ = pad_store
    store_path = Path(shutil.copytree(store_path, tmp_path / "with_reference.zarr"))
    add_sample_reference_sums(store_path, tiny_models[1], tiny_models[0], tiny_dataset)
    terms = methods.resolve_terms("pad_simpo+pad_dpo")
    batch = fixed_batch(store_path, methods.needs_of(terms))
    model = load_student(tiny_models[1]).double()
    with torch.no_grad():
        _, parts = methods.method_loss(model, batch, terms, methods.Settings())

    with torch.no_grad():
        means = hand_sequence_means(model, batch)
    lengths = torch.bincount(batch.resp_seq, minlength=batch.num_sequences).double()
    sums = means * lengths
    teacher = (0.5 * batch.scalars["teacher/logp_sum"].double() / lengths
               + 0.5 * batch.scalars["teacher_mcq/mcq_score"].double())
    ref = batch.scalars["student_init/logp_sum"].double()
    simpo, dpo = [], []
    for members in hand_groups(batch):
        best = max(members, key=lambda s: float(teacher[s]))
        worst = min(members, key=lambda s: float(teacher[s]))
        simpo.append(-math.log(1 / (1 + math.exp(-(2.0 * float(means[best] - means[worst]) - 0.5)))))
        margin = float((sums[best] - ref[best]) - (sums[worst] - ref[worst]))
        dpo.append(-math.log(1 / (1 + math.exp(-0.1 * margin))))
    assert float(parts["pad_simpo"]) == pytest.approx(np.mean(simpo), rel=1e-7)
    assert float(parts["pad_dpo"]) == pytest.approx(np.mean(dpo), rel=1e-7)
    # the stored reference sums are this very student's: DPO starts at log 2
    assert float(parts["pad_dpo"]) == pytest.approx(math.log(2), abs=1e-4)

    # the tiny student's mean log-probs differ by nats: SimPO at beta 2 starts near 0, so a smaller beta
    for method, settings, flags in (("pad_simpo", methods.Settings(simpo_beta=0.05), ["--simpo-beta", "0.05"]),
                                    ("pad_dpo", methods.Settings(), [])):
        method_terms = methods.resolve_terms(method)
        before = loss_on(load_student(tiny_models[1]), batch, method_terms, settings)
        out = cli_train(store_path, tmp_path / method, "--method", method, *flags)
        after = loss_on(load_student(out), batch, method_terms, settings)
        assert after < before - 1e-3, f"{method}: {before:.4f} -> {after:.4f}"


# --------------------------------------------------------------------------- refusals


def test_missing_group_signals_are_refused_naming_the_samples_commands(pad_store, tmp_path, forbid_model_loading):
    store_path, samples_only = pad_store

    forbid_model_loading()
    # groups sampled, the teacher's pass not run
    with pytest.raises(TrainError) as refused:
        train(TrainConfig(cache=str(samples_only), method="pad", out=str(tmp_path / "a"), progress=False))
    message = str(refused.value)
    assert "samples/teacher" in message and "samples/teacher_mcq" in message
    assert f"precompute teacher --out {samples_only} --passes pad" in message and "precompute sample" not in message

    # no groups at all: sample first, then the teacher's pass
    no_groups = Path(shutil.copytree(store_path, tmp_path / "no_groups.zarr"))
    for part_dir in (no_groups / "train").glob("part-*"):
        shutil.rmtree(part_dir / fmt.SET_SAMPLES)
    result = CliRunner().invoke(main, ["student", "--cache", str(no_groups), "--method", "pad+sft",
                                       "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "samples/base" in result.output
    assert f"precompute sample --out {no_groups}" in result.output
    assert f"then precompute teacher --out {no_groups} --passes pad" in result.output

    # DPO on groups needs the initial model's sums on them
    result = CliRunner().invoke(main, ["student", "--cache", str(store_path), "--method", "pad_dpo",
                                       "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "samples/student_init" in result.output and "--passes dpo_ref" in result.output

    for bad in (["--pad-loss", "kl"], ["--pad-alpha", "1.5"], ["--pad-max-group", "7"]):
        result = CliRunner().invoke(main, ["student", "--cache", str(store_path), "--method", "pad", *bad])
        assert result.exit_code == 2, bad
    with pytest.raises(TrainError, match="pad-alpha"):
        train(TrainConfig(cache=str(store_path), method="pad", pad_alpha=-0.1, out=str(tmp_path / "d")))


# --------------------------------------------------------------------------- evaluate


def test_kendall_tau_and_top1_on_a_small_case():
    student = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[30.0, 20.0, 10.0], [1.0, 1.0, 0.0], [1.0, 2.0, 3.0]])
    # group 0: (0,1) +, (0,2) +, (1,2) - -> 1/3; its best is 0 for both
    # group 1: (0,1) teacher tie 0, (0,2) -, (1,2) + -> 0; student's best 1 ties the teacher's best
    # group 2: the same order -> 1
    torch.testing.assert_close(kendall_tau(student, teacher), torch.tensor([1 / 3, 0.0, 1.0]))
    torch.testing.assert_close(top1_agreement(student, teacher), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    reversed_ = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert float(kendall_tau(reversed_, -reversed_)) == -1.0
    assert float(top1_agreement(reversed_, -reversed_)) == 0.0


def test_evaluate_reports_ranking_agreement_equal_to_a_hand_computation(pad_store, tiny_models):
    store_path, _ = pad_store
    alpha = 0.3
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models[1]), "--cache", str(store_path),
                                       "--split", "train", "--pad-alpha", str(alpha), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    batch = fixed_batch(store_path, {"samples": ["teacher", "teacher_mcq"]}, n_examples=100)
    with torch.no_grad():
        means = hand_sequence_means(load_student(tiny_models[1]), batch)
    lengths = torch.bincount(batch.resp_seq, minlength=batch.num_sequences).double()
    taus, tops = [], []
    for members in hand_groups(batch):
        s = [float(means[m]) for m in members]
        t = [alpha * float(batch.scalars["teacher/logp_sum"][m]) / float(lengths[m])
             + (1 - alpha) * float(batch.scalars["teacher_mcq/mcq_score"][m]) for m in members]
        pairs = list(itertools.combinations(range(len(members)), 2))
        taus.append(sum(np.sign(s[i] - s[j]) * np.sign(t[i] - t[j]) for i, j in pairs) / len(pairs))
        tops.append(float(int(np.argmax(s)) == int(np.argmax(t))))
    assert report["groups"] == len(taus) and report["group_sizes"] == [KEEP] and report["pad_alpha"] == alpha
    assert report["kendall_tau"] == pytest.approx(np.mean(taus), abs=1e-9)
    assert report["top1_agreement"] == pytest.approx(np.mean(tops), abs=1e-9)
    assert 0 <= report["pad_ppd"] <= math.log(2)
    assert "pairs" in report and "kl_chosen" in report  # the store has pairs too: both parts

    table = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models[1]), "--cache", str(store_path),
                                      "--split", "train", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "ranking vs teacher: Kendall tau" in table.output and "preference accuracy, mean log-prob" in table.output


def test_evaluate_on_a_store_with_groups_only(pad_store, tiny_models, tmp_path):
    store_path, samples_only = pad_store
    groups_only = Path(shutil.copytree(store_path, tmp_path / "groups_only.zarr"))
    for part_dir in (groups_only / "test").glob("part-*"):
        shutil.rmtree(part_dir / fmt.SET_PAIRS)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models[1]), "--cache", str(groups_only),
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "pairs" not in report and report["groups"] >= 1

    result = CliRunner().invoke(main, ["evaluate", "--cache", str(samples_only), "--device", "cpu"])
    assert result.exit_code == 2
    assert "--passes pad" in result.output and "--passes pairs" in result.output


# --------------------------------------------------------------------------- the calibration is read only below alpha 1


def test_alpha_1_trains_without_the_calibration_exactly_as_with_it(pad_store, tiny_models, tiny_dataset, tmp_path):
    """`--passes pairs,pad_logp` leaves the calibration out; PAD at alpha 1 trains the same weights on that store as
    on the fixture's (`--passes pairs,pad`), evaluates the same, and at alpha 0.5 is refused naming `pad_mcq`."""
    from safetensors.torch import load_file

    store_path, samples_only = pad_store
    teacher, student = tiny_models
    no_mcq = Path(shutil.copytree(samples_only, tmp_path / "no_mcq.zarr"))
    run_teacher(TeacherConfig(out=str(no_mcq), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                              passes=("pairs", "pad_logp"), top_k=8, max_length=96, max_new_tokens=8,
                              examples_per_part=4, device="cpu", dtype="float32", progress=False))
    assert not TeacherStore.open(str(no_mcq)).complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)

    runs = [cli_train(store, tmp_path / name, "--method", "pad", "--pad-alpha", "1", "--max-steps", "3")
            for store, name in ((store_path, "with"), (no_mcq, "without"))]
    with_mcq, without = (load_file(run / "model.safetensors") for run in runs)
    assert with_mcq.keys() == without.keys() and all(torch.equal(with_mcq[k], without[k]) for k in with_mcq)
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    assert config["resolved"]["needs"] == {"samples": ["teacher"]}

    result = CliRunner().invoke(main, ["student", "--cache", str(no_mcq), "--method", "pad_simpo+sft",
                                       "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "samples/teacher_mcq" in result.output
    assert f"precompute teacher --out {no_mcq} --passes pad_mcq " in result.output

    reports = []
    for store in (store_path, no_mcq):
        result = CliRunner().invoke(main, ["evaluate", "--model", str(student), "--cache", str(store), "--split",
                                           "train", "--pad-alpha", "1", "--device", "cpu", "--json"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["groups"] > 0 and reports[0] == {**reports[1], "store": reports[0]["store"]}
