"""precompute teacher: every stored number equals a direct computation with the model.

The store comes from the session fixture ``tiny_store`` (precompute's default
passes over tiny random Llamas that share the real SmolLM2 tokenizer).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from precompute.teacher import TeacherConfig, run_teacher
from store import ProvenanceMismatch, TeacherStore
from store import format as fmt
from tests import store_helpers, tiny

REPO = Path(__file__).resolve().parents[1]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _full_logp(model, ids: np.ndarray) -> torch.Tensor:
    """log pi(. | ids[:t]) for every t, over the whole vocabulary, one sequence alone (no padding)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids.astype(np.int64))[None]).logits[0].float()
    return torch.log_softmax(logits, -1)


def _sequences(store, split, part, sequence_set):
    base = store.read_section(split, part, sequence_set)
    off, roff = base["token_offsets"], base["response_offsets"]
    for s in range(len(off) - 1):
        yield s, base["input_ids"][off[s]:off[s + 1]].astype(np.int64), int(base["prompt_length"][s]), (int(roff[s]), int(roff[s + 1]))


@pytest.mark.parametrize("sequence_set", [fmt.SET_PAIRS, fmt.SET_GENERATED])
def test_teacher_topk_target_and_sums_equal_direct_forward(tiny_store, tiny_models, sequence_set):
    teacher = _load(tiny_models[0])
    store = TeacherStore.open(str(tiny_store))
    k = store.attrs["passes"][f"{sequence_set}/teacher"]["top_k"]
    checked = 0
    for split in store.splits():
        for part in range(store.num_parts(split)):
            sec = store.read_section(split, part, sequence_set, fmt.SECTION_TEACHER)
            for s, ids, p, (r0, r1) in _sequences(store, split, part, sequence_set):
                logp = _full_logp(teacher, ids)[p - 1:-1]  # rows predicting response tokens
                top_v, top_i = logp.topk(k, -1)
                np.testing.assert_array_equal(sec["topk_ids"][r0:r1], top_i.numpy())
                assert np.abs(sec["topk_logp"][r0:r1] - top_v.numpy()).max() <= fmt.LOGP_MAX_ABS_ERROR + 1e-4
                target = logp.gather(-1, torch.as_tensor(ids[p:])[:, None])[:, 0].numpy()
                np.testing.assert_allclose(sec["target_logp"][r0:r1], target, atol=1e-4)
                assert sec["logp_sum"][s] == pytest.approx(float(target.sum()), abs=1e-3)
                checked += 1
    assert checked >= 10


def test_student_init_sums_equal_direct_forward(tiny_store, tiny_models):
    student = _load(tiny_models[1])
    store = TeacherStore.open(str(tiny_store))
    for split in store.splits():
        for part in range(store.num_parts(split)):
            sec = store.read_section(split, part, fmt.SET_PAIRS, fmt.SECTION_STUDENT_INIT)
            for s, ids, p, (r0, r1) in _sequences(store, split, part, fmt.SET_PAIRS):
                logp = _full_logp(student, ids)[p - 1:-1]
                target = logp.gather(-1, torch.as_tensor(ids[p:])[:, None])[:, 0].numpy()
                np.testing.assert_allclose(sec["target_logp"][r0:r1], target, atol=1e-4)
                assert sec["logp_sum"][s] == pytest.approx(float(target.sum()), abs=1e-3)


def test_reference_logp_at_teacher_ids_equals_direct_forward(tiny_store, tiny_models):
    reference = _load(tiny_models[1])  # default reference: the student's initial model
    store = TeacherStore.open(str(tiny_store))
    assert "initial" in store.attrs["passes"]["generated/reference"]["reference_is"]
    for split in store.splits():
        for part in range(store.num_parts(split)):
            teacher = store.read_section(split, part, fmt.SET_GENERATED, fmt.SECTION_TEACHER)
            ref = store.read_section(split, part, fmt.SET_GENERATED, fmt.SECTION_REFERENCE)
            for s, ids, p, (r0, r1) in _sequences(store, split, part, fmt.SET_GENERATED):
                logp = _full_logp(reference, ids)[p - 1:-1]
                at = logp.gather(-1, torch.as_tensor(teacher["topk_ids"][r0:r1].astype(np.int64))).numpy()
                assert np.abs(ref["topk_logp"][r0:r1] - np.maximum(at, fmt.LOGP_FLOOR)).max() <= fmt.LOGP_MAX_ABS_ERROR + 1e-4


def test_generated_answers_are_the_students_greedy_continuations(tiny_store, tiny_models):
    student = _load(tiny_models[1])
    store = TeacherStore.open(str(tiny_store))
    max_new = store.attrs["passes"]["generated/base"]["max_new_tokens"]
    eot = tiny.smollm2_tokenizer().convert_tokens_to_ids("<|im_end|>")
    for s, ids, p, _ in list(_sequences(store, "train", 0, fmt.SET_GENERATED))[:3]:
        with torch.no_grad():
            out = student.generate(torch.as_tensor(ids[:p])[None], do_sample=False, max_new_tokens=max_new,
                                   eos_token_id=eot, pad_token_id=eot)[0, p:].numpy()
        cut = next((j for j, t in enumerate(out) if t == eot), None)
        expected = out[:cut + 1] if cut is not None else out
        np.testing.assert_array_equal(ids[p:], expected)


def test_bad_rows_are_counted_and_strict_names_row_and_field(tmp_path, tiny_models):
    teacher, student = tiny_models
    data = tiny.write_pairs(tmp_path / "rows.jsonl", 6)
    lines = data.read_text().splitlines()
    bad = json.loads(lines[3])
    bad["chosen"] = [{"role": "assistant", "content": "   "}]
    lines[3] = json.dumps(bad)
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "s.zarr"
    summary = run_teacher(TeacherConfig(out=str(out), teacher=str(teacher), student=str(student), dataset=str(data),
                                        splits=("train",), passes=("pairs",), top_k=4, progress=False,
                                        examples_per_part=4, device="cpu", dtype="float32"))
    assert summary.skipped["train"] == {"empty_chosen": 1}
    store = TeacherStore.open(str(out))
    assert store.attrs["layout"]["splits"]["train"]["dataset"]["skipped"] == {"empty_chosen": 1}
    assert sum(store.section_attrs("train", p, fmt.SET_PAIRS)["rows"]["sequence"]
               for p in range(store.num_parts("train"))) == 2 * (len(lines) - 1 - 1)  # 5 train rows, one bad

    proc = subprocess.run([sys.executable, "-m", "precompute.cli", "teacher", "--out", str(tmp_path / "strict.zarr"),
                           "--teacher", str(teacher), "--dataset", str(data), "--split", "train", "--passes", "pairs",
                           "--strict", "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "row 3" in proc.stderr and "field 'chosen'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _manifest_without_times(path) -> dict:
    """path -> (complete, checksums) of every section present: what a run wrote, timestamps aside."""
    return {p: (a.get("complete"), a.get("checksums"))
            for p, a in store_helpers.section_attrs(TeacherStore.open(str(path))).items()}


def test_killed_run_resumes_to_the_same_store(tmp_path, tiny_models, tiny_dataset, tiny_store):
    teacher, student = tiny_models
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "precompute.cli", "teacher", "--out", str(out), "--teacher", str(teacher),
           "--student", str(student), "--dataset", str(tiny_dataset), "--top-k", "8", "--max-length", "96",
           "--max-new-tokens", "12", "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32",
           "--no-progress"]
    # kill it as soon as the teacher has started on generated answers: mid-run, parts half done
    marker = out / "train" / "part-00000" / "generated" / "teacher"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _manifest_without_times(out)
    assert any(not complete for complete, _ in partial.values()) or len(partial) < len(_manifest_without_times(tiny_store))

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stdout
    assert _manifest_without_times(out) == _manifest_without_times(tiny_store)


def test_different_settings_are_refused_naming_what_differs(tmp_path, tiny_models, tiny_dataset, tiny_store):
    copy_path = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy_path)
    teacher, student = tiny_models
    with pytest.raises(ProvenanceMismatch) as err:
        run_teacher(TeacherConfig(out=str(copy_path), teacher=str(teacher), student=str(student),
                                  dataset=str(tiny_dataset), top_k=4, max_length=96, max_new_tokens=12,
                                  examples_per_part=4, device="cpu", dtype="float32", progress=False))
    assert "top_k" in str(err.value) and "8" in str(err.value) and "4" in str(err.value)


def test_tokenizer_mismatch_is_refused_before_any_model_runs(tmp_path, tiny_models, tiny_dataset):
    from lm.chat import TokenizerMismatch, tokenizer_hash

    teacher, _ = tiny_models
    other = tmp_path / "other-student"
    shutil.copytree(teacher, other)
    tok = copy.deepcopy(tiny.smollm2_tokenizer())
    tok.chat_template = None  # same vocabulary, different rendering: different ids for chat rows
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        (other / name).unlink(missing_ok=True)
    tok.save_pretrained(other)
    out = tmp_path / "never.zarr"
    with pytest.raises(TokenizerMismatch) as err:
        run_teacher(TeacherConfig(out=str(out), teacher=str(teacher), student=str(other), dataset=str(tiny_dataset),
                                  device="cpu", dtype="float32", progress=False))
    message = str(err.value)
    assert tokenizer_hash(tiny.smollm2_tokenizer()) in message and tokenizer_hash(tok) in message
    assert not out.exists()
