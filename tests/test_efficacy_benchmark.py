"""The efficacy benchmark (benchmarks/efficacy.py): its rule, its black box, and a reduced run end to end.

The reduced run (two methods, a few steps, tiny models) goes through the same command lines as the full
benchmark, so that a change to ``precompute`` or ``train`` that breaks the benchmark's plumbing fails here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import efficacy  # noqa: E402
import efficacy_task as task  # noqa: E402


@pytest.mark.parametrize("answer, expected", [
    ("9", (True, True)), ("9 2 2", (True, True)), ("7 9", (True, False)), ("2", (True, False)),
    ("9 2 7 3", (False, False)),  # four digits
    ("8", (False, False)),  # not listed
    ("9,2", (False, False)), ("", (False, False)), ("nine", (False, False)),
])
def test_the_rule_says_valid_and_preferred(answer, expected):
    assert task.judge_answer([3, 7, 2, 9], answer) == expected


def test_the_task_has_the_stated_informative_share_and_disjoint_prompts():
    sizes = task.TaskSizes(sft_prompts=50, train=400, dev=40, test=40)
    sft, prefs = task.make_task(0, sizes)
    prompts = [tuple(r["digits"]) for rows in (sft["train"], *prefs.values()) for r in rows]
    assert len({p for p in prompts}) == 50 + 400 + 40 + 40  # each prompt in one split only (sft rows repeat theirs)
    informative = [task.judge_answer(r["digits"], r["chosen"][0]["content"])[1] for r in prefs["train"]]
    share = sum(informative) / len(informative)
    assert abs(share - sizes.informative) < 3 * (0.6 * 0.4 / 400) ** 0.5  # binomial: within 3 sd of 0.6
    for split in ("dev", "test"):  # held-out pairs: chosen preferred, rejected valid and not preferred
        for r in prefs[split]:
            assert task.judge_answer(r["digits"], r["chosen"][0]["content"]) == (True, True)
            assert task.judge_answer(r["digits"], r["rejected"][0]["content"]) == (True, False)
    assert task.make_task(0, sizes) == (sft, prefs)  # deterministic


def test_the_black_box_orders_preferred_then_valid_then_invalid():
    question = "Question: Pick from: 3 7 2 9\n[1] 8\n[2] 7 9\n[3] 9 3\n[4] 2"
    assert task.rank_reply([{"role": "user", "content": question}]) == "[3] > [2] > [4] > [1]"


@pytest.mark.slow
def test_a_reduced_benchmark_runs_every_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "eff"
    argv = ["--smoke", "--methods", "sft,dpo", "--lrs", "1e-3,3e-3", "--seeds", "2", "--steps", "3", "--samples", "2",
            "--out", str(out)]
    assert efficacy.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["sft", "dpo"]
    for row in summary["rows"]:
        assert len(row["results"]) == 2  # two seeds
        for result in row["results"]:
            assert 0 <= result["preferred_greedy"] <= result["valid_greedy"] <= 1
            assert 0 <= result["preferred_sampled"] <= result["valid_sampled"] <= 1
            assert result["prompts"] == 16 and result["samples"] == 32  # the smoke test split, 2 samples each
    assert summary["references"]["teacher"]["teacher_agreement"] == 1.0  # the teacher agrees with itself
    assert set(summary["sweeps"]["sft"][1]) == {"0.001", "0.003"}
    assert (out / "efficacy.png").stat().st_size > 10_000
    assert "| sft |" in printed and "| dpo |" in printed and "Learning-rate sweep" in printed
    commands = (out / "commands.txt").read_text()
    for command in ("precompute teacher", "train student --cache", "train evaluate --model"):
        assert command in commands
    trained = commands.count("train student")
    # the same command again: every store, model and evaluation is kept, nothing is trained twice
    assert efficacy.main(argv) == 0
    assert (out / "commands.txt").read_text().count("train student") == trained


@pytest.mark.slow
def test_the_cross_tokenizer_column_runs_every_method_that_reads_a_teacher(tmp_path, capsys):
    """A student of another family (efficacy_task.build_cross_tokenizer) beside the same-tokenizer rows: the
    cross-tokenizer stores are made with --cross-tokenizer, KD's methods also run with the chunk likelihood,
    CycleAlign (a black box reading text) is left out, and the alignment shares are printed."""
    out = tmp_path / "eff"
    argv = ["--smoke", "--methods", "kd,adpa_plus,pad,cyclealign", "--lrs", "1e-3", "--seeds", "1", "--steps", "2",
            "--samples", "2", "--out", str(out)]
    assert efficacy.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    labels = [row["method"] for row in summary["rows"]]
    cross = [row["method"] for row in summary["cross_rows"]]
    assert cross == ["kd", "kd, --cross-tokenizer-loss chunk", labels[1], f"{labels[1]}, --cross-tokenizer-loss chunk",
                     "pad"]
    for row in summary["cross_rows"]:
        for result in row["results"]:
            assert 0 <= result["preferred_greedy"] <= result["valid_greedy"] <= 1 and result["prompts"] == 16
    assert any(line.startswith("pairs/teacher across tokenizers") for line in summary["cross_alignment"])
    assert "Cross-tokenizer column" in printed and "preferred (greedy): cross" in printed
    commands = (out / "commands.txt").read_text()
    assert commands.count("--cross-tokenizer ") >= 3 and "--cross-tokenizer-loss chunk" in commands
