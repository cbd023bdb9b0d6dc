"""`train student` killed at any moment can go on, and resuming never runs code from the checkpoint file.

Kills are real: a child process runs the ``train`` command with a hook (not in the
project's code) that sends itself SIGKILL in the middle of writing a given file, or
right after a given file was renamed into place (:data:`KILLED_TRAINER`). Then the
same command, with or without ``--resume``, must finish the run as an uninterrupted
one would have: same weights, one metrics record per step with the same losses.
The states and what continues from each: ``train/checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from train import checkpoint, records
from train.cli import main
from train.trainer import TrainConfig, TrainError, train
from tests.refusals import one_line

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2  # checkpoints at steps 2, 4 and 6 (the last); one epoch is 9 steps at 200 tokens a batch

# The child: argv[1] is the run's --out, the rest the `train` command line. KILL_IN names a file of the run
# (relative to --out; a temporary ".NAME.tmp" counts as NAME, and the model's staging folder as --out itself);
# KILL_HOW=cut: the KILL_AT-th write into that file is cut in the middle by SIGKILL (a file written with
# open(), by torch.save or by safetensors); KILL_HOW=after: SIGKILL right after the KILL_AT-th rename onto it.
KILLED_TRAINER = textwrap.dedent("""
    import builtins, io, os, signal, sys
    import torch
    import transformers.modeling_utils as modeling

    out, victim, nth, how = sys.argv[1], os.environ["KILL_IN"], int(os.environ["KILL_AT"]), os.environ["KILL_HOW"]
    seen = [0]

    def run_name(path):
        folder, name = os.path.split(os.path.abspath(os.fspath(path)))
        if name.startswith(".") and name.endswith(".tmp"):
            name = name[1:-4]
        return os.path.relpath(os.path.join(folder, name), out).replace(".model.partial" + os.sep, "")

    def due(path):
        if run_name(path) != victim:
            return False
        seen[0] += 1
        return seen[0] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class Writes:
        def __init__(self, fh, path):
            self.fh, self.path = fh, path
        def write(self, data):
            if due(self.path):
                self.fh.write(data[:len(data) // 2])
                self.fh.flush()
                die()
            return self.fh.write(data)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.fh, name)

    def cut_after_writing(write):
        def wrapped(data, path, *args, **kwargs):
            write(data, path, *args, **kwargs)
            if isinstance(path, (str, os.PathLike)) and due(path):
                os.truncate(path, os.path.getsize(path) // 2)
                die()
        return wrapped

    if how == "cut":
        original_open = io.open
        def opening(file, mode="r", *args, **kwargs):
            fh = original_open(file, mode, *args, **kwargs)
            writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax")
            return Writes(fh, file) if writing and run_name(file) == victim else fh
        builtins.open = io.open = opening
        torch.save = cut_after_writing(torch.save)
        modeling.safe_save_file = cut_after_writing(modeling.safe_save_file)
    else:
        original_replace = os.replace
        def replacing(src, dst, *args, **kwargs):
            original_replace(src, dst, *args, **kwargs)
            if due(dst):
                die()
        os.replace = replacing

    from train.cli import main
    main(sys.argv[2:], prog_name="train")
""")


def command(store, out, *extra):
    return ["student", "--cache", str(store), "--out", str(out), "--method", "dckd", "--max-steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), "--lr", "1e-3", "--batch-tokens", "200", "--device", "cpu",
            "--dtype", "float32", "--log-every", "1", "--no-progress", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):
    """The uninterrupted run: its directory."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = CliRunner().invoke(main, command(tiny_store, out))
    assert result.exit_code == 0, result.output
    return out


def assert_same_run(out, straight):
    a, b = load_file(Path(straight) / "model.safetensors"), load_file(Path(out) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    got, expected = metrics(out), metrics(straight)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-7), mine["step"]
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
    assert not [p for p in Path(out).rglob("*") if p.name.endswith(".tmp") or p.name == ".model.partial"]


# (file killed in, which write or rename of it, how) -> what goes on: "afresh" (no checkpoint yet: the same
# command starts again), "resume" (--resume continues), "model" (--resume writes the final model)
KILLS = {
    "config.yaml cut, before the first step": ("config.yaml", 1, "cut", "afresh"),
    "first metrics record cut": ("metrics.jsonl", 1, "cut", "afresh"),
    "first checkpoint's config.json cut": ("checkpoint/config.json", 1, "cut", "afresh"),
    "first checkpoint's state cut": ("checkpoint/state.pt", 1, "cut", "afresh"),
    "right after the first checkpoint": ("checkpoint/state.pt", 1, "after", "resume"),
    "second checkpoint's config.json cut": ("checkpoint/config.json", 2, "cut", "resume"),
    "second checkpoint's state cut": ("checkpoint/state.pt", 2, "cut", "resume"),
    "a metrics record after a checkpoint cut": ("metrics.jsonl", 3, "cut", "resume"),
    "model cut after the final checkpoint": ("model.safetensors", 1, "cut", "model"),
}


def kill_run(store, out, victim, nth, how, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KILL_IN": victim, "KILL_AT": str(nth),
           "KILL_HOW": how}
    done = subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(out), *command(store, out, *extra)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


@pytest.mark.parametrize("kill", list(KILLS))
def test_a_run_killed_anywhere_is_resumed_or_restarted_by_the_same_command(kill, tiny_store, straight, tmp_path):
    victim, nth, how, goes_on = KILLS[kill]
    out = tmp_path / "run"
    kill_run(tiny_store, out, victim, nth, how)
    runner = CliRunner()

    if goes_on == "afresh":
        refused = one_line(runner.invoke(main, command(tiny_store, out, "--resume")))
        assert "no checkpoint" in refused and "without --resume" in refused
        again = runner.invoke(main, command(tiny_store, out))
        assert again.exit_code == 0, again.output
        assert "starting afresh" in again.stderr and "config.yaml" in again.stderr
    else:
        refused = one_line(runner.invoke(main, command(tiny_store, out)))
        assert "--resume" in refused
        if goes_on == "model":
            assert "model was not completely written" in refused
        again = runner.invoke(main, command(tiny_store, out, "--resume"))
        assert again.exit_code == 0, again.output
        if goes_on == "model":
            assert "writing its model" in again.stderr
    assert_same_run(out, straight)


def test_a_resume_killed_while_dropping_later_records_keeps_the_earlier_ones(tiny_store, straight, tmp_path):
    out = tmp_path / "run"
    kill_run(tiny_store, out, "metrics.jsonl", 3, "cut")  # steps 1-2 logged and checkpointed, step 3's cut
    kill_run(tiny_store, out, "metrics.jsonl", 1, "cut", "--resume")  # the resume rewrites metrics.jsonl: cut
    assert [r["step"] for r in records.read_metrics(out / "metrics.jsonl")] == [1, 2]  # step 3's cut record aside
    again = CliRunner().invoke(main, command(tiny_store, out, "--resume"))
    assert again.exit_code == 0, again.output
    assert_same_run(out, straight)


def test_a_resumed_run_logs_what_the_uninterrupted_run_logs_when_records_and_checkpoints_do_not_align(
        tiny_store, straight, tmp_path):
    """--log-every 4, --save-every 3: records at steps 1, 4 and 6, checkpoints at 3 and 6. Killed right after the
    checkpoint of step 3 and resumed, the record of step 4 must average steps 2 to 4, as the uninterrupted run's
    does (the sums of steps 2 and 3 are in the checkpoint), not step 4 alone."""
    spaced = ("--log-every", "4", "--save-every", "3")
    uninterrupted = CliRunner().invoke(main, command(tiny_store, tmp_path / "straight", *spaced))
    assert uninterrupted.exit_code == 0, uninterrupted.output
    out = tmp_path / "run"
    kill_run(tiny_store, out, "checkpoint/state.pt", 1, "after", *spaced)
    assert [r["step"] for r in metrics(out)] == [1]
    resumed = CliRunner().invoke(main, command(tiny_store, out, "--resume", *spaced))
    assert resumed.exit_code == 0, resumed.output
    got, expected = metrics(out), metrics(tmp_path / "straight")
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 4, 6]
    for mine, theirs in zip(got, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-9), mine["step"]
        assert mine["terms"] == pytest.approx(theirs["terms"], rel=1e-6, abs=1e-9), mine["step"]
    # what a record is: the mean of the steps since the last one (the run logging every step has them one by one)
    each = {r["step"]: r["loss"] for r in metrics(straight)}
    assert got[1]["loss"] == pytest.approx((each[2] + each[3] + each[4]) / 3, rel=1e-5)
    assert got[2]["loss"] == pytest.approx((each[5] + each[6]) / 2, rel=1e-5)


# --------------------------------------------------------------------------- one writer per run folder

# The child: the `train` command line, each batch slowed by STEP_SLEEP seconds (a run long enough to meet).
SLOW_TRAINER = textwrap.dedent("""
    import os, sys, time
    import train.records as records

    add_batch = records.Meter.add_batch

    def slowly(self, *args, **kwargs):
        time.sleep(float(os.environ["STEP_SLEEP"]))
        return add_batch(self, *args, **kwargs)

    records.Meter.add_batch = slowly
    from train.cli import main
    main(sys.argv[1:], prog_name="train")
""")


def wait_for_records(out, count, process, timeout=300):
    """Until ``out``'s metrics.jsonl holds ``count`` records (the run is past its first steps)."""
    import time

    deadline = time.monotonic() + timeout
    while len(records.read_metrics(Path(out) / "metrics.jsonl")) < count:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {count} records in {out} within {timeout} s"
        time.sleep(0.2)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tiny_store, tmp_path):
    import socket

    out = tmp_path / "run"
    long_run = command(tiny_store, out, "--max-steps", "20")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "STEP_SLEEP": "0.5"}
    holder = subprocess.Popen([sys.executable, "-c", SLOW_TRAINER, *long_run], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(out, 3, holder)  # step 2's checkpoint written
        for second in (command(tiny_store, out, "--max-steps", "20", "--resume"), long_run):
            refused = one_line(CliRunner().invoke(main, second))
            assert f"--out {out} is being written by another run (pid {holder.pid} on host " \
                   f"{socket.gethostname()} since " in refused, refused
            assert "--max-steps 20" in refused and "choose another --out" in refused
        assert holder.poll() is None  # the holder went on
    finally:
        holder.kill()
        holder.communicate()
    assert (out / "run.lock").is_file()  # left by the killed holder: its lock went with it
    again = CliRunner().invoke(main, command(tiny_store, out, "--max-steps", "20", "--resume"))
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in metrics(out)] == list(range(1, 21))
    assert not (out / "run.lock").exists()  # removed by the run that ends


def test_the_run_lock_is_one_holders_at_a_time_and_records_no_credential(tmp_path):
    import socket

    from train.runlock import LOCK_FILE, RunLock, holder_of, recorded_command

    out = tmp_path / "new" / "run"
    first = RunLock.take(out, storage_options={"key": "KeY-h21", "endpoint_url": "http://e"},
                         cache="http://alice:PaSs-h21@host/s.zarr")
    recorded = holder_of(out)
    assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
    with pytest.raises(TrainError, match=rf"--out {out} is being written by another run \(pid {os.getpid()} on "):
        RunLock.take(out)  # another open of the file: flock refuses it as it would another process
    first.release()
    assert not (tmp_path / "new").exists()  # made for the run, left empty: removed with the lock
    (out).mkdir(parents=True)
    (out / LOCK_FILE).write_text('{"pid": 1, "host": "gone"}\n')  # a dead holder's file: no lock on it
    with RunLock.take(out):
        assert holder_of(out)["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists() and out.is_dir()
    argv = ["train", "student", "--cache", "http://alice:PaSs-h21@host/s.zarr", "--storage-option",
            "key=KeY-h21", "-o", "region=eu", "--storage-option=token=ToK-h21", "--lr", "1e-3"]
    assert recorded_command(argv, {"KeY-h21"}) == (
        "train student --cache http://host/s.zarr --storage-option key=<redacted> -o region=<redacted> "
        "--storage-option=token=<redacted> --lr 1e-3")


# --------------------------------------------------------------------------- resuming loads data only


class RunsCodeWhenLoaded:
    """Pickled as a call of os.mkdir(marker): loading it with pickle's full powers creates the folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_holding_an_object_that_runs_code_is_refused(tiny_store, tmp_path):
    config = dict(cache=str(tiny_store), out=str(tmp_path / "run"), method="sft", max_steps=3, lr=1e-3,
                  batch_tokens=300, device="cpu", dtype="float32", progress=False)
    train(TrainConfig(**config), stop_after=1)
    state_file = checkpoint.state_path(tmp_path / "run")
    state = torch.load(state_file, map_location="cpu", weights_only=True)  # what train writes is plain data
    marker = tmp_path / "code-ran"
    state["note"] = RunsCodeWhenLoaded(str(marker))
    torch.save(state, state_file)
    with zipfile.ZipFile(state_file) as archive:  # the file does call os.mkdir when unpickled (not run here)
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"mkdir" in pickled and not marker.exists()

    with pytest.raises(TrainError, match="refused") as refused:
        train(TrainConfig(**config, resume=True))
    assert "mkdir" in str(refused.value) and str(state_file) in str(refused.value)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["student", "--cache", str(tiny_store), "--out", str(tmp_path / "run"),
                                       "--method", "sft", "--max-steps", "3", "--lr", "1e-3", "--batch-tokens", "300",
                                       "--device", "cpu", "--dtype", "float32", "--no-progress", "--resume"])
    message = one_line(result)
    assert "refused" in message and "run as code" in message
    assert not marker.exists()


def test_numpy_rng_state_kept_as_data_and_older_array_form_still_loads(tiny_store, tmp_path):
    config = dict(cache=str(tiny_store), out=str(tmp_path / "run"), method="sft", max_steps=3, lr=1e-3,
                  batch_tokens=300, device="cpu", dtype="float32", progress=False)
    train(TrainConfig(**config), stop_after=1)
    state_file = checkpoint.state_path(tmp_path / "run")
    state = checkpoint.read_state(state_file)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)

    np.random.seed(7)
    np.random.standard_normal()  # a state with a cached gaussian
    expected = np.random.get_state()
    state["rng"]["numpy"] = expected  # how checkpoints kept it before: a tuple holding a uint32 array
    torch.save(state, state_file)
    np.random.seed(0)
    checkpoint.set_rng_state(checkpoint.read_state(state_file)["rng"])
    restored = np.random.get_state()
    assert restored[0] == expected[0] and restored[2:] == expected[2:]
    np.testing.assert_array_equal(restored[1], expected[1])
    train(TrainConfig(**config, resume=True))  # and the run resumes from it
    assert [r["step"] for r in metrics(tmp_path / "run")][-1] == 3
