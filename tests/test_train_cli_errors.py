"""`train student` and `train evaluate`: each user mistake ends in one line on stderr, exit status 2, no traceback.

``DISTILL_DEBUG=1`` shows the error itself (the traceback) instead.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from train.cli import main
from train.config import TrainError
from tests.refusals import one_line as refusal

REPO = Path(__file__).resolve().parents[1]
RUN = ["--method", "dckd", "--max-steps", "1", "--batch-tokens", "300", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def store_without_teacher(tmp_path_factory, tiny_models, tiny_dataset):
    """A store with the pairs and only the initial model's sums (``--passes dpo_ref``): no teacher signal."""
    from precompute.teacher import TeacherConfig, run_teacher

    teacher, student = tiny_models
    out = tmp_path_factory.mktemp("no-teacher") / "dpo_ref.zarr"
    run_teacher(TeacherConfig(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                              passes=("dpo_ref",), top_k=8, max_length=96, examples_per_part=4, device="cpu",
                              dtype="float32", progress=False))
    return out


# --------------------------------------------------------------------------- train student


def test_student_missing_store(tmp_path):
    message = refusal(CliRunner().invoke(main, ["student", "--cache", str(tmp_path / "nowhere.zarr"), *RUN]))
    assert "nowhere.zarr" in message


def test_student_store_missing_signals(store_without_teacher, tmp_path, forbid_model_loading):
    forbid_model_loading()
    message = refusal(CliRunner().invoke(main, ["student", "--cache", str(store_without_teacher), "--out",
                                                str(tmp_path / "run"), *RUN]))
    assert "pairs/teacher" in message and "precompute teacher" in message


@pytest.mark.parametrize("text, expected", [
    ("lr: [0.001\nmethod: dckd\n", "not valid YAML"),  # unclosed list
    ("method: dckd\n  lr: 1\n", "not valid YAML"),  # bad indentation
    ("lr: 0.001\nlearning_rate: 0.1\n", "unknown option(s) learning_rate"),
    ("lr: fast\n", "lr: 'fast' is not a valid float"),
    ("- lr\n- 0.001\n", "expected a mapping"),
])
def test_student_bad_config_file(text, expected, tiny_store, tmp_path, forbid_model_loading):
    forbid_model_loading()
    config = tmp_path / "run.yaml"
    config.write_text(text)
    message = refusal(CliRunner().invoke(main, ["student", "--config", str(config), "--cache", str(tiny_store),
                                                "--out", str(tmp_path / "run"), *RUN]))
    assert str(config) in message and expected in message
    if "YAML" in expected:
        assert "line 2" in message or "line 1" in message  # where


def test_student_out_is_a_file(tiny_store, tmp_path, forbid_model_loading):
    forbid_model_loading()
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps\n")
    for out, where in ((taken, f"--out {taken} is a file"), (taken / "run", f"{taken} is a file")):
        message = refusal(CliRunner().invoke(main, ["student", "--cache", str(tiny_store), "--out", str(out), *RUN]))
        assert where in message and "choose another --out" in message
    assert taken.read_text() == "a file the user keeps\n"


def test_student_out_in_a_read_only_folder(tiny_store, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "run"
    args = ["student", "--cache", str(tiny_store), "--out", str(out), *RUN]
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        if os.geteuid() != 0:
            message = refusal(CliRunner().invoke(main, args))
        else:  # root writes anywhere: run the command in a process without the capability that allows it
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot make a folder read-only to a process")
            drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            done = subprocess.run([*drop, sys.executable, "-m", "train.cli", *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            message = lines[0]
    finally:
        locked.chmod(stat.S_IRWXU)
    assert message.startswith("train student: ")
    assert f"{locked} is not writable" in message and "choose another --out" in message
    assert not out.exists()


def test_student_distill_debug_shows_the_error_itself(tmp_path):
    args = ["student", "--cache", str(tmp_path / "nowhere.zarr"), *RUN]
    result = CliRunner(env={"DISTILL_DEBUG": "1"}).invoke(main, args)
    assert isinstance(result.exception, TrainError) and "nowhere.zarr" in str(result.exception)


# --------------------------------------------------------------------------- train evaluate


def test_evaluate_missing_store(tmp_path):
    message = refusal(CliRunner().invoke(main, ["evaluate", "--cache", str(tmp_path / "nowhere.zarr"),
                                                "--device", "cpu"]), "evaluate")
    assert "nowhere.zarr" in message


def test_evaluate_store_missing_signals(store_without_teacher, tiny_models, forbid_model_loading):
    forbid_model_loading()
    message = refusal(CliRunner().invoke(main, ["evaluate", "--cache", str(store_without_teacher), "--model",
                                                str(tiny_models[1]), "--device", "cpu"]), "evaluate")
    assert "pairs/teacher" in message and "precompute teacher" in message


def test_evaluate_missing_model_and_split(tiny_store, tmp_path):
    message = refusal(CliRunner().invoke(main, ["evaluate", "--cache", str(tiny_store), "--model",
                                                str(tmp_path / "no-such-model"), "--device", "cpu"]), "evaluate")
    assert "no-such-model" in message
    message = refusal(CliRunner().invoke(main, ["evaluate", "--cache", str(tiny_store), "--split", "dev",
                                                "--device", "cpu"]), "evaluate")
    assert "dev" in message
