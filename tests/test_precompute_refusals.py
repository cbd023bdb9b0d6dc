"""precompute teacher refuses bad settings and bad models before anything runs, and records only what ran.

Each test is a mistake a user made: a K larger than the vocabulary, a corrupt
model file, an --out that is a file or another folder; the run must end in one
line naming what and where, and a rerun with the mistake fixed must go on from
what was already computed, never be refused because of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from precompute.cli import main as precompute_main
from precompute.teacher import TeacherConfig, run_teacher
from store import TeacherStore
from store import format as fmt


def _config(out, tiny_models, tiny_dataset, **overrides):
    teacher, student = tiny_models
    options = dict(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset), top_k=8,
                   max_length=96, max_new_tokens=12, examples_per_part=4, device="cpu", dtype="float32",
                   progress=False)
    options.update(overrides)
    return TeacherConfig(**options)


def _invoke(*args):
    result = CliRunner().invoke(precompute_main, ["teacher", *map(str, args), "--no-progress", "--device", "cpu"])
    assert "Traceback" not in result.output, result.output
    return result


def _files(path) -> dict:
    """Every file under ``path`` with its size and modification time: what a command wrote, if anything."""
    return {os.path.relpath(os.path.join(d, f), path): (os.path.getsize(os.path.join(d, f)),
                                                         os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(path) for f in files}


def test_top_k_above_the_vocabulary_is_refused_before_any_model_runs(tmp_path, tiny_models, tiny_dataset,
                                                                     forbid_model_loading):
    forbid_model_loading()
    teacher, student = tiny_models
    result = _invoke("--out", tmp_path / "s.zarr", "--teacher", teacher, "--student", student,
                     "--dataset", tiny_dataset, "--top-k", 10 ** 6)
    assert result.exit_code == 2
    assert "--top-k 1000000" in result.output and "49152" in result.output
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_corrupt_model_file_is_named_and_nothing_is_recorded(tmp_path, tiny_models, tiny_dataset, damage):
    teacher, student = tiny_models
    broken = tmp_path / "broken-student"
    shutil.copytree(student, broken)
    target = broken / ("model.safetensors" if damage == "weights" else "config.json")
    target.write_bytes(target.read_bytes()[:40])  # truncated, as an interrupted copy leaves it
    out = tmp_path / "s.zarr"
    result = _invoke("--out", out, "--teacher", teacher, "--student", broken, "--dataset", tiny_dataset,
                     "--top-k", 8, "--max-length", 96, "--max-new-tokens", 12)
    assert result.exit_code == 2
    assert str(target) in result.output


def test_a_student_that_fails_to_load_leaves_no_record_and_the_fixed_rerun_goes_on(tmp_path, tiny_models,
                                                                                   tiny_dataset, tiny_store):
    """Its files read, but the weights do not fit the config: only loading finds it, after earlier passes ran."""
    _, student = tiny_models
    wrong = tmp_path / "wrong-student"
    shutil.copytree(student, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_size"] = 2 * config["hidden_size"]
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (wrong / "config.json").write_text(json.dumps(config))
    out = tmp_path / "s.zarr"
    run_teacher(_config(out, tiny_models, tiny_dataset, passes=("pairs",)))
    with pytest.raises(Exception) as err:
        run_teacher(_config(out, tiny_models, tiny_dataset, student=str(wrong), passes=("pairs", "dpo_ref")))
    assert str(wrong) in str(err.value)
    store = TeacherStore.open(str(out))
    assert "pairs/student_init" not in store.attrs["passes"]  # what did not run is not recorded
    assert store.complete_parts("train", fmt.SET_PAIRS, fmt.SECTION_TEACHER)  # what ran is kept

    summary = run_teacher(_config(out, tiny_models, tiny_dataset, passes=("pairs", "dpo_ref")))
    steps = {s["step"]: s for s in summary.steps}
    assert steps["pairs/teacher"]["parts_done"] == 0 and steps["pairs/student_init"]["parts_done"] > 0


def test_the_same_weights_in_another_folder_are_the_same_model(tmp_path, tiny_models, tiny_dataset, tiny_store):
    teacher, _ = tiny_models
    copy_path = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy_path)
    moved = tmp_path / "moved-teacher"
    shutil.copytree(teacher, moved)
    summary = run_teacher(_config(copy_path, tiny_models, tiny_dataset, teacher=str(moved)))
    assert all(step["parts_done"] == 0 for step in summary.steps)


def test_out_naming_a_file_or_a_foreign_folder_is_refused_and_left_untouched(tmp_path, tiny_models, tiny_dataset):
    teacher, student = tiny_models
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    result = _invoke("--out", a_file, "--teacher", teacher, "--student", student, "--dataset", tiny_dataset)
    assert result.exit_code == 2 and "is a file" in result.output
    assert a_file.read_text() == "mine\n"

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("not a store\n")
    before = _files(folder)
    result = _invoke("--out", folder, "--teacher", teacher, "--student", student, "--dataset", tiny_dataset)
    assert result.exit_code == 2 and "README.md" in result.output and "not a teacher-signal store" in result.output
    assert _files(folder) == before


def test_an_http_out_is_refused_as_read_only_before_anything_runs(tmp_path, tiny_models, tiny_dataset, tiny_store,
                                                                   forbid_model_loading):
    """A plain HTTP server reads stores and takes no writes: every precompute command (and ``store cp``) with
    an HTTP --out ends in one line saying so, exit 2, before a model loads; nothing is sent to the server."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from store import StoreError
    from store.cli import main as store_main

    asked = []

    class Recording(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_response(self, code, message=None):
            asked.append(self.command)
            super().send_response(code, message)

    (tmp_path / "served").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recording, directory=str(tmp_path / "served")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    forbid_model_loading()
    teacher, student = tiny_models
    url = f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
    out = url.replace("http://", "http://alice:PaSs-h21@")
    data = ["--dataset", str(tiny_dataset), "--device", "cpu", "--no-progress"]
    try:
        results = {
            "teacher": CliRunner().invoke(precompute_main, ["teacher", "--out", out, "--teacher", str(teacher),
                                                            "--student", str(student), *data]),
            "sample": CliRunner().invoke(precompute_main, ["sample", "--out", out, "--model", str(student), *data]),
            "rank": CliRunner().invoke(precompute_main, ["rank", "--out", out, "--judge", "http://127.0.0.1:9/v1",
                                                         "--judge-model", "j", *data]),
            "store cp": CliRunner().invoke(store_main, ["cp", str(tiny_store), out]),
        }
        with pytest.raises(StoreError, match="HTTP locations are read-only"):
            run_teacher(_config(url, tiny_models, tiny_dataset))
    finally:
        server.shutdown()
        server.server_close()
    for command, result in results.items():
        assert result.exit_code == 2, (command, result.output)
        assert f"{command if command == 'store cp' else 'precompute ' + command}: {url}: HTTP locations are " \
               f"read-only" in result.stderr, (command, result.output)
        assert "Traceback" not in result.output and "PaSs-h21" not in result.output
    assert asked == []  # not even a read: refused from the location alone


def test_a_finished_store_is_not_written_by_a_rerun(tmp_path, tiny_models, tiny_dataset, tiny_store):
    copy_path = tmp_path / "done.zarr"
    shutil.copytree(tiny_store, copy_path)
    before = _files(copy_path)
    summary = run_teacher(_config(copy_path, tiny_models, tiny_dataset))
    assert all(step["parts_done"] == 0 for step in summary.steps)
    assert _files(copy_path) == before


def test_a_finished_store_on_a_read_only_location_reruns_cleanly(tmp_path, tiny_models, tiny_dataset, tiny_store,
                                                                read_only_view):
    view = read_only_view(tiny_store)
    summary = run_teacher(_config(view, tiny_models, tiny_dataset))
    assert all(step["parts_done"] == 0 for step in summary.steps)
    assert summary.response_tokens > 0


def test_independent_writers_on_one_store_all_succeed_and_equal_one_writer(tmp_path, tiny_models, tiny_dataset,
                                                                          tiny_store):
    """Four `precompute teacher` processes on one store, two at once and two started a moment later."""
    import sys
    import time

    from tests.test_precompute import REPO, _manifest_without_times

    teacher, student = tiny_models
    out = tmp_path / "shared.zarr"
    cmd = [sys.executable, "-m", "precompute.cli", "teacher", "--out", str(out), "--teacher", str(teacher),
           "--student", str(student), "--dataset", str(tiny_dataset), "--top-k", "8", "--max-length", "96",
           "--max-new-tokens", "12", "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for delay in (0, 0, 1.5, 1.5):
        time.sleep(delay)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    assert _manifest_without_times(out) == _manifest_without_times(tiny_store)
    assert not os.path.exists(str(out) + ".partial")
    leftovers = [f for d, _, files in os.walk(out) for f in files if f.endswith(".partial")]
    assert leftovers == []


def test_a_split_with_no_usable_row_is_refused_naming_why(tmp_path, tiny_models):
    """Prompt-only rows asked for pairs: every row skipped; the command says so instead of writing an empty store."""
    teacher, student = tiny_models
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(10)))
    result = _invoke("--out", tmp_path / "s.zarr", "--teacher", teacher, "--student", student, "--dataset", rows)
    assert result.exit_code == 2
    assert "no usable row" in result.output and "missing_responses: 9" in result.output
    assert not (tmp_path / "s.zarr").exists()
