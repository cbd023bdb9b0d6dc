"""Tests for `train student` / `train evaluate`: a tiny real store, a tiny real student.

Each test reads as an example of use: build (or reuse) a small store, train a few
steps, check a number that a formula predicts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lm import models
from store import ExampleStream, TeacherStore
from train import losses, methods
from train.batches import collate
from train.cli import main
from train.trainer import TrainConfig, TrainError, train

METHODS = ["sft", "kd", "dckd", "dpo", "simpo", "adpa", "dckd+adpa"]


def fixed_batch(store_path, needs, n_examples=3):
    stream = ExampleStream(TeacherStore.open(str(store_path)), "train", needs, shuffle=False)
    examples = []
    for example in stream:
        examples.append(example)
        if len(examples) == n_examples:
            break
    return collate(examples, pad_id=0)


def load_student(path):
    model, _, _ = models.load_model(str(path), device="cpu", dtype="float32")
    return model


@torch.no_grad()
def loss_on(model, batch, terms):
    total, _ = methods.method_loss(model.eval(), batch, terms, methods.Settings())
    return float(total)


def quick_config(tiny_store, out, **overrides):
    options = dict(cache=str(tiny_store), out=str(out), lr=1e-3, batch_tokens=400, epochs=2, max_steps=8,
                   device="cpu", dtype="float32", log_every=1, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_on_a_fixed_batch(method, tiny_store, tiny_models, tmp_path):
    terms = methods.resolve_terms(method)
    batch = fixed_batch(tiny_store, methods.needs_of(terms))
    before = loss_on(load_student(tiny_models[1]), batch, terms)

    out = train(quick_config(tiny_store, tmp_path / method.replace("+", "_"), method=method))

    after = loss_on(load_student(out), batch, terms)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 1e-3, f"{method}: {before:.4f} -> {after:.4f}"


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_store, tmp_path):
    # grad_accum 2 and two epochs: the interruption falls inside the run's accumulation and epoch logic
    common = dict(method="dckd+adpa", max_steps=6, batch_tokens=300, grad_accum=2, epochs=2)
    straight = train(quick_config(tiny_store, tmp_path / "straight", **common))

    interrupted = quick_config(tiny_store, tmp_path / "resumed", **common)
    train(interrupted, stop_after=3)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # stopped: checkpoint only
    resumed = train(quick_config(tiny_store, tmp_path / "resumed", resume=True, **common))

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TrainError, match="other settings"):
        train(quick_config(tiny_store, tmp_path / "resumed", resume=True, **{**common, "lr": 2e-3}))


def test_max_steps_trains_that_many_steps_through_as_many_epochs_as_it_takes(tiny_store, tmp_path):
    import yaml

    common = dict(method="sft", batch_tokens=300, grad_accum=2, log_every=1, max_steps=None, epochs=1)
    one_epoch = train(quick_config(tiny_store, tmp_path / "one_epoch", **common))
    E = json.loads((one_epoch / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # steps in one epoch
    assert E >= 2

    n = 3 * E + 1
    out = train(quick_config(tiny_store, tmp_path / "max_steps", **{**common, "max_steps": n}))  # --epochs 1: ignored
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, n + 1))
    assert [r["epoch"] for r in records] == [0] * E + [1] * E + [2] * E + [3]  # whole epochs, then one step more
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    warmup = math.ceil(0.1 * n)
    assert resolved["total_steps"] == n and resolved["warmup_steps"] == warmup
    assert len(resolved["batches_per_epoch"]) == 4
    # the schedule runs over the n steps: linear warmup, then cosine to the n-th step
    for r in records:
        s = r["step"] - 1
        factor = (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (n - warmup)))
        assert r["lr"] == pytest.approx(1e-3 * factor, rel=1e-12), r["step"]
    # --max-steps overrides --epochs: resuming such a run with another --epochs is the same run
    train(quick_config(tiny_store, tmp_path / "stopped", **{**common, "max_steps": n}), stop_after=2)
    resumed = train(quick_config(tiny_store, tmp_path / "stopped", **{**common, "max_steps": n, "epochs": 5,
                                                                      "resume": True}))
    assert [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()][-1] == n


def test_missing_signal_is_refused_before_the_student_loads(tiny_models, tiny_dataset, tmp_path, forbid_model_loading):
    from precompute.teacher import TeacherConfig, run_teacher

    teacher, student = tiny_models
    store = tmp_path / "pairs_only.zarr"
    run_teacher(TeacherConfig(out=str(store), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                              top_k=8, max_length=96, passes=("pairs",), examples_per_part=4, device="cpu",
                              dtype="float32", progress=False))

    forbid_model_loading()
    with pytest.raises(TrainError) as refused:
        train(TrainConfig(cache=str(store), method="adpa", out=str(tmp_path / "run"), progress=False))
    message = str(refused.value)
    assert "generated/base" in message and "generated/reference" in message
    assert f"precompute teacher --out {store} --passes adpa" in message

    result = CliRunner().invoke(main, ["student", "--cache", str(store), "--method", "dckd+dpo",
                                       "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2
    assert "pairs/student_init" in result.output and "--passes dpo_ref" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_run_directory_loads_and_holds_metrics_curves_config(tiny_store, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dckd"
    args = ["student", "--cache", str(tiny_store), "--method", "dckd", "--out", str(out), "--max-steps", "3",
            "--lr", "1e-3", "--batch-tokens", "400", "--device", "cpu", "--log-every", "1", "--no-progress",
            "--weight", "kd_rejected=0.2", "--save-every", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    for name in ("metrics.jsonl", "loss_curves.png", "config.yaml", "generation_config.json",
                 "tokenizer.json", "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]["terms"]) == {"sft", "kd_chosen", "kd_rejected"}
    assert all(k in records[0] for k in ("epoch", "lr", "loss", "tokens_per_s"))
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["resolved"]["terms"] == {"sft": 1.0, "kd_chosen": 1.0, "kd_rejected": 0.2}
    assert config["resolved"]["student"]["path"] == str(tiny_models[1])

    # the staged ADPA+: a finished run is a --student for the next stage; config.yaml is a --config
    again = CliRunner().invoke(main, ["student", "--config", str(out / "config.yaml"), "--student", str(out),
                                      "--method", "adpa", "--out", str(tmp_path / "adpa"), "--max-steps", "1"])
    assert again.exit_code == 0, again.output
    staged = yaml.safe_load((tmp_path / "adpa" / "config.yaml").read_text())
    assert staged["resolved"]["student"]["path"] == str(out.resolve())
    assert staged["lr"] == 1e-3 and staged["batch_tokens"] == 400  # from the file
    assert staged["max_steps"] == 1  # the flag wins


def test_trainer_terms_equal_a_full_vocabulary_computation(tiny_store, tiny_models):
    terms = methods.resolve_terms("dckd+adpa+dpo+simpo")
    # shared sft counts once, with the default weights (DCKD's KD at 1, not the released 0.1: train.methods)
    assert {t.name: t.weight for t in terms} == {"sft": 1.0, "kd_chosen": 1.0, "kd_rejected": 1.0, "adpa": 1.6,
                                                 "dpo": 1.0, "simpo": 1.0}
    settings = methods.Settings()
    batch = fixed_batch(tiny_store, methods.needs_of(terms))
    model = load_student(tiny_models[1]).double()
    total, parts = methods.method_loss(model, batch, terms, settings, chunk_size=7)

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows = logits[batch.resp_seq, batch.resp_pos]  # [R, V], the whole vocabulary
        logp = losses.token_logprobs(rows, batch.resp_target)
        kd = losses.kd_tail_kl(rows, batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"],
                               batch.response["teacher/tail_logp"])
        advantage = losses.adpa_advantage(batch.response["teacher/topk_logp"], batch.response["reference/topk_logp"])
        adpa = losses.adpa_token_loss(rows, batch.response["teacher/topk_ids"], advantage)
    role = batch.seq_role[batch.resp_seq]
    pairs = batch.sequences_where("pairs")[batch.resp_seq]
    chosen, rejected, generated = pairs & (role == 0), pairs & (role == 1), role == 2
    expected = {"sft": -logp[chosen].mean(), "kd_chosen": kd[chosen].mean(), "kd_rejected": kd[rejected].mean(),
                "adpa": adpa[generated].mean()}
    c_seq = batch.sequences_where("pairs", 0).nonzero().squeeze(1)
    r_seq = batch.sequences_where("pairs", 1).nonzero().squeeze(1)
    sums = torch.stack([logp[batch.resp_seq == s].sum() for s in range(batch.num_sequences)])
    means = torch.stack([logp[batch.resp_seq == s].mean() for s in range(batch.num_sequences)])
    ref = batch.scalars["student_init/logp_sum"].double()
    expected["dpo"] = losses.dpo_loss(sums[c_seq], sums[r_seq], ref[c_seq], ref[r_seq], 0.1).mean()
    expected["simpo"] = losses.simpo_loss(means[c_seq], means[r_seq], 2.0, 0.5).mean()
    # the store's initial sums are this very student's: DPO starts at log 2
    assert float(expected["dpo"]) == pytest.approx(math.log(2), abs=1e-3)

    for name, value in expected.items():
        assert float(parts[name].detach()) == pytest.approx(float(value), rel=1e-9, abs=1e-9), name
    hand_total = (1 * expected["sft"] + 1 * expected["kd_chosen"] + 1 * expected["kd_rejected"]
                  + 1.6 * expected["adpa"] + expected["dpo"] + expected["simpo"])
    assert float(total.detach()) == pytest.approx(float(hand_total), rel=1e-9)

    # gradients flow through the chunked path exactly as through full logits
    total.backward()
    chunked_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = logits[batch.resp_seq, batch.resp_pos]
    logp = losses.token_logprobs(rows, batch.resp_target)
    kd = losses.kd_tail_kl(rows, batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"],
                               batch.response["teacher/tail_logp"])
    adpa = losses.adpa_token_loss(rows, batch.response["teacher/topk_ids"], advantage)
    sums = torch.stack([logp[batch.resp_seq == s].sum() for s in range(batch.num_sequences)])
    means = torch.stack([logp[batch.resp_seq == s].mean() for s in range(batch.num_sequences)])
    full = (-logp[chosen].mean() + kd[chosen].mean() + kd[rejected].mean() + 1.6 * adpa[generated].mean()
            + losses.dpo_loss(sums[c_seq], sums[r_seq], ref[c_seq], ref[r_seq], 0.1).mean()
            + losses.simpo_loss(means[c_seq], means[r_seq], 2.0, 0.5).mean())
    full.backward()
    torch.testing.assert_close(chunked_grad, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-7, atol=1e-10)


def test_evaluate_json_on_held_out_pairs(tiny_store, tiny_models):
    student = str(tiny_models[1])
    result = CliRunner().invoke(main, ["evaluate", "--model", student, "--cache", str(tiny_store), "--json",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "test" and report["pairs"] == 2  # the last 2 of the 12 rows
    for key in ("kl_chosen", "kl_rejected", "mean_logp_chosen", "mean_logp_rejected"):
        assert math.isfinite(report[key]), key
    assert report["kl_chosen"] >= 0 and report["kl_rejected"] >= 0
    assert 0 <= report["accuracy_avg_logp"] <= 1
    # the untrained student IS its initial model: every log-ratio margin is a tie
    assert report["accuracy_logratio"] == 0.5
    assert report["initial"].startswith("store pairs/student_init")

    computed = CliRunner().invoke(main, ["evaluate", "--model", student, "--cache", str(tiny_store),
                                         "--initial", student, "--device", "cpu"])
    assert computed.exit_code == 0, computed.output
    assert "preference accuracy, log-ratio to initial" in computed.output
    assert "computed with" in computed.output


def test_evaluate_reports_agreement_with_the_teachers_preference(tiny_store, tiny_models):
    """The teacher evaluated against its own store agrees with itself on every pair; the share of pairs whose
    labelled choice the teacher prefers is read back from the stored sums."""
    from store import format as fmt

    teacher = str(tiny_models[0])
    result = CliRunner().invoke(main, ["evaluate", "--model", teacher, "--cache", str(tiny_store), "--split", "train",
                                       "--initial", teacher, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacher_agreement"] == 1.0

    store = TeacherStore.open(str(tiny_store))
    prefers = pairs = 0
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_PAIRS)
        sums = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)["logp_sum"]
        mean = {(int(e), int(r)): s / n for e, r, s, n in
                zip(base["example_index"], base["role"], sums, base["response_length"])}
        for e in {e for e, _ in mean}:
            prefers += mean[(e, fmt.ROLE_CHOSEN)] > mean[(e, fmt.ROLE_REJECTED)]
            pairs += 1
    assert report["pairs"] == pairs and report["teacher_prefers_chosen"] == pytest.approx(prefers / pairs)


def test_a_students_agreement_with_the_teacher_is_the_share_of_pairs_it_orders_as_the_teacher(tiny_store,
                                                                                                tiny_models):
    """teacher_agreement of another model = the fraction of pairs where sign(mean log-prob chosen - rejected)
    of the model equals the teacher's (stored sums / lengths), ties one half; the model's side computed here
    with a plain forward over each stored sequence."""
    from transformers import AutoModelForCausalLM

    from store import format as fmt

    student = str(tiny_models[1])
    result = CliRunner().invoke(main, ["evaluate", "--model", student, "--cache", str(tiny_store), "--split", "train",
                                       "--json", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
    store = TeacherStore.open(str(tiny_store))
    agree = pairs = 0.0
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_PAIRS)
        teacher = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)["logp_sum"]
        model_mean, teacher_mean = {}, {}
        for i, (e, role, n) in enumerate(zip(base["example_index"], base["role"], base["response_length"])):
            lo, hi = int(base["token_offsets"][i]), int(base["token_offsets"][i + 1])
            ids = torch.from_numpy(base["input_ids"][lo:hi].astype("int64"))
            mask = torch.from_numpy(base["loss_mask"][lo:hi])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
            token_logp = logp.gather(1, ids[1:, None])[:, 0][mask[1:]]
            assert token_logp.numel() == int(n)
            model_mean[(int(e), int(role))] = float(token_logp.sum()) / int(n)
            teacher_mean[(int(e), int(role))] = float(teacher[i]) / int(n)
        for e in {e for e, _ in model_mean}:
            m = model_mean[(e, fmt.ROLE_CHOSEN)] - model_mean[(e, fmt.ROLE_REJECTED)]
            t = teacher_mean[(e, fmt.ROLE_CHOSEN)] - teacher_mean[(e, fmt.ROLE_REJECTED)]
            agree += 0.5 if m == 0 or t == 0 else float((m > 0) == (t > 0))
            pairs += 1
    assert report["pairs"] == pairs
    assert report["teacher_agreement"] == pytest.approx(agree / pairs)  # these two random models: 0 (the teacher: 1)


def test_evaluate_writes_the_models_greedy_and_sampled_answers(tiny_store, tiny_models, tmp_path):
    """--generations: one line per held-out prompt; the greedy answer is the model's own greedy continuation of
    the store's prompt ids, cut at the end of turn."""
    from lm import chat
    from lm.generate import generate_greedy
    from train.generations import split_prompts

    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models[1]), "--cache", str(tiny_store),
                                       "--generations", str(out), "--samples", "3", "--max-new-tokens", "8",
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    store = TeacherStore.open(str(tiny_store))
    prompts = split_prompts(store, "test")
    assert [line["example_index"] for line in lines] == [e for e, _ in prompts] == [0, 1]
    assert all(len(line["samples"]) == 3 for line in lines)
    model, tokenizer, _ = models.load_model(str(tiny_models[1]), device="cpu", dtype="float32")
    ends = chat.end_of_turn_ids(tokenizer)
    expected = generate_greedy(model, [p for _, p in prompts], max_new_tokens=8, eos_ids=ends,
                               pad_id=chat.pad_id(tokenizer))
    assert [line["greedy"] for line in lines] == [
        tokenizer.decode(a.tolist(), skip_special_tokens=True).strip() for a in expected]
