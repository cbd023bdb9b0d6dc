"""PAD's precompute: sampled groups (``precompute sample``) and the teacher's calibration (``--passes pad``).

The store comes from the module fixture ``pad_store``: ``precompute sample``
then ``precompute teacher --passes pad`` over tiny random Llamas sharing the
real SmolLM2 tokenizer, on prompt-only rows (no pairs anywhere).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from lm import chat, models
from precompute import calibration
from precompute.cli import main as precompute_main
from precompute.teacher import TeacherConfig, run_teacher
from precompute.sample import (
    DROP_DUPLICATES,
    SampleConfig,
    choose_group,
    edit_distance,
    part_seed,
    run_sample,
    sample_responses,
    select_diverse,
)
from store import TeacherStore
from store import format as fmt
from tests import tiny

N, KEEP, NEW_TOKENS = 5, 4, 8


def _plain_edit_distance(a, b) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _write_prompts(path: Path, n: int) -> Path:
    rows = [{"prompt": tiny.PROMPTS[i % len(tiny.PROMPTS)] + f" (question {i})"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def pad_config(tmp_path_factory, tiny_models):
    """Sample settings over 8 prompt-only rows (train split, parts of 4)."""
    teacher, student = tiny_models
    root = tmp_path_factory.mktemp("pad")
    prompts = _write_prompts(root / "prompts.jsonl", 10)  # 9 train rows, 8 used
    sample = SampleConfig(out=str(root / "pad.zarr"), model=str(student), dataset=str(prompts), splits=("train",),
                          limit=8, n=N, keep=KEEP, max_new_tokens=NEW_TOKENS, max_length=96, seed=3,
                          examples_per_part=4, device="cpu", dtype="float32", progress=False)
    teach = TeacherConfig(out=sample.out, teacher=str(teacher), dataset=str(prompts), splits=("train",), limit=8,
                          passes=("pad",), top_k=8, max_length=96, max_new_tokens=NEW_TOKENS, examples_per_part=4,
                          device="cpu", dtype="float32", progress=False)
    return sample, teach


@pytest.fixture(scope="module")
def pad_store(pad_config):
    sample, teach = pad_config
    sampled = run_sample(sample)
    shutil.copytree(sample.out, sample.out + ".samples-only")  # for the resume test
    taught = run_teacher(teach)
    return TeacherStore.open(sample.out), sampled, taught


# --------------------------------------------------------------------------- selection

def test_edit_distance_is_levenshtein_over_token_ids():
    assert edit_distance([1, 2, 3, 4], [1, 2, 3, 5]) == 1
    assert edit_distance([1, 2, 9, 9], [9, 9, 9, 4]) == 3
    assert edit_distance([], [7, 7]) == 2
    assert edit_distance([5, 1, 2, 3], [1, 2, 3]) == 1  # one deletion, not three substitutions
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 90))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 90))]
        assert edit_distance(a, b) == _plain_edit_distance(a, b)


def test_greedy_max_min_selection_picks_what_a_hand_computation_says():
    responses = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9], [1, 2, 9, 9], [9, 9, 9, 4]]
    # distances from 0: r1 1, r2 4, r3 2, r4 3 -> add r2 (4).
    # nearest after {0, 2}: r1 min(1, 4) = 1, r3 min(2, 2) = 2, r4 min(3, 1) = 1 -> add r3.
    # nearest after {0, 2, 3}: r1 min(1, 2) = 1, r4 min(1, 3) = 1 -> tie, lowest index r1.
    assert select_diverse(responses, 2) == [0, 2]
    assert select_diverse(responses, 3) == [0, 2, 3]
    assert select_diverse(responses, 4) == [0, 1, 2, 3]
    # start is response 0 even when others are farther apart; a first-step tie goes to the lowest index
    assert select_diverse([[1], [2], [3, 3, 3], [4, 4, 4]], 2) == [0, 2]


def test_duplicate_responses_drop_the_prompt():
    assert choose_group([[1, 2], [3], [1, 2], [4, 5, 6]], keep=2) == (None, DROP_DUPLICATES)
    # a duplicate among the drawn responses drops the prompt even if the kept ones would differ
    assert choose_group([[1], [1], [2, 2, 2, 2], [3, 3, 3, 3]], keep=2) == (None, DROP_DUPLICATES)
    assert choose_group([[1, 2], [1, 3], [4, 4, 4]], keep=2) == ([0, 2], None)


def test_near_greedy_sampling_drops_every_prompt_as_duplicates(tmp_path, tiny_models, tiny_dataset):
    """Pair rows are accepted (their prompt is used); identical draws are counted under their reason."""
    config = SampleConfig(out=str(tmp_path / "dup.zarr"), model=str(tiny_models[1]), dataset=str(tiny_dataset),
                          splits=("train",), limit=4, n=3, keep=2, temperature=1e-4, max_new_tokens=4,
                          max_length=96, examples_per_part=4, device="cpu", dtype="float32", progress=False)
    summary = run_sample(config)
    store = TeacherStore.open(config.out)
    counts = store.attrs["layout"]["splits"]["train"]["samples"]
    assert counts["prompts"] == 4 and counts["groups"] == 0 and counts["dropped"] == {DROP_DUPLICATES: 4}
    assert any("dropped: duplicate_responses 4" in line for line in summary.lines())
    base = store.read_section("train", 0, fmt.SET_SAMPLES)
    assert len(base["group_example_index"]) == 0 and list(base["group_offsets"]) == [0]


# --------------------------------------------------------------------------- precompute sample

def test_sample_writes_groups_of_keep_with_sample_roles(pad_store, pad_config, tiny_models):
    store, sampled, _ = pad_store
    sample, _ = pad_config
    tokenizer = models.load_tokenizer(str(tiny_models[1]))
    eot = chat.end_of_turn_id(tokenizer)
    assert store.attrs["tokenizer"]["name"] == str(tiny_models[1])
    prov = store.attrs["passes"]["samples/base"]
    assert (prov["n"], prov["keep"], prov["temperature"], prov["top_p"], prov["seed"]) == (N, KEEP, 1.0, 0.95, 3)
    assert (prov["max_new_tokens"], prov["max_length"]) == (NEW_TOKENS, 96)
    rows = {i: [{"role": "user", "content": tiny.PROMPTS[i % len(tiny.PROMPTS)] + f" (question {i})"}]
            for i in range(8)}
    groups = 0
    for part in range(store.num_parts("train")):
        assert not store.is_complete("train", part, fmt.SET_PAIRS)  # pad only: no pairs written
        base = store.read_section("train", part, fmt.SET_SAMPLES)
        off, g_off = base["token_offsets"], base["group_offsets"]
        assert g_off[0] == 0 and g_off[-1] == len(base["role"])
        for g, example in enumerate(base["group_example_index"]):
            members = range(g_off[g], g_off[g + 1])
            assert len(members) == KEEP
            assert [int(base["role"][s]) for s in members] == [fmt.ROLE_SAMPLE_BASE + i for i in range(KEEP)]
            assert all(base["example_index"][s] == example for s in members)
            prompt = chat.encode_prompt(tokenizer, rows[int(example)])
            for s in members:
                ids = base["input_ids"][off[s]:off[s + 1]]
                p = int(base["prompt_length"][s])
                np.testing.assert_array_equal(ids[:p], prompt)
                response = ids[p:]
                assert 1 <= len(response) <= NEW_TOKENS
                assert len(response) == NEW_TOKENS or response[-1] == eot
                assert not np.any(base["loss_mask"][off[s]:off[s] + p]) and np.all(base["loss_mask"][off[s] + p:off[s + 1]])
            groups += 1
    counts = store.attrs["layout"]["splits"]["train"]["samples"]
    assert counts["prompts"] == 8 and counts["groups"] == groups
    assert counts["groups"] + sum(counts["dropped"].values()) == 8
    assert any("train samples: 8 prompts" in line for line in sampled.lines())


def test_kept_responses_are_the_max_min_choice_among_the_seeded_draws(pad_store, pad_config, tiny_models):
    """Redraw part 1 with the documented seed (seed + part) and the selection reproduces the stored groups."""
    store, _, _ = pad_store
    sample, _ = pad_config
    model, tokenizer, _ = models.load_model(str(tiny_models[1]), device="cpu", dtype="float32")
    base = store.read_section("train", 1, fmt.SET_SAMPLES)
    examples = range(4, 8)
    prompts = [chat.encode_prompt(tokenizer, [{"role": "user", "content": tiny.PROMPTS[i] + f" (question {i})"}])
               for i in examples]
    assert part_seed(sample.seed, "train", 1) == sample.seed + 1
    torch.manual_seed(sample.seed + 1)
    drawn = sample_responses(model, prompts, n=N, temperature=1.0, top_p=0.95, max_new_tokens=NEW_TOKENS,
                             eos_ids=[chat.end_of_turn_id(tokenizer)], pad_id=tokenizer.pad_token_id,
                             batch_size=sample.generation_batch)
    expected = []
    for example, responses in zip(examples, drawn):
        kept, _ = choose_group(responses, KEEP)
        if kept is not None:
            expected.append((example, [list(map(int, responses[k])) for k in kept]))
    assert expected, "every prompt of part 1 was dropped: nothing to compare"
    off, g_off = base["token_offsets"], base["group_offsets"]
    stored = [(int(e), [list(map(int, base["input_ids"][off[s] + base["prompt_length"][s]:off[s + 1]]))
                        for s in range(g_off[g], g_off[g + 1])])
              for g, e in enumerate(base["group_example_index"])]
    assert stored == expected


def test_killed_sample_run_resumes_to_identical_arrays(pad_store, pad_config):
    _, _, _ = pad_store
    sample, _ = pad_config
    copy = replace(sample, out=sample.out + ".samples-only")
    store = TeacherStore.open(copy.out)
    before = [store.read_section("train", p, fmt.SET_SAMPLES) for p in range(store.num_parts("train"))]
    attrs_before = store.section_attrs("train", 1, fmt.SET_SAMPLES)
    shutil.rmtree(Path(copy.out) / "train" / fmt.part_name(1) / fmt.SET_SAMPLES)  # as if killed before part 1
    summary = run_sample(copy)
    assert (summary.steps[0]["parts_done"], summary.steps[0]["parts_skipped"]) == (1, 1)
    store = TeacherStore.open(copy.out)
    for part, old in enumerate(before):
        new = store.read_section("train", part, fmt.SET_SAMPLES)
        for name in old:
            np.testing.assert_array_equal(new[name], old[name], err_msg=f"part {part} {name}")
    assert store.section_attrs("train", 1, fmt.SET_SAMPLES)["checksums"] == attrs_before["checksums"]


# --------------------------------------------------------------------------- teacher --passes pad

def _letter_ids(tokenizer, letter):
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() == letter]


def test_calibration_score_equals_a_hand_computation(pad_store, tiny_models):
    """Render the MCQ by hand, take the teacher's next-token softmax, sum letters, normalise, average, log."""
    store, _, _ = pad_store
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[0], dtype=torch.float32).eval()
    tokenizer = models.load_tokenizer(str(tiny_models[0]))
    template = (Path(calibration.__file__).parent / "templates" / "mcq.txt").read_text().rstrip("\n")
    ids_a, ids_b = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
    assert tokenizer.convert_tokens_to_ids("A") in ids_a and tokenizer.convert_tokens_to_ids("ĠA") in ids_a

    base = store.read_section("train", 0, fmt.SET_SAMPLES)
    mcq = store.read_section("train", 0, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
    g_off, off = base["group_offsets"], base["token_offsets"]
    assert len(g_off) > 1, "part 0 kept no group"
    example = int(base["group_example_index"][0])
    question = tiny.PROMPTS[example] + f" (question {example})"
    options = [tokenizer.decode(base["input_ids"][off[s] + base["prompt_length"][s]:off[s + 1]],
                                skip_special_tokens=True).strip() for s in range(g_off[0], g_off[1])]

    def p_first(a, b):
        text = template.replace("{question}", question).replace("{option_a}", a).replace("{option_b}", b)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            probs = torch.softmax(teacher(torch.tensor([list(ids)])).logits[0, -1].double(), -1)
        pa, pb = float(probs[ids_a].sum()), float(probs[ids_b].sum())
        return pa / (pa + pb)

    n = len(options)
    wins = np.zeros(n)
    rows = {tuple(map(int, ij)): mcq["pair_prob"][k] for k, ij in enumerate(mcq["pair_index"][:mcq["group_pair_offsets"][1]])}
    assert sorted(rows) == [(i, j) for i in range(n) for j in range(n) if i != j]
    for i in range(n):
        for j in range(n):
            if i != j:
                i_as_a, i_as_b = p_first(options[i], options[j]), 1.0 - p_first(options[j], options[i])
                np.testing.assert_allclose(rows[(i, j)], [i_as_a, i_as_b], atol=2e-4)
                wins[i] += (i_as_a + i_as_b) / 2
    expected = np.log((1e-8 + wins) / (n - 1))
    np.testing.assert_allclose(mcq["mcq_score"][g_off[0]:g_off[1]], expected, atol=2e-4)


def test_both_option_orders_are_stored_and_the_score_uses_their_mean(pad_store):
    from train.losses import mcq_score as train_mcq_score

    store, _, _ = pad_store
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_SAMPLES)
        mcq = store.read_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
        g_off, p_off = base["group_offsets"], mcq["group_pair_offsets"]
        assert len(p_off) == len(g_off)
        for g in range(len(g_off) - 1):
            n = int(g_off[g + 1] - g_off[g])
            index, prob = mcq["pair_index"][p_off[g]:p_off[g + 1]], mcq["pair_prob"][p_off[g]:p_off[g + 1]]
            assert len(index) == n * (n - 1)
            row = {tuple(map(int, ij)): pr for ij, pr in zip(index, prob)}
            for (i, j), (i_as_a, i_as_b) in row.items():
                # the (j, i) row comes from the same two asks, seen from j
                np.testing.assert_allclose(row[(j, i)], [1 - i_as_b, 1 - i_as_a], atol=1e-6)
            stored = mcq["mcq_score"][g_off[g]:g_off[g + 1]]
            averaged = calibration.pair_matrix(index, prob, n)
            np.testing.assert_allclose(stored, calibration.mcq_score(averaged), atol=1e-5)
            np.testing.assert_allclose(stored, train_mcq_score(torch.tensor(averaged)[None])[0].numpy(), atol=1e-5)
            one_order = calibration.pair_matrix(index, np.stack([prob[:, 0], prob[:, 0]], 1), n)
            # the tiny teacher prefers option A, so asking one order only would change the scores
            assert np.max(np.abs(stored - calibration.mcq_score(one_order))) > 0.05


def test_mcq_score_formula_equals_train_losses():
    from train.losses import mcq_score as train_mcq_score

    rng = np.random.default_rng(0)
    for n in (2, 4, 5):
        p = rng.uniform(size=(3, n, n))
        p[:, np.arange(n), np.arange(n)] = np.nan  # the diagonal is ignored by both
        np.testing.assert_allclose(calibration.mcq_score(p), train_mcq_score(torch.tensor(p)).numpy(), rtol=1e-12)
    zero = np.zeros((1, 4, 4))
    np.testing.assert_allclose(calibration.mcq_score(zero), train_mcq_score(torch.tensor(zero)).numpy())


def test_pad_summary_reports_position_bias_and_cost_per_group(pad_store):
    store, _, taught = pad_store
    text = "\n".join(taught.lines())
    assert "P(option A chosen) = " in text and "(0.5 = no position bias)" in text
    assert "pad cost per group: samples/teacher " in text and "samples/teacher_mcq " in text
    prov = store.attrs["passes"]["samples/teacher_mcq"]
    assert prov["template"]["source"] == "default" and prov["eps"] == calibration.MCQ_EPS
    # the teacher section of the samples is the same pass as the pairs': logp_sum per response
    base = store.read_section("train", 0, fmt.SET_SAMPLES)
    teacher = store.read_section("train", 0, fmt.SET_SAMPLES, fmt.SECTION_TEACHER)
    assert teacher["logp_sum"].shape == base["response_length"].shape
    assert teacher["target_logp"].shape[0] == base["response_offsets"][-1]


def test_pad_without_samples_is_refused_before_any_model_loads(tmp_path, pad_config, monkeypatch):
    _, teach = pad_config

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(models, "resolve_model", no_model)
    out = tmp_path / "none.zarr"
    with pytest.raises(ValueError, match="precompute sample --out"):
        run_teacher(replace(teach, out=str(out)))
    assert not out.exists()
    result = CliRunner().invoke(precompute_main, ["teacher", "--out", str(out), "--passes", "pad", "--no-progress"])
    assert result.exit_code == 2 and "precompute sample" in result.output


def test_mcq_template_needs_its_three_placeholders(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("Question: {question}\nA: {option_a}\nAnswer A or B.\n")
    with pytest.raises(ValueError, match=r"missing \{option_b\}"):
        calibration.load_template(str(bad))
    good = calibration.load_template(None)
    assert good.render("q {option_b}", "x", "y").count("{option_b}") == 1  # one pass: no re-substitution


# --------------------------------------------------------------------------- the calibration, a pass of its own

def test_pad_is_pad_logp_then_pad_mcq_and_each_writes_only_its_section(pad_store, pad_config, tmp_path):
    store, _, _ = pad_store
    _, teach = pad_config
    out = shutil.copytree(teach.out + ".samples-only", tmp_path / "halves.zarr")
    run_teacher(replace(teach, out=str(out), passes=("pad_logp",)))
    halves = TeacherStore.open(str(out))
    parts = range(halves.num_parts("train"))
    assert all(halves.is_complete("train", p, fmt.SET_SAMPLES, fmt.SECTION_TEACHER) for p in parts)
    assert not halves.complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
    assert fmt.PASS_SAMPLES_TEACHER_MCQ not in halves.attrs["passes"]

    summary = run_teacher(replace(teach, out=str(out), passes=("pad_mcq",)))
    assert [step["step"] for step in summary.steps] == [fmt.PASS_SAMPLES_TEACHER_MCQ]
    halves = TeacherStore.open(str(out))
    for section, name in ((fmt.SECTION_TEACHER, fmt.PASS_SAMPLES_TEACHER),
                          (fmt.SECTION_TEACHER_MCQ, fmt.PASS_SAMPLES_TEACHER_MCQ)):
        assert halves.attrs["passes"][name] == store.attrs["passes"][name]
        for p in parts:  # the same bytes as one `--passes pad` run
            assert (halves.section_attrs("train", p, fmt.SET_SAMPLES, section)["checksums"]
                    == store.section_attrs("train", p, fmt.SET_SAMPLES, section)["checksums"])


def _family_store(tmp_path: Path, family: str) -> tuple[Path, Path, Path, Path]:
    """(teacher, student, digit rows, store with their groups) of a character-level family smaller than --top-k's
    default; a high temperature keeps the tiny student's draws apart (no duplicate groups)."""
    teacher = tiny.make_family_model(tmp_path / "teacher", family, seed=1, layers=1, hidden=16)
    student = tiny.make_family_model(tmp_path / "student", family, seed=2, layers=1, hidden=16)
    rows = tiny.write_digit_pairs(tmp_path / "digits.jsonl", 10)
    out = tmp_path / f"{family}.zarr"
    result = CliRunner().invoke(precompute_main, [
        "sample", "--out", str(out), "--model", str(student), "--dataset", str(rows), "--split", "train", "--n", "4",
        "--keep", "3", "--max-new-tokens", "12", "--temperature", "10", "--examples-per-part", "4", "--device", "cpu",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    assert TeacherStore.open(str(out)).attrs["layout"]["splits"]["train"]["samples"]["groups"] >= 4
    return teacher, student, rows, out


def _teacher(out, teacher, rows, *options):
    return CliRunner().invoke(precompute_main, ["teacher", "--out", str(out), "--teacher", str(teacher), "--dataset",
                                                str(rows), "--split", "train", "--examples-per-part", "4", "--device",
                                                "cpu", "--no-progress", *options])


def test_top_k_is_checked_only_for_the_passes_that_read_it(tmp_path):
    """A 21-token teacher: its pad pass runs at --top-k's default 50 (PAD reads the sums, not the top-K), a pairs
    pass is still refused."""
    teacher, _, rows, out = _family_store(tmp_path, "lettered")
    vocab = len(models.load_tokenizer(str(teacher)))
    assert vocab == 21
    result = _teacher(out, teacher, rows, "--passes", "pad")
    assert result.exit_code == 0, result.output
    store = TeacherStore.open(str(out))
    assert store.attrs["passes"][fmt.PASS_SAMPLES_TEACHER]["top_k"] == vocab  # min(--top-k, vocabulary)
    assert store.read_section("train", 0, fmt.SET_SAMPLES, fmt.SECTION_TEACHER)["topk_ids"].shape[1] == vocab
    assert store.complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)

    result = _teacher(out, teacher, rows, "--passes", "pairs")
    assert result.exit_code == 2 and "--top-k 50" in result.output and f"has {vocab} tokens" in result.output


def test_a_teacher_with_no_token_for_a_letter_runs_pad_without_the_calibration(tmp_path, monkeypatch,
                                                                              forbid_model_loading):
    from tests.refusals import one_line
    from train.cli import main as train_main

    teacher, student, rows, out = _family_store(tmp_path, "letterless")
    forbid_model_loading()
    result = _teacher(out, teacher, rows, "--passes", "pad")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "no token of the teacher's vocabulary decodes to 'A'" in lines[0]
    assert "--passes pad_logp" in lines[0] and "--pad-alpha 1" in lines[0]
    assert fmt.PASS_SAMPLES_TEACHER not in TeacherStore.open(str(out)).attrs["passes"]  # refused before any step
    monkeypatch.undo()

    result = _teacher(out, teacher, rows, "--passes", "pad_logp")  # --top-k 50 on 19 tokens: not read by PAD
    assert result.exit_code == 0, result.output
    train = ["student", "--cache", str(out), "--method", "pad", "--out", str(tmp_path / "run"), "--max-steps", "2",
             "--device", "cpu", "--no-progress"]
    message = one_line(CliRunner().invoke(train_main, train))
    assert "samples/teacher_mcq" in message and "--passes pad_mcq" in message
    result = CliRunner().invoke(train_main, [*train, "--pad-alpha", "1"])
    assert result.exit_code == 0, result.output
