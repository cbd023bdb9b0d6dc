"""CycleAlign end to end: tiny real models sample, a real HTTP judge on loopback ranks, the student trains.

The black box ranks by a rule (longer responses first) and injects malformed
replies and server errors; two rounds run through the real commands, the
second prompted with the first round's best agreements; a rerun skips what is
done. The ranking losses themselves are checked against direct computations.
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from precompute.rank import STATUS_RANKED, dynamic_demos, run_rank, RankConfig
from recipes.cyclealign import CycleAlignConfig, run_rounds, trained
from store import TeacherStore
from store import format as fmt
from tests import tiny
from tests.judge_server import JudgeServer
from train import losses, methods

SCRIPT = ["500", "free", "partial", "repeat", "timeout"]  # the first five requests misbehave, once each


def _rule(text: str) -> float:
    return len(text)


# -- the losses against direct computations -----------------------------------------------------------


def _rrhf_direct(p, ranks):
    total = 0.0
    for i, j in itertools.permutations(range(len(p)), 2):
        if ranks[i] >= 0 and ranks[j] >= 0 and ranks[i] < ranks[j]:
            total += max(0.0, p[j] - p[i])
    return total


def _pro_direct(p, ranks, temperature=1.0):
    order = sorted((r, i) for i, r in enumerate(ranks) if r >= 0)
    s = [p[i] / temperature for _, i in order]
    return -sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(len(s)))


@pytest.mark.parametrize("ranks", [[0, 1, 2, 3], [3, 2, 1, 0], [1, -1, 0, 2], [-1, 0, -1, 1], [-1, -1, 0, -1]])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # ordinary and huge score gaps
def test_ranking_losses_equal_their_equations(ranks, scale):
    generator = torch.Generator().manual_seed(len(ranks) + int(scale))
    p = (torch.randn(1, 4, generator=generator, dtype=torch.float64) * scale).requires_grad_()
    r = torch.tensor([ranks])
    rrhf = losses.rrhf_loss(p, r)
    pro = losses.pro_loss(p, r, temperature=0.7)
    assert float(rrhf.detach()) == pytest.approx(_rrhf_direct(p[0].tolist(), ranks), abs=1e-12)
    assert float(pro.detach()) == pytest.approx(_pro_direct(p[0].tolist(), ranks, 0.7), rel=1e-10, abs=1e-10)
    (rrhf + pro).sum().backward()
    assert torch.isfinite(p.grad).all()
    unranked = [i for i, x in enumerate(ranks) if x < 0]
    assert all(float(p.grad[0, i]) == 0 for i in unranked)  # a response outside the ranking gets no gradient


# -- one round through the commands -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_models, tiny_dataset):
    return tiny.sampled_store(tmp_path_factory.mktemp("cyclealign") / "round.zarr", tiny_models[1], tiny_dataset)


def _rank_config(out, server, tiny_dataset, **overrides):
    options = dict(out=str(out), judge=server.base_url, judge_model="rule", judge_timeout=1.0, judge_retries=0,
                   judge_concurrency=2, dataset=str(tiny_dataset), splits=("train",), device="cpu", dtype="float32",
                   progress=False)
    options.update(overrides)
    return RankConfig(**options)


def test_rank_writes_the_judges_order_the_agreement_and_the_audit(sampled, tiny_dataset, tmp_path):
    import shutil

    out = tmp_path / "ranked.zarr"
    shutil.copytree(sampled, out)
    with JudgeServer(score=_rule, script=SCRIPT, timeout_sleep=2.0) as server:
        summary = run_rank(_rank_config(out, server, tiny_dataset))
        requests = len(server.requests)
    store = TeacherStore.open(str(out))
    groups = 0
    for part in store.complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_JUDGE):
        judged = store.read_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE)
        base = store.read_section("train", part, fmt.SET_SAMPLES)
        sums = store.read_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT)["logp_sum"]
        offsets = base["group_offsets"]
        audits = [json.loads(judged["audit_json"][judged["group_audit_offsets"][g]:
                                                  judged["group_audit_offsets"][g + 1]].tobytes())
                  for g in range(len(offsets) - 1)]
        for g, audit in enumerate(audits):
            groups += 1
            s0, s1 = int(offsets[g]), int(offsets[g + 1])
            lengths = [_rule(r) for r in audit["responses"]]
            judge_order = sorted(range(s1 - s0), key=lambda i: (-lengths[i], i))
            assert [int(judged["judge_rank"][s0 + i]) for i in judge_order] == list(range(s1 - s0))
            mean = [float(sums[s]) / int(base["response_length"][s]) for s in range(s0, s1)]
            white = sorted(range(s1 - s0), key=lambda i: (-mean[i], i))
            assert [int(judged["white_rank"][s0 + i]) for i in white] == list(range(s1 - s0))
            agreed = [i for i in sorted(range(s1 - s0), key=lambda i: judged["agreed_rank"][s0 + i])
                      if judged["agreed_rank"][s0 + i] >= 0]
            if judged["group_status"][g] == STATUS_RANKED:  # a common subsequence of both orders
                for order in (judge_order, white):
                    it = iter(order)
                    assert all(x in it for x in agreed)
            assert audit["tries"][-1]["order"] == audit["judge_order"] == judge_order  # the last try parsed
    assert groups == summary.examples["train"] and requests == groups + len(SCRIPT)  # each fault retried once
    assert any("agreed" in line for line in summary.notes)


def test_two_rounds_end_to_end_with_demonstrations_and_resume(tmp_path, tiny_models, tiny_dataset):
    _, student = tiny_models
    common = dict(out=str(tmp_path / "ca"), student=str(student), dataset=str(tiny_dataset), splits=("train",),
                  n=4, max_new_tokens=10, lr=1e-3, max_steps=2, batch_tokens=600, device="cpu", dtype="float32",
                  judge_model="rule", demos=1, progress=False)
    with JudgeServer(score=_rule, script=SCRIPT, timeout_sleep=2.0) as server:
        config = CycleAlignConfig(judge=server.base_url, rounds=1, **common)
        run_rounds(config)
        first_round_requests = len(server.requests)
        assert trained(config.round_dir(1) / "model")
        best = dynamic_demos(str(config.round_dir(1) / "samples.zarr"), 1)
        assert len(best) == 1

        models = run_rounds(CycleAlignConfig(judge=server.base_url, rounds=2, **common))
        assert [m.name for m in models] == ["model", "model"] and all(trained(m) for m in models)
        round_two = server.requests[first_round_requests:]
    # round 1 was not redone: every later request is round 2's, and each carries round 1's best agreement
    assert round_two
    for request in round_two:
        contents = [m["content"] for m in request["body"]["messages"]]
        assert any(best[0].question in c for c in contents)
    round_two_store = TeacherStore.open(str(tmp_path / "ca" / "round-2" / "samples.zarr"))
    record = round_two_store.pass_record("samples/judge")
    assert record.settings["dynamic_demos"]["count"] == 1
    assert record.model.name == str(tmp_path / "ca" / "round-1" / "model")  # round 2's white box: round 1's student
    metrics = [json.loads(line) for line in (tmp_path / "ca" / "round-2" / "model" / "metrics.jsonl").open()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    assert set(metrics[-1]["terms"]) == {"rrhf", "sft_best"}


def test_the_rrhf_term_reads_the_agreed_rankings(sampled, tiny_dataset, tiny_models, tmp_path):
    """On a real ranked store, the trainer's term equals rrhf_loss over the groups with a pseudo-label."""
    import shutil

    from store import ExampleStream
    from train.batches import collate

    out = tmp_path / "ranked.zarr"
    shutil.copytree(sampled, out)
    with JudgeServer(score=_rule) as server:
        run_rank(_rank_config(out, server, tiny_dataset))
    terms = methods.resolve_terms("cyclealign")
    stream = ExampleStream(TeacherStore.open(str(out)), "train", methods.needs_of(terms), shuffle=False)
    batch = collate(list(stream), pad_id=0)
    from lm import models as lm_models

    model, _, _ = lm_models.load_model(str(tiny_models[1]), device="cpu", dtype="float32")
    with torch.no_grad():
        total, parts = methods.method_loss(model, batch, terms, methods.Settings())
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = losses.token_logprobs(logits[batch.resp_seq, batch.resp_pos], batch.resp_target)
    expected, groups = 0.0, 0
    for index in methods.sample_groups(batch):
        ranks = batch.scalars["judge/agreed_rank"][index].long()
        for g in range(index.shape[0]):
            if int((ranks[g] >= 0).sum()) < 2:
                continue
            p = [float(logp[batch.resp_seq == int(s)].mean()) for s in index[g]]
            expected += _rrhf_direct(p, ranks[g].tolist())
            groups += 1
    assert groups > 0
    assert float(parts["rrhf"]) == pytest.approx(expected / groups, rel=1e-5, abs=1e-7)


def test_a_repeated_rank_run_reuses_the_rankings_and_never_asks_twice(sampled, tiny_dataset, tmp_path,
                                                                       forbid_model_loading):
    """Ranked once; a copy of the same samples ranked again with --reuse-from the first asks the judge nothing
    and loads no model, and ends with the same rankings."""
    import shutil

    first, second = tmp_path / "first.zarr", tmp_path / "second.zarr"
    shutil.copytree(sampled, first)
    shutil.copytree(sampled, second)
    with JudgeServer(score=_rule) as server:  # the same judge model (its address is not part of the key)
        run_rank(_rank_config(first, server, tiny_dataset))
        asked = len(server.requests)
        forbid_model_loading()
        summary = run_rank(_rank_config(second, server, tiny_dataset, reuse_from=(str(first),)))
        assert len(server.requests) == asked
    a, b = TeacherStore.open(str(first)), TeacherStore.open(str(second))
    for split, part in [("train", p) for p in range(a.num_parts("train"))]:
        for section in (fmt.SECTION_STUDENT_INIT, fmt.SECTION_JUDGE):
            assert (a.section_attrs(split, part, fmt.SET_SAMPLES, section)["checksums"]
                    == b.section_attrs(split, part, fmt.SET_SAMPLES, section)["checksums"])
    assert any("reused from" in line for line in summary.lines())


# -- a judge that never answered, through training -------------------------------------------------------------


@pytest.fixture(scope="module")
def unagreed(sampled, tiny_dataset, tmp_path_factory):
    """The samples ranked by a judge whose every reply is free text: its answer, counted; no group agreed."""
    import shutil

    out = tmp_path_factory.mktemp("unagreed") / "unagreed.zarr"
    shutil.copytree(sampled, out)
    with JudgeServer(score=_rule, fault="free") as server:
        run_rank(_rank_config(out, server, tiny_dataset, tries=1))
    return out


@pytest.mark.parametrize("method", ["cyclealign", "rrhf", "pro"])
def test_training_refuses_rankings_without_an_agreed_group_before_the_student_loads(method, unagreed, tmp_path,
                                                                                    forbid_model_loading):
    from click.testing import CliRunner

    from train.cli import main as train_cli

    forbid_model_loading()
    result = CliRunner().invoke(train_cli, ["student", "--cache", str(unagreed), "--method", method,
                                            "--out", str(tmp_path / "run"), "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"train student: method {method} trains on agreed rankings, and {unagreed} has none: pass samples/judge "
        f"(split train) agreed on 0 of 10 groups (unranked_no_ranking 10); every ranking term would be 0. Look at "
        f"the judge's replies (each judge section's audit_json) and rank into another --out with a judge that "
        f"answers full rankings"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_train_cyclealign_stops_at_the_round_whose_ranking_failed_and_the_rerun_finishes(tmp_path, tiny_models,
                                                                                        tiny_dataset):
    from click.testing import CliRunner

    from train.cli import main as train_cli

    _, student = tiny_models
    out = tmp_path / "ca"
    with JudgeServer(score=_rule, fault="500") as server:
        args = ["cyclealign", "--out", str(out), "--judge", server.base_url, "--judge-model", "rule",
                "--judge-retries", "0", "--judge-timeout", "30", "--rounds", "1", "--student", str(student),
                "--dataset", str(tiny_dataset), "--split", "train", "--n", "4", "--max-new-tokens", "10",
                "--lr", "1e-3", "--max-steps", "2", "--batch-tokens", "600", "--device", "cpu", "--dtype", "float32",
                "--no-progress"]
        failed = CliRunner().invoke(train_cli, args)
        assert failed.exit_code == 2, failed.output
        # one part of 10 groups, 4 requests in flight: the judge stops sending once 4 have failed (4 to 7 sent)
        line = failed.stderr.splitlines()[-1]
        assert re.fullmatch(rf"train cyclealign: judge {re.escape(server.base_url)} \(model rule\): ([4-7]) of \1 "
                            rf"requests failed in transport; last: http_500; stopped asking: most of the recent "
                            rf"requests failed\. Parts written: 0 complete, 1 unfinished \(train/part-00000: 10 of "
                            rf"10 groups unanswered\); rerun the same command when the judge answers", line), line
        assert "rounds trained" not in failed.stdout and "Traceback" not in failed.output
        assert not trained(out / "round-1" / "model") and not (out / "round-1" / "model").exists()

        server.fault = None  # the judge answers now: the same command goes on at the round's ranking
        again = CliRunner().invoke(train_cli, args)
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1] == f"rounds trained: {out / 'round-1' / 'model'}"
    assert trained(out / "round-1" / "model")
    store = TeacherStore.open(str(out / "round-1" / "samples.zarr"))
    assert store.complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_JUDGE) == [0]  # one part of 10 groups
    metrics = [json.loads(line) for line in (out / "round-1" / "model" / "metrics.jsonl").open()]
    assert metrics and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
